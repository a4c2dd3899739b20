"""kohya_gui.py: refuses to expose an unauthenticated server, --help stays light, login protects page and API."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from http.cookiejar import CookieJar
from pathlib import Path

import pytest

from kohya_gui.cli import build_parser, exposure_error, is_loopback

ROOT = Path(__file__).resolve().parent.parent
LAUNCHER = str(ROOT / "kohya_gui.py")
HEAVY = ("torch", "diffusers", "transformers", "accelerate")


def run_launcher(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ, KOHYA_GUI_PASSWORD="")
    return subprocess.run([sys.executable, LAUNCHER, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=env)


@pytest.mark.parametrize("args, words", [
    (["--listen", "0.0.0.0"], "refusing to listen on 0.0.0.0"),
    (["--listen", "192.168.1.5", "--username", "u"], "--username and --password"),
    (["--share"], "refusing --share"),
    (["--share", "--password", "p"], "--username and --password"),
])
def test_refuses_unauthenticated_exposure(args, words, tmp_path):
    result = run_launcher(*args, "--jobs_dir", str(tmp_path / "jobs"))
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and words in lines[0], result.stderr
    assert not (tmp_path / "jobs").exists()  # refused before doing anything


def test_exposure_rules():
    parse = build_parser().parse_args
    assert exposure_error(parse([])) is None
    assert exposure_error(parse(["--listen", "localhost"])) is None
    assert exposure_error(parse(["--listen", "::1"])) is None
    assert exposure_error(parse(["--listen", "0.0.0.0", "--username", "u", "--password", "p"])) is None
    assert exposure_error(parse(["--listen", "0.0.0.0", "--insecure"])) is None
    assert exposure_error(parse(["--share", "--insecure"])) is None
    assert exposure_error(parse(["--listen", "0.0.0.0"])) is not None
    assert exposure_error(parse(["--share"])) is not None
    assert is_loopback("127.0.0.2") and not is_loopback("0.0.0.0") and not is_loopback("example.org")


def test_help_is_light():
    result = subprocess.run([sys.executable, "-X", "importtime", LAUNCHER, "--help"], capture_output=True,
                            text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0 and "--listen" in result.stdout and "--insecure" in result.stdout
    modules = {line.split("|")[-1].strip().split(".")[0] for line in result.stderr.splitlines() if "|" in line}
    for name in HEAVY + ("gradio",):
        assert name not in modules, f"--help imported {name}"


def test_missing_config_file_is_one_line(tmp_path):
    result = run_launcher("--config", str(tmp_path / "nope.toml"), "--jobs_dir", str(tmp_path / "jobs"))
    assert result.returncode == 2 and "does not exist" in result.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: list[str], tmp_path: Path, timeout: float = 90) -> tuple[subprocess.Popen, int]:
    """Start kohya_gui.py on a free port; return once it serves."""
    port = free_port()
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([sys.executable, LAUNCHER, "--server_port", str(port), "--headless",
                             "--jobs_dir", str(tmp_path / "jobs"), *args], stdout=log, stderr=subprocess.STDOUT,
                            cwd=ROOT, env=dict(os.environ, KOHYA_GUI_PASSWORD=""))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError((tmp_path / "server.log").read_text())
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
            return proc, port
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("server did not start: " + (tmp_path / "server.log").read_text())


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def get(url: str, opener=None) -> tuple[int, str]:
    try:
        with (opener or urllib.request.build_opener()).open(url, timeout=10) as r:
            return r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")


def test_login_protects_page_and_api(tmp_path):
    proc, port = start_server(["--listen", "0.0.0.0", "--username", "u", "--password", "p"], tmp_path)
    base = f"http://127.0.0.1:{port}"
    try:
        status, page = get(base + "/")
        assert '"auth_required":true' in page.replace(" ", "")
        for secret_word in ("Pretrained model", "learning_rate", "Start", "network_dim"):
            assert secret_word not in page, f"the login page leaks {secret_word!r}"
        assert len(page) < 50_000
        for path in ("/config", "/gradio_api/info", "/gradio_api/queue/status"):
            status, body = get(base + path)
            assert status in (401, 403, 404) and "Pretrained" not in body, (path, status)
        jar = CookieJar()
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
        bad = urllib.parse.urlencode({"username": "u", "password": "wrong"}).encode()
        assert get_post(opener, base + "/login", bad) >= 400
        good = urllib.parse.urlencode({"username": "u", "password": "p"}).encode()
        assert get_post(opener, base + "/login", good) == 200
        status, config = get(base + "/config", opener)
        assert status == 200 and "Pretrained model" in config
    finally:
        stop_server(proc)


def get_post(opener, url: str, data: bytes) -> int:
    try:
        with opener.open(url, data=data, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
