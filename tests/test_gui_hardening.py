"""Issue 11 (GUI hardening and remote use): each finding driven with its hostile input, showing the safe outcome:
a refusal with a message naming the field, the GUI still serving, nothing run.

Finding -> tests: 1 accelerate extra args `test_f1_*`; 2 argv from disk / jobs folder `test_f2_*`; 3 empty --listen
`test_f3_*`; 4 Host / Origin (and 7: login rate limit) `test_f4_*`; 5 corrupt job files and events `test_f5_*`;
6 locking and orphans `test_f6_*`; 7 smaller findings `test_f7_*`; remote use `test_remote_*`; set-up output
`test_setup_*`. Finding 8 (the flaky gloo test) is fixed in test_control.py.
"""
from __future__ import annotations

import http.client
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import time
import urllib.parse
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from kohya_gui import cli, command
from kohya_gui.command import AccelerateSettings, CommandError, build_command
from kohya_gui.file_browser import BrowseError, FileBrowser
from kohya_gui.job_files import JobsDirError
from kohya_gui.jobs import JobError, JobManager, process_alive
from kohya_gui.net_guard import HostPolicy
from kohya_gui.uploads import UploadError, extract_dataset_zip
from test_gui_jobs import FAKE_TRAINER
from test_gui_launcher import LAUNCHER, ROOT, start_server, stop_server

SH = "/bin/sh"


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


def _manager(tmp_path, fake_build, **kw):
    return JobManager(str(tmp_path / "jobs"), python=sys.executable, build=fake_build, **kw)


def _wait(pred, manager=None, timeout=30.0):
    end = time.time() + timeout
    while time.time() < end:
        if manager is not None:
            manager.tick()
        if pred():
            return True
        time.sleep(0.1)
    return False


# ------------------------------------------------------------------ 1. accelerate extra arguments

@pytest.mark.parametrize("extra, words", [
    (["--no_python", SH, "-c", "touch {s}"], "--no_python"),
    (["--no-python"], "--no-python"),
    (["--no_python=1"], "--no_python"),
    (["-m", "os"], "'-m'"),
    (["--module"], "--module"),
    (["/tmp/evil.py"], "positional"),
    (["--main_training_function", "x"], "--main_training_function"),
    (["--tee", "3"], "--tee"),
    (["--deepspeed_hostfile", "/tmp/h"], "--deepspeed_hostfile"),
    (["--num_processes", "8"], "accelerate.num_processes"),
    (["--max_restarts", "-m"], "--max_restarts"),
    (["--dynamo_mode", "fast; rm -rf /"], "--dynamo_mode"),
    (["--unknown_flag"], "not an accelerate launch option"),
])
def test_f1_extra_args_that_change_what_runs_are_refused(tmp_path, extra, words):
    extra = [e.replace("{s}", str(tmp_path / "pwned")) for e in extra]
    with pytest.raises(CommandError) as info:
        build_command("lora", {}, AccelerateSettings(extra_args=extra), str(tmp_path / "job"))
    assert info.value.field == "accelerate.extra_args" and words in str(info.value)
    assert "\n" not in str(info.value)


def test_f1_allowed_extra_args_reach_accelerates_parser(tmp_path):
    from accelerate.commands.launch import launch_command_parser

    accel = AccelerateSettings.from_dict({"extra_args": "--same_network --dynamo-mode=max-autotune "
                                                        "--rdzv_backend static --max_restarts 0 -q"})
    cmd = build_command("lora", {}, accel, str(tmp_path / "j"))
    args = launch_command_parser().parse_args(cmd.argv[3:])
    assert args.same_network and args.dynamo_mode == "max-autotune" and args.rdzv_backend == "static"
    assert args.module and args.training_script == "sd_scripts.train_network" and not args.no_python


