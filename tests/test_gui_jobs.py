"""kohya_gui.jobs with a fake trainer (real processes): queue, graceful stop, kill, dead-process detection, reattach."""
import json
import os
import signal
import sys
import textwrap
import time

import psutil
import pytest

from kohya_gui import command
from kohya_gui.command import AccelerateSettings
from kohya_gui.jobs import JobError, JobManager, process_alive

FAKE_TRAINER = textwrap.dedent('''
    """Fake trainer: reads mode/steps from the run TOML, writes events, honours the stop/save request files."""
    import json, os, sys, time, tomllib
    args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
    cfg = {}
    for section in tomllib.load(open(args["--config_file"], "rb")).values():
        cfg.update(section)
    mode, steps = cfg.get("output_name", "ok"), cfg.get("max_train_steps", 1600)
    ctl = args["--control_dir"]
    events = open(args["--events_file"], "a", buffering=1)
    def emit(type, **kw):
        events.write(json.dumps(dict(type=type, time=time.time(), **kw)) + "\\n")
    print("fake trainer starting", mode, "token=" + cfg.get("training_comment", ""), flush=True)
    emit("start", total_steps=steps, total_epochs=1)
    if mode == "fail":
        emit("error", message="model file is broken", hint="pick another model")
        emit("done", status="failed", outputs=[])
        sys.exit(1)
    if mode == "crash":
        print("Traceback: boom", flush=True)
        sys.exit(3)
    for step in range(1, steps + 1):
        emit("progress", step=step, total_steps=steps, epoch=1, total_epochs=1, loss=1.0 / step, avg_loss=0.5,
             lr=1e-4, it_per_s=10.0, eta_s=(steps - step) / 10)
        for what in ("save", "sample", "stop"):
            path = os.path.join(ctl, what)
            if os.path.exists(path) and mode != "ignore_stop":
                os.remove(path)
                emit(what if what != "stop" else "warning", message=f"{what} requested", path="x", kind="step")
                if what == "stop":
                    emit("save", path="out/model.safetensors", kind="final")
                    emit("done", status="stopped", outputs=["out/model.safetensors"])
                    sys.exit(0)
        time.sleep(0.05)
    emit("save", path="out/model.safetensors", kind="final")
    emit("done", status="completed", outputs=["out/model.safetensors"])
''')


@pytest.fixture
def fake_build(tmp_path):
    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE_TRAINER)

    def build(kind, values, accel, job_dir, python=sys.executable):
        cmd = command.build_command(kind, values, accel, job_dir, python=python)
        i = cmd.argv.index("-m", 3)
        cmd.argv = [python, str(script)] + cmd.argv[i + 2:]
        return cmd

    return build


def _manager(tmp_path, fake_build, grace_s=30):
    return JobManager(str(tmp_path / "jobs"), python=sys.executable, grace_s=grace_s, build=fake_build)


def _wait(manager, pred, timeout=20.0):
    end = time.time() + timeout
    while time.time() < end:
        manager.tick()
        if pred():
            return True
        time.sleep(0.1)
    return False


def _status(manager, job):
    return manager.get(job.id).status


def test_create_writes_the_folder_and_runs_to_completion(tmp_path, fake_build):
    m = _manager(tmp_path, fake_build)
    job = m.create("lora", {"output_name": "ok", "max_train_steps": 5, "sample_prompts_text": "a dog\n"},
                   AccelerateSettings())
    assert job.status == "queued"
    assert os.path.isfile(job.toml_path) and os.path.isfile(job.job_json)
    assert open(job.prompts_path).read() == "a dog\n"  # written before launch
    assert json.load(open(job.job_json))["argv"] == job.argv
    assert _wait(m, lambda: _status(m, job) == "completed")
    done = m.get(job.id)
    assert done.exit_code == 0 and done.outputs == ["out/model.safetensors"] and done.ended >= done.started
    assert "fake trainer starting" in open(done.log_path).read()
    view = m.view(job.id)
    assert view.step == 5 and view.done_status == "completed" and len(view.loss_points) == 5


