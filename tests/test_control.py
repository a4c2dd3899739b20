"""Tests for sd_scripts.training.control: signals, request files and flag syncing across processes."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from types import SimpleNamespace

import pytest

from sd_scripts.training.control import RunControl, request, sync_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_request_file_is_taken_once(tmp_path):
    ctl = RunControl(str(tmp_path), poll_interval_s=0.0)
    assert ctl.poll() == [] and not ctl.stop_requested
    path = request(tmp_path, "save")
    assert os.path.basename(path) == "save" and os.path.exists(path)
    assert ctl.poll() == ["save"]
    assert not os.path.exists(path)  # deleted when taken
    assert ctl.take_save_request() is True
    assert ctl.take_save_request() is False  # once
    assert ctl.poll() == [] and ctl.take_save_request() is False
    assert not ctl.stop_requested and ctl.take_sample_request() is False


def test_all_requests_and_no_temp_files_left(tmp_path):
    (tmp_path / "other.txt").write_text("x")
    for what in ("stop", "save", "sample"):
        request(tmp_path, what)
    assert sorted(os.listdir(tmp_path)) == ["other.txt", "sample", "save", "stop"]
    ctl = RunControl(tmp_path, poll_interval_s=0.0)
    assert sorted(ctl.poll()) == ["sample", "save", "stop"]
    assert ctl.stop_requested and ctl.stop_reason == "file"
    assert ctl.take_sample_request() and ctl.take_save_request()
    assert os.listdir(tmp_path) == ["other.txt"]
    assert ctl.stop_requested  # stop stays set


def test_poll_looks_at_the_folder_at_most_every_interval(tmp_path):
    ctl = RunControl(tmp_path, poll_interval_s=60.0)
    assert ctl.poll() == []  # first poll looks
    request(tmp_path, "stop")
    assert ctl.poll() == [] and not ctl.stop_requested  # too soon
    assert ctl.poll(force=True) == ["stop"] and ctl.stop_requested


def test_no_control_dir_and_bad_request(tmp_path):
    ctl = RunControl(None)
    assert ctl.poll(force=True) == [] and not ctl.stop_requested
    ctl.request_stop()
    assert ctl.stop_requested and ctl.stop_reason == "request"
    with pytest.raises(ValueError):
        request(tmp_path, "pause")


def _wait_for(predicate, timeout=2.0):
    end = time.monotonic() + timeout
    while not predicate() and time.monotonic() < end:
        time.sleep(0.01)
    return predicate()


def test_sigint_sets_the_flag_and_a_second_one_forces_quit():
    old_int, old_term = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    ctl = RunControl(None).install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert _wait_for(lambda: ctl.stop_requested)
        assert ctl.stop_reason == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1.0)  # the handler raises here
    finally:
        ctl.restore()
    assert signal.getsignal(signal.SIGINT) is old_int
    assert signal.getsignal(signal.SIGTERM) == old_term


def test_sigterm_sets_the_flag_and_a_late_second_sigint_does_not_quit():
    with RunControl(None, force_quit_window_s=0.0) as ctl:
        os.kill(os.getpid(), signal.SIGTERM)
        assert _wait_for(lambda: ctl.stop_requested)
        assert ctl.stop_reason == "SIGTERM"
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)  # outside the (zero) window: still only a stop request
        time.sleep(0.05)
    assert ctl.stop_requested


def test_sync_flags_single_process_is_unchanged():
    accelerator = SimpleNamespace(num_processes=1)  # no reduce(): nothing collective may be called
    flags = {"stop": True, "save": False}
    out = sync_flags(accelerator, flags)
    assert out == flags and out is not flags


WORKER = textwrap.dedent("""
    import os, sys
    import torch.distributed as dist
    import torch.multiprocessing as mp

    def worker(rank, rendezvous):
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                          MASTER_ADDR="127.0.0.1")
        # A file rendezvous: no TCP port to pick and race for (a fixed or "free right now" port can be taken by
        # another test under load). accelerate reuses an initialised process group.
        dist.init_process_group("gloo", init_method="file://" + rendezvous, rank=rank, world_size=2)
        try:
            from accelerate import Accelerator
            from sd_scripts.training.control import sync_flags
            acc = Accelerator(cpu=True)
            assert acc.num_processes == 2
            flags = {"stop": rank == 1, "save": rank == 0, "sample": False}
            out = sync_flags(acc, flags)
            assert out == {"stop": True, "save": True, "sample": False}, out
            acc.wait_for_everyone()
            if rank == 0:
                print("SYNC_OK", flush=True)
        finally:
            # tear the group down before exit: gloo threads alive at interpreter exit abort the process
            # ("terminate called without an active exception")
            dist.destroy_process_group()

    if __name__ == "__main__":
        mp.spawn(worker, args=(sys.argv[1],), nprocs=2, join=True)
""")


def test_sync_flags_ors_across_two_gloo_processes(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "rendezvous")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SYNC_OK" in proc.stdout