def test_f1_hostile_extra_args_from_imports_and_presets_are_refused_by_name(tmp_path):
    from kohya_gui.presets import import_kohya_json, load_preset

    kohya = tmp_path / "kohya.json"
    kohya.write_text(json.dumps({"extra_accelerate_launch_args": f"--no_python {SH} -c 'touch {tmp_path}/x'",
                                 "learning_rate": 0.0002}))
    values, unknown = import_kohya_json(str(kohya), "lora")
    assert "accelerate.extra_args" not in values and values["learning_rate"] == 0.0002
    assert any(u.startswith("extra_accelerate_launch_args (refused:") and "--no_python" in u for u in unknown)

    user = tmp_path / "user" / "lora"
    user.mkdir(parents=True)
    (user / "evil.json").write_text(json.dumps({"schema_version": 1, "name": "evil", "values": {
        "accelerate.extra_args": ["-m", "os"], "accelerate.num_processes": "many", "output_name": "x"}}))
    loaded = load_preset("lora", "evil", user_dir=str(tmp_path / "user"), make_demo=False)
    assert "accelerate.extra_args" not in loaded and loaded["output_name"] == "x"
    assert any(k.startswith("accelerate.extra_args (refused:") for k in loaded.unknown_keys)
    assert any(k.startswith("accelerate.num_processes (refused:") for k in loaded.unknown_keys)


def test_f1_extra_args_are_shown_in_preflight(tmp_path):
    from kohya_gui.preflight import run_preflight

    checks = run_preflight("lora", {"train_data_dir": str(tmp_path)}, AccelerateSettings(extra_args=[
        "--same_network"]), gpu_probe=lambda: [], check_trainer=False)
    shown = [c for c in checks if c.field == "accelerate.extra_args"]
    assert shown and "--same_network" in shown[0].message and shown[0].level == "warning"


# ------------------------------------------------------------------ 2. what the queue runs; the jobs folder

def test_f2_queue_runs_the_rebuilt_command_never_the_argv_on_disk(tmp_path, fake_build):
    sentinel = tmp_path / "pwned"
    m = _manager(tmp_path, fake_build)
    job = m.create("lora", {"output_name": "ok", "max_train_steps": 2}, AccelerateSettings())
    data = json.loads(Path(job.job_json).read_text())
    data["argv"] = [SH, "-c", f"touch {sentinel}"]  # someone who can write the job folder
    Path(job.job_json).write_text(json.dumps(data))
    assert _wait(lambda: m.get(job.id).status == "completed", m)
    assert not sentinel.exists()
    assert m.get(job.id).argv[0] == sys.executable and SH not in m.get(job.id).argv


def test_f2_settings_edited_on_disk_are_checked_again_at_launch(tmp_path, fake_build):
    sentinel = tmp_path / "pwned"
    m = _manager(tmp_path, fake_build)
    job = m.create("lora", {"output_name": "ok", "max_train_steps": 2}, AccelerateSettings())
    data = json.loads(Path(job.job_json).read_text())
    data["accel"]["extra_args"] = ["--no_python", SH, "-c", f"touch {sentinel}"]
    Path(job.job_json).write_text(json.dumps(data))
    second = m.create("lora", {"output_name": "ok", "max_train_steps": 2}, AccelerateSettings())
    with open(second.toml_path, "a") as f:
        f.write('\n[extra]\nnot_an_option = "x"\n')
    assert _wait(lambda: m.get(second.id).status == "failed", m)
    first = m.get(job.id)
    assert first.status == "failed" and first.pid is None and "accelerate.extra_args" in first.error_message
    assert "not_an_option" in m.get(second.id).error_message and m.get(second.id).pid is None
    assert not sentinel.exists()


def test_f2_jobs_folder_is_private_and_a_shared_one_is_refused(tmp_path, fake_build):
    m = _manager(tmp_path, fake_build)
    assert stat.S_IMODE(os.stat(m.jobs_dir).st_mode) == 0o700
    job = m.create("lora", {"output_name": "ok"}, AccelerateSettings())
    assert stat.S_IMODE(os.stat(job.job_dir).st_mode) == 0o700
    m.close()
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    with pytest.raises(JobsDirError, match="writable by group and others"):
        JobManager(str(shared))
    os.chmod(shared, 0o775)
    with pytest.raises(JobsDirError, match="chmod go-w"):
        JobManager(str(shared))
    result = subprocess.run([sys.executable, LAUNCHER, "--jobs_dir", str(shared), "--server_port", "1"],
                            capture_output=True, text=True, timeout=120, cwd=ROOT,
                            env=dict(os.environ, KOHYA_GUI_PASSWORD=""))
    assert result.returncode == 2 and "writable by group" in result.stderr
    assert not (shared / ".queue.lock").exists()


# ------------------------------------------------------------------ 3. the bind address