def test_queue_runs_one_at_a_time_in_order_with_move_and_cancel(tmp_path, fake_build):
    m = _manager(tmp_path, fake_build)
    first = m.create("lora", {"output_name": "ok", "max_train_steps": 30}, AccelerateSettings())
    second = m.create("lora", {"output_name": "ok", "max_train_steps": 2}, AccelerateSettings())
    third = m.create("lora", {"output_name": "ok", "max_train_steps": 2}, AccelerateSettings())
    fourth = m.create("lora", {"output_name": "ok", "max_train_steps": 2}, AccelerateSettings())
    assert [j.id for j in m.queued()] == [first.id, second.id, third.id, fourth.id]
    assert [j.id for j in m.move(third.id, "up")] == [first.id, third.id, second.id, fourth.id]
    m.cancel(fourth.id)
    with pytest.raises(JobError):
        m.cancel(fourth.id)
    m.tick()
    assert m.running().id == first.id
    assert _status(m, second) == "queued" and _status(m, third) == "queued"
    assert _wait(m, lambda: _status(m, second) == "completed")
    assert m.get(third.id).started < m.get(second.id).started  # the moved job ran first
    assert _status(m, fourth) == "cancelled"
    assert [j.id for j in m.list()][:1] == [fourth.id]  # newest first


def test_graceful_stop_and_save_request(tmp_path, fake_build):
    m = _manager(tmp_path, fake_build)
    job = m.create("lora", {"output_name": "ok", "max_train_steps": 100000}, AccelerateSettings())
    m.tick()
    assert _wait(m, lambda: m.view(job.id).step >= 2)
    m.request(job.id, "save")
    assert _wait(m, lambda: any(k == "step" for k, _ in m.view(job.id).saves))
    m.stop(job.id)
    assert _wait(m, lambda: _status(m, job) == "stopped")
    stopped = m.get(job.id)
    assert stopped.exit_code == 0 and not stopped.killed and stopped.outputs == ["out/model.safetensors"]


def test_stop_kills_the_process_tree_after_the_grace_period(tmp_path, fake_build):
    m = _manager(tmp_path, fake_build, grace_s=1)
    job = m.create("lora", {"output_name": "ignore_stop", "max_train_steps": 100000}, AccelerateSettings())
    m.tick()
    assert _wait(m, lambda: m.view(job.id).step >= 1)
    pid = m.get(job.id).pid
    m.stop(job.id)
    t0 = time.time()
    assert _wait(m, lambda: _status(m, job) == "stopped", timeout=15)
    assert time.time() - t0 < 10
    assert m.get(job.id).killed and "grace" in m.get(job.id).error_message
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_kill_now(tmp_path, fake_build):
    m = _manager(tmp_path, fake_build)
    job = m.create("lora", {"output_name": "ignore_stop", "max_train_steps": 100000}, AccelerateSettings())
    m.tick()
    m.kill(job.id)
    assert _wait(m, lambda: _status(m, job) == "stopped", timeout=5)
    assert "killed" in m.get(job.id).error_message


def test_failures_keep_the_trainers_message_or_the_log_tail(tmp_path, fake_build):
    m = _manager(tmp_path, fake_build)
    fail = m.create("lora", {"output_name": "fail", "max_train_steps": 2}, AccelerateSettings())
    crash = m.create("lora", {"output_name": "crash", "max_train_steps": 2}, AccelerateSettings())
    assert _wait(m, lambda: _status(m, crash) == "failed")
    f, c = m.get(fail.id), m.get(crash.id)
    assert f.status == "failed" and f.error_message == "model file is broken" and f.error_hint == "pick another model"
    assert c.exit_code == 3 and "Traceback: boom" in c.error_message and "Traceback: boom" in c.log_tail


def test_a_killed_process_is_detected_within_seconds_and_the_queue_goes_on(tmp_path, fake_build):
    m = _manager(tmp_path, fake_build)
    job = m.create("lora", {"output_name": "ok", "max_train_steps": 100000}, AccelerateSettings())
    nxt = m.create("lora", {"output_name": "ok", "max_train_steps": 2}, AccelerateSettings())
    m.tick()
    assert _wait(m, lambda: m.view(job.id).step >= 1)
    os.kill(m.get(job.id).pid, signal.SIGKILL)
    t0 = time.time()
    assert _wait(m, lambda: _status(m, job) == "failed", timeout=5)
    assert time.time() - t0 < 3
    assert m.get(job.id).exit_code == -signal.SIGKILL
    assert _wait(m, lambda: _status(m, nxt) == "completed")  # stale state does not block the next start


