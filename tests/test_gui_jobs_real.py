"""The job manager driving the REAL trainer: a SIGKILLed trainer shows failed with its log tail within seconds and
the next start works; a GUI restart mid-run re-attaches to the live run, which then finishes."""
from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

from kohya_gui.command import AccelerateSettings
from kohya_gui.jobs import JobManager

pytestmark = pytest.mark.timeout(400)


def demo_values(tiny_sd1, demo_data, out, steps):
    return {"pretrained_model_name_or_path": tiny_sd1.single_file, "train_data_dir": demo_data,
            "output_dir": str(out), "output_name": "job", "resolution": "64", "caption_extension": ".txt",
            "max_train_steps": steps, "max_data_loader_n_workers": 0, "network_dim": 4, "learning_rate": 1e-3}


def wait(predicate, timeout, what, manager=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if manager is not None:
            manager.tick()
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def trainer_process(job):
    launcher = psutil.Process(job.pid)
    for child in launcher.children(recursive=True):
        if "sd_scripts.train_network" in " ".join(child.cmdline()):
            return child
    return None


def progressed(job, steps=2):
    from sd_scripts.training.events import read_events

    return any(e["type"] == "progress" and e["step"] >= steps for e in read_events(job.events_path))


def test_killed_trainer_is_marked_failed_quickly_and_the_next_run_starts(tmp_path, tiny_sd1, demo_data):
    manager = JobManager(str(tmp_path / "jobs"), grace_s=5)
    accel = AccelerateSettings(cpu=True, num_cpu_threads_per_process=1)
    first = manager.create("lora", demo_values(tiny_sd1, demo_data, tmp_path / "out1", 100000), accel)
    manager.tick()
    first = manager.get(first.id)
    assert first.status == "running"
    wait(lambda: progressed(manager.get(first.id)), 120, "the first run to train", manager)
    victim = trainer_process(manager.get(first.id))
    assert victim is not None
    os.kill(victim.pid, signal.SIGKILL)
    killed_at = time.time()
    wait(lambda: manager.get(first.id).status == "failed", 10, "the killed run to show failed", manager)
    assert time.time() - killed_at < 10
    job = manager.get(first.id)
    assert job.log_tail and "steps" in job.log_tail
    second = manager.create("lora", demo_values(tiny_sd1, demo_data, tmp_path / "out2", 3), accel)
    wait(lambda: manager.get(second.id).status in ("completed", "failed"), 120, "the next run", manager)
    assert manager.get(second.id).status == "completed", manager.get(second.id).log_tail
    assert (tmp_path / "out2" / "job.safetensors").is_file()


def test_gui_restart_reattaches_to_the_live_run(tmp_path, tiny_sd1, demo_data):
    jobs = str(tmp_path / "jobs")
    manager = JobManager(jobs)
    accel = AccelerateSettings(cpu=True, num_cpu_threads_per_process=1)
    job = manager.create("lora", demo_values(tiny_sd1, demo_data, tmp_path / "out", 40), accel)
    manager.tick()
    wait(lambda: progressed(manager.get(job.id), 1), 120, "the run to train", manager)
    del manager  # the GUI goes away; its child keeps running (own session)
    restarted = JobManager(jobs)
    assert restarted.get(job.id).status == "running"  # re-attached, not marked dead
    wait(lambda: restarted.get(job.id).status != "running", 240, "the re-attached run to end", restarted)
    final = restarted.get(job.id)
    assert final.status == "completed", final.log_tail
    assert str(tmp_path / "out" / "job.safetensors") in final.outputs