def test_f3_empty_listen_is_resolved_like_gradio_before_the_login_check(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    parse = cli.build_parser().parse_args
    error = cli.exposure_error(parse(["--listen", ""]))
    assert error and "0.0.0.0" in error
    assert cli.gradio_bind_address("") == "0.0.0.0"  # gradio: server_name or os.getenv("GRADIO_SERVER_NAME", ...)
    monkeypatch.setenv("GRADIO_SERVER_NAME", "")
    assert cli.exposure_error(parse(["--listen", ""]))  # "" binds every interface
    monkeypatch.delenv("GRADIO_SERVER_NAME")
    assert cli.exposure_error(parse(["--listen", ""])) is None  # 127.0.0.1
    config = tmp_path / "config.toml"
    config.write_text('[gui]\nlisten = ""\n')
    for args in (["--listen", ""], ["--config", str(config)]):
        result = subprocess.run([sys.executable, LAUNCHER, *args, "--jobs_dir", str(tmp_path / "jobs")],
                                capture_output=True, text=True, timeout=60, cwd=ROOT,
                                env=dict(os.environ, KOHYA_GUI_PASSWORD="", GRADIO_SERVER_NAME="0.0.0.0"))
        assert result.returncode == 2 and "refusing to listen on 0.0.0.0" in result.stderr, result.stderr
        assert not (tmp_path / "jobs").exists()


# ------------------------------------------------------------------ 4. Host / Origin; login rate limit

def test_f4_host_policy_rules():
    local = HostPolicy(bind="127.0.0.1", machine_names=frozenset({"box"}))
    assert local.allows("localhost") and local.allows("127.0.0.1") and local.allows("::1")
    assert not local.allows("evil.example") and not local.allows("box") and not local.allows("")
    wide = HostPolicy(bind="0.0.0.0", machine_names=frozenset({"box"}))
    assert wide.allows("192.168.1.5") and wide.allows("box") and not wide.allows("evil.example")
    assert HostPolicy(bind="127.0.0.1", share=True).allows("abc123.gradio.live")
    assert HostPolicy(bind="127.0.0.1", extra=frozenset({"gpu.lab"})).allows("gpu.lab")


def _request(port, method, path, host, headers=None, body=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        conn.putrequest(method, path, skip_host=True)
        conn.putheader("Host", host)
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        if body is not None:
            conn.putheader("Content-Type", "application/x-www-form-urlencoded")
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body.encode() if body is not None else None)
        response = conn.getresponse()
        return response.status, response.read().decode("utf-8", "replace")
    finally:
        conn.close()


def test_f4_foreign_host_and_origin_are_refused_and_logins_rate_limited(tmp_path):
    proc, port = start_server(["--username", "u", "--password", "p"], tmp_path)
    here = f"127.0.0.1:{port}"
    good = urllib.parse.urlencode({"username": "u", "password": "p"})
    bad = urllib.parse.urlencode({"username": "u", "password": "wrong"})
    try:
        status, body = _request(port, "GET", "/", f"evil.example:{port}")  # DNS rebinding
        assert status == 403 and "Host" in body and "--allowed_hosts" in body
        assert _request(port, "GET", "/", f"localhost:{port}")[0] == 200
        status, body = _request(port, "POST", "/login", here, {"Origin": "http://evil.example"}, good)
        assert status == 403 and "Origin" in body
        assert _request(port, "POST", "/login", here, {"Origin": "null"}, good)[0] == 403
        assert _request(port, "POST", "/login", here, {"Origin": f"http://{here}"}, good)[0] == 200
        statuses = [_request(port, "POST", "/login", here, {"Origin": f"http://{here}"}, bad)[0]
                    for _ in range(6)]
        assert statuses[:5] == [400] * 5 and statuses[5] == 429
        status, body = _request(port, "POST", "/login", here, {}, good)  # even the right password waits now
        assert status == 429 and "too many failed logins" in body
        assert _request(port, "GET", "/", here)[0] == 200  # still serving
        assert proc.poll() is None
    finally:
        stop_server(proc)


# ------------------------------------------------------------------ 5. corrupt job files and events

BAD_JOBS = {
    "a-list": "[]",
    "b-null": "null",
    "c-pid": {"pid": "x", "status": "running"},
    "d-created": {"created": "yesterday"},
    "e-queue": {"queue_index": "1"},
    "f-status": {"status": ["running"]},
    "g-id": {"id": "other"},
}


def _bad_job(jobs: Path, name: str, content) -> None:
    folder = jobs / name
    folder.mkdir(parents=True, mode=0o700)
    if isinstance(content, dict):
        content = json.dumps({"id": name, "kind": "lora", "status": "queued", **content})
    (folder / "job.json").write_text(content)


def test_f5_corrupt_jobs_are_listed_unreadable_and_never_stop_the_others(tmp_path, fake_build):
    jobs = tmp_path / "jobs"
    for name, content in BAD_JOBS.items():
        _bad_job(jobs, name, content)
    m = _manager(tmp_path, fake_build)  # re-attach must not raise
    good = m.create("lora", {"output_name": "ok", "max_train_steps": 3}, AccelerateSettings())
    assert _wait(lambda: m.get(good.id).status == "completed", m)
    unreadable = dict(m.unreadable())
    assert set(unreadable) == set(BAD_JOBS)
    assert "field 'pid'" in unreadable["c-pid"] and "field 'created'" in unreadable["d-created"]
    assert "field 'queue_index'" in unreadable["e-queue"] and "not an object" in unreadable["a-list"]
    assert [j.id for j in m.list()] == [good.id]
    from kohya_gui.tabs.jobs import JobsTab

    rows = JobsTab._rows(SimpleNamespace(ctx=SimpleNamespace(jobs=m, view=lambda job: m.view(job.id)),
                                         _queue_position=lambda job_id: 0))
    assert {r[0] for r in rows if r[3] == "unreadable"} == set(BAD_JOBS)


def test_f5_events_of_the_wrong_types_are_ignored(tmp_path, fake_build):
    from kohya_gui.app import AppContext

    ctx = AppContext(str(tmp_path / "jobs"))
    try:
        job = ctx.jobs.create("lora", {"output_name": "ok", "max_train_steps": 1}, AccelerateSettings())
        lines = [{"type": "sample", "step": "x", "paths": "notalist"}, {"type": "start", "total_steps": "x"},
                 {"type": "progress", "step": "x", "loss": "y"}, {"type": "done", "status": 5, "outputs": 5},
                 {"type": "error", "message": ["x"]}, {"type": "sample", "step": 2, "paths": [3, "a.png"]},
                 {"type": "progress", "step": 4, "total_steps": 8, "loss": 0.5}]
        Path(job.events_path).write_text("\n".join(json.dumps(e) for e in lines) + "\n[1,2]\nnot json\n")
        view = ctx.view(job)
        assert view.step == 4 and view.total_steps == 8 and view.fraction == 0.5 and view.outputs == []
        assert view.samples == [(2, "a.png", "")]
        assert ctx.jobs.view(job.id).step == 4
    finally:
        ctx.close()


# ------------------------------------------------------------------ 6. one queue runner; orphans

def test_f6_second_gui_is_a_read_only_viewer_until_the_runner_exits(tmp_path, fake_build):
    runner = _manager(tmp_path, fake_build)
    job = runner.create("lora", {"output_name": "ok", "max_train_steps": 2}, AccelerateSettings())
    viewer = _manager(tmp_path, fake_build)
    assert runner.is_runner and not viewer.is_runner
    with pytest.raises(JobError, match="another GUI"):
        viewer.create("lora", {"output_name": "ok"}, AccelerateSettings())
    with pytest.raises(JobError, match="only shows it"):
        viewer.cancel(job.id)
    viewer.tick()
    assert viewer.get(job.id).status == "queued"  # the viewer never starts the runner's queue
    runner.close()  # the runner GUI exits: the viewer takes over
    assert _wait(lambda: viewer.get(job.id).status == "completed", viewer)
    assert viewer.is_runner


def test_f6_deleting_a_running_jobs_folder_kills_its_run_before_the_next_starts(tmp_path, fake_build):
    m = _manager(tmp_path, fake_build)
    first = m.create("lora", {"output_name": "ignore_stop", "max_train_steps": 100000}, AccelerateSettings())
    second = m.create("lora", {"output_name": "ok", "max_train_steps": 2}, AccelerateSettings())
    assert _wait(lambda: (m.get(first.id).status == "running" and m.get(first.id).pid), m)
    pid, ctime = m.get(first.id).pid, m.get(first.id).create_time
    shutil.rmtree(first.job_dir)
    assert _wait(lambda: m.get(second.id).status == "completed", m)
    assert not process_alive(pid, ctime)


# ------------------------------------------------------------------ 7. smaller findings

@pytest.mark.parametrize("field, text", [("output_name", "lora\x7f"), ("training_comment", "a\x1b[2Jb"),
                                         ("sample_prompts_text", "a dog\x7f")])
def test_f7_del_and_control_characters_are_refused(tmp_path, field, text):
    with pytest.raises(CommandError) as info:
        build_command("lora", {field: text}, AccelerateSettings(), str(tmp_path))
    assert info.value.field == field and "control character" in str(info.value)


def test_f7_presets_with_wrong_types_name_the_key(tmp_path):
    from kohya_gui.presets import PresetError, load_preset

    user = tmp_path / "lora"
    user.mkdir()
    (user / "a.json").write_text(json.dumps({"schema_version": "1", "name": "a", "values": {}}))
    (user / "b.json").write_text(json.dumps({"schema_version": 1, "name": "b", "values": {
        "network_args": 5, "output_name": {"x": 1}, "sample_prompts_text": 3, "learning_rate": [1]}}))
    with pytest.raises(PresetError, match="schema_version"):
        load_preset("lora", "a", user_dir=str(tmp_path), make_demo=False)
    loaded = load_preset("lora", "b", user_dir=str(tmp_path), make_demo=False)
    assert {k.split(" ")[0] for k in loaded.unknown_keys} == {"network_args", "output_name", "sample_prompts_text",
                                                              "learning_rate"}


def test_f7_password_is_removed_from_the_environment_once_read(monkeypatch, tmp_path):
    monkeypatch.setenv("KOHYA_GUI_PASSWORD", "s3cret-pw")
    args = cli.resolve_args(cli.build_parser().parse_args(["--username", "u", "--jobs_dir", str(tmp_path)]))
    assert args.password == "s3cret-pw" and "KOHYA_GUI_PASSWORD" not in os.environ
    env = JobManager(str(tmp_path / "jobs"))._env()
    assert "s3cret-pw" not in env.values()


def test_f7_gallery_serves_only_images_inside_the_output_folder(tmp_path):
    from kohya_gui.app import AppContext

    out = tmp_path / "out"
    (out / "sample").mkdir(parents=True)
    inside = out / "sample" / "s.png"
    inside.write_bytes(b"\x89PNG fake")
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"private")
    (out / "sample" / "link.png").symlink_to(secret)
    (out / "notes.txt").write_text("x")
    ctx = AppContext(str(tmp_path / "jobs"))
    try:
        job = SimpleNamespace(id="j1", values={"output_dir": str(out)})
        items = [(str(inside), "ok"), (str(secret), "outside"), (str(out / "sample" / "link.png"), "link"),
                 (str(out / "notes.txt"), "not an image"), (str(out / "sample" / ".." / ".." / "secret.png"), "up")]
        served = ctx.gallery(job, items)
        assert [caption for _, caption in served] == ["ok"]
    finally:
        ctx.close()


