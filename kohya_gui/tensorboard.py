"""Start and stop one TensorBoard server on a free local port (argument list, never a shell).

TensorBoard listens on 127.0.0.1 only: its logs may name private paths, and it has no login of its own.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def tensorboard_argv(logdir: str, port: int) -> list[str]:
    """The TensorBoard command: the `tensorboard` next to this python, else `python -m tensorboard.main`."""
    exe = os.path.join(os.path.dirname(sys.executable), "tensorboard")
    if not os.path.isfile(exe):
        exe = shutil.which("tensorboard") or ""
    head = [exe] if exe else [sys.executable, "-m", "tensorboard.main"]
    return head + ["--logdir", logdir, "--host", "127.0.0.1", "--port", str(port)]


class TensorBoard:
    """One TensorBoard process shared by the GUI; `start` replaces a running one with the new logdir."""

    def __init__(self):
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self.url: str | None = None
        self.logdir: str | None = None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, logdir: str) -> str:
        """Start TensorBoard on `logdir` (created if missing) and return its URL. ValueError for an empty path."""
        if not logdir or not str(logdir).strip():
            raise ValueError("set 'Logging dir' (Folders) first: TensorBoard shows the logs written there")
        logdir = os.path.abspath(str(logdir).strip())
        os.makedirs(logdir, exist_ok=True)
        with self._lock:
            self._stop_locked()
            port = free_port()
            self._proc = subprocess.Popen(tensorboard_argv(logdir, port), stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                          start_new_session=True)
            self.url, self.logdir = f"http://127.0.0.1:{port}/", logdir
            return self.url

    def stop(self) -> None:
        with self._lock:
            self._stop_locked()

    def _stop_locked(self) -> None:
        proc, self._proc, self.url, self.logdir = self._proc, None, None, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        deadline = time.monotonic() + 5
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