def test_reattach_after_restart_keeps_live_runs_and_fails_dead_ones(tmp_path, fake_build):
    m = _manager(tmp_path, fake_build, grace_s=30)
    job = m.create("lora", {"output_name": "ok", "max_train_steps": 100000}, AccelerateSettings())
    m.tick()
    assert _wait(m, lambda: m.view(job.id).step >= 1)
    # a job.json that claims "running" for a process that no longer exists (the GUI died with it)
    ghost = m.create("lora", {"output_name": "ok", "max_train_steps": 2}, AccelerateSettings())
    data = json.load(open(ghost.job_json))
    data.update(status="running", pid=m.get(job.id).pid, create_time=12345.0, started=time.time())  # recycled pid
    with open(ghost.job_json, "w") as f:
        json.dump(data, f)
    with open(ghost.log_path, "w") as f:
        f.write("loading model\nRuntimeError: CUDA out of memory\n")

    m.close()  # the GUI dies: its queue lock goes with it (its trainers keep running)
    m2 = JobManager(str(tmp_path / "jobs"), python=sys.executable, grace_s=30, build=fake_build)  # "restart"
    g = m2.get(ghost.id)
    assert g.status == "failed" and "CUDA out of memory" in g.log_tail and "not watching" in g.error_message
    assert m2.get(job.id).status == "running" and m2.running().id == job.id
    m2.tick()
    assert m2.running().id == job.id  # nothing else started beside it
    m2.stop(job.id)
    assert _wait(m2, lambda: _status(m2, job) == "stopped")
    assert m2.get(job.id).exit_code is None  # not our child any more: the status comes from the done event
    m._procs.clear()  # the first manager's Popen handle belongs to the "dead GUI"


def test_reattached_process_that_dies_is_failed(tmp_path, fake_build):
    m = _manager(tmp_path, fake_build)
    job = m.create("lora", {"output_name": "ignore_stop", "max_train_steps": 100000}, AccelerateSettings())
    m.tick()
    m.close()  # the GUI dies: its queue lock goes with it
    m2 = JobManager(str(tmp_path / "jobs"), python=sys.executable, build=fake_build)
    assert process_alive(m2.get(job.id).pid, m2.get(job.id).create_time)
    os.kill(job.pid if job.pid else m2.get(job.id).pid, signal.SIGKILL)
    m._procs[job.id].wait()  # reap (in real life init does)
    assert _wait(m2, lambda: _status(m2, job) == "failed", timeout=5)


def test_secrets_do_not_reach_job_json_or_the_stored_log_tail(tmp_path, fake_build, monkeypatch):
    from kohya_gui import secrets

    real = secrets.is_secret
    monkeypatch.setattr(secrets, "is_secret", lambda name: name == "training_comment" or real(name))
    m = _manager(tmp_path, fake_build)
    job = m.create("lora", {"output_name": "crash", "max_train_steps": 1, "training_comment": "hf_SECRETVALUE"},
                   AccelerateSettings())
    assert _wait(m, lambda: _status(m, job) == "failed")
    stored = open(job.job_json).read()
    assert "hf_SECRETVALUE" in open(job.log_path).read()  # the trainer printed it...
    assert "hf_SECRETVALUE" not in stored and "token=***" in m.get(job.id).log_tail  # ...we never store it
    assert secrets.strip_secrets({"hf_token": "abc", "wandb_api_key": "k", "a": {"password": "p", "b": 1}}) == \
        {"a": {"b": 1}}


def test_start_failure_is_a_failed_job_not_a_crash(tmp_path, fake_build):
    m = JobManager(str(tmp_path / "jobs"), python=str(tmp_path / "no-such-python"), build=fake_build)
    job = m.create("lora", {"output_name": "ok"}, AccelerateSettings())
    m.tick()
    j = m.get(job.id)
    assert j.status == "failed" and "could not start" in j.error_message