def test_f7_preflight_checks_the_configured_python(tmp_path):
    from kohya_gui.app import AppContext
    from kohya_gui.gui_config import GuiConfig

    ctx = AppContext(str(tmp_path / "jobs"), GuiConfig(values={"gui": {"python": str(tmp_path / "nopython")}}))
    try:
        checks = ctx.preflight("lora", {"train_data_dir": str(tmp_path)}, AccelerateSettings(), "sd1")
        assert any(c.level == "error" and str(tmp_path / "nopython") in c.message for c in checks)
    finally:
        ctx.close()


def test_f7_events_are_read_incrementally(tmp_path, fake_build):
    m = _manager(tmp_path, fake_build)
    job = m.create("lora", {"output_name": "ok"}, AccelerateSettings())
    first = json.dumps({"type": "progress", "step": 1, "loss": 0.25}) + "\n"
    Path(job.events_path).write_text(first)
    assert m.view(job.id).loss_points == [(1, 0.25)]
    # rewrite the already-read line in place (same length): an incremental reader does not read it again
    with open(job.events_path, "r+") as f:
        f.write(first.replace("0.25", "0.75"))
    with open(job.events_path, "a") as f:
        f.write(json.dumps({"type": "progress", "step": 2, "loss": 0.5}) + "\n")
    assert m.view(job.id).loss_points == [(1, 0.25), (2, 0.5)]


def test_f7_presets_are_saved_through_unique_temporary_files(tmp_path):
    from kohya_gui.presets import save_preset

    folder = tmp_path / "lora"
    folder.mkdir()
    (folder / "mine.json.tmp").mkdir()  # a fixed temporary name would collide with this (or another writer)
    path = save_preset("lora", "mine", {"learning_rate": 0.0003}, user_dir=str(tmp_path))
    assert json.loads(Path(path).read_text())["values"] == {"learning_rate": 0.0003}
    assert [p.name for p in folder.iterdir() if p.name.startswith(".tmp-")] == []


# ------------------------------------------------------------------ remote use

def test_remote_file_browser_stays_inside_its_roots(tmp_path):
    root = tmp_path / "root"
    (root / "data" / "train").mkdir(parents=True)
    (root / "model.safetensors").write_bytes(b"x")
    (root / ".hidden").write_text("x")
    (root / "escape").symlink_to(tmp_path)
    browser = FileBrowser([str(root)])
    folder, entries = browser.listing("")
    assert folder == str(root.resolve())
    assert [(e.name, e.is_dir) for e in entries] == [("data", True), ("escape", True),
                                                     ("model.safetensors", False)]
    for outside in ("/etc", str(root / ".." ), str(root / "escape"), str(root / "data" / ".." / "..")):
        with pytest.raises(BrowseError, match="outside the folders"):
            browser.listing(outside)
    assert browser.parent(str(root)) == str(root.resolve())
    assert FileBrowser().roots == [os.path.realpath(os.path.expanduser("~"))]


def _zip(path: Path, entries: dict, links: dict | None = None) -> str:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in entries.items():
            z.writestr(name, data)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            z.writestr(info, target)
    return str(path)


def test_remote_dataset_zip_is_extracted_safely(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    browser = FileBrowser([str(root)])
    good = _zip(tmp_path / "dogs.zip", {"5_sks dog/a.png": b"png", "5_sks dog/a.txt": "sks dog"})
    target = extract_dataset_zip(good, str(root), browser)
    assert Path(target, "5_sks dog", "a.txt").read_text() == "sks dog"
    hostile = {
        "trav.zip": ({"../evil.txt": "x"}, None, "outside the folder"),
        "abs.zip": ({"/tmp/evil.txt": "x"}, None, "absolute"),
        "link.zip": ({"ok.txt": "x"}, {"l": "/etc/passwd"}, "link"),
        "big.zip": ({"a.bin": b"0" * 5000}, None, "MiB"),
    }
    for name, (entries, links, words) in hostile.items():
        with pytest.raises(UploadError, match=words):
            extract_dataset_zip(_zip(tmp_path / name, entries, links), str(root), browser, max_bytes=4096)
    assert sorted(p.name for p in root.iterdir()) == ["dogs"]  # nothing left behind
    assert not (tmp_path / "evil.txt").exists()
    with pytest.raises(BrowseError):
        extract_dataset_zip(good, str(tmp_path), browser)


def _tf_record(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + b"\0" * 4 + data + b"\0" * 4


def test_remote_tensorboard_scalars_are_shown_in_the_gui(tmp_path):
    from tensorboard.compat.proto import event_pb2

    from kohya_gui.app import AppContext

    logs = tmp_path / "logs" / "run1"
    logs.mkdir(parents=True)
    with open(logs / "events.out.tfevents.1.host", "wb") as f:
        for step, loss in ((1, 0.5), (2, 0.25)):
            event = event_pb2.Event(step=step)
            event.summary.value.add(tag="loss/current", simple_value=loss)
            f.write(_tf_record(event.SerializeToString()))
        f.write(b"\x01\x02")  # a torn last record
    ctx = AppContext(str(tmp_path / "jobs"))
    try:
        job = SimpleNamespace(values={"logging_dir": str(tmp_path / "logs")})
        assert ctx.scalars(job) == {"loss/current": [(1, 0.5), (2, 0.25)]}
    finally:
        ctx.close()


# ------------------------------------------------------------------ set-up output

def test_setup_declares_its_data_without_setuptools_warnings(tmp_path):
    result = subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path),
                             "build_py", "-d", str(tmp_path / "lib")], capture_output=True, text=True, cwd=ROOT,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "would be ignored" not in result.stderr and "absent from" not in result.stderr
    for data in ("kohya_gui/assets/style.css", "sd_scripts/families/sd/configs/sd1/unet.json",
                 "sd_scripts/models/configs/tokenizer/vocab.json", "sd_scripts/models/configs/t5_tokenizer/spiece.model",
                 "sd_scripts/models/configs/t5_tokenizer/LICENSE"):
        assert (tmp_path / "lib" / data).is_file(), data
