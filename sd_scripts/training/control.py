"""Stop / save-now / sample-now requests to a running trainer (ARCHITECTURE.md, principle 4).

Two channels, both only set flags; the training loop acts on them between steps:

1. Signals. `RunControl.install()` makes SIGINT and SIGTERM set the stop flag, so the loop finishes its step, saves
   the model (and state when enabled), emits `done: stopped` and exits 0. A second SIGINT within
   `force_quit_window_s` seconds of the first raises KeyboardInterrupt, so a user at a terminal can still force quit.
   `restore()` puts the previous handlers back.

2. Request files in the control folder (the job folder by default). The protocol, for the GUI and tools:

   - A request is an empty file named `stop`, `save` or `sample` directly inside the control folder. Its content is
     ignored. Write it atomically (temp file + rename; `request()` does this) so the trainer never sees a half-made
     file name.
   - The trainer looks at the folder at most every `poll_interval_s` seconds (main process only), takes each request
     by deleting its file, and acts on it once: `save` writes a model (and state when enabled) now, `sample` makes
     sample images now, `stop` stops gracefully as with SIGINT. A file that is gone means it was taken.
   - A request file that exists when training starts is honoured (a stop pressed while the model was loading).
   - Other files in the folder are left alone.

In multi-process runs only the main process polls; the loop shares the flags with `sync_flags`, which ORs them across
processes in one collective call, so every process stops/saves/samples at the same step.
"""
from __future__ import annotations

import os
import signal
import tempfile
import threading
import time
from typing import Any

REQUESTS = ("stop", "save", "sample")


def request(control_dir: str | os.PathLike, what: str) -> str:
    """Ask a running trainer to stop, save or sample: atomically create `<control_dir>/<what>`. Returns its path."""
    if what not in REQUESTS:
        raise ValueError(f"request must be one of {REQUESTS}, got {what!r}")
    control_dir = os.fspath(control_dir)
    os.makedirs(control_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{what}.", suffix=".tmp", dir=control_dir)
    os.close(fd)
    target = os.path.join(control_dir, what)
    os.replace(tmp, target)
    return target


class RunControl:
    """Stop/save/sample flags set by signals and request files. Cheap to `poll()` every step."""

    def __init__(self, control_dir: str | os.PathLike | None, poll_interval_s: float = 0.5,
                 force_quit_window_s: float = 5.0):
        self.control_dir = os.fspath(control_dir) if control_dir is not None else None
        self.poll_interval_s = poll_interval_s
        self.force_quit_window_s = force_quit_window_s
        self._stop = False
        self._save = False
        self._sample = False
        self._last_poll = float("-inf")
        self._last_sigint: float | None = None
        self._old_handlers: dict[int, Any] = {}
        self.stop_reason: str | None = None  # "SIGINT", "SIGTERM", "file" or "request"

    # ---- signals
    def install(self) -> "RunControl":
        """Make SIGINT/SIGTERM request a graceful stop. Only possible from the main thread; elsewhere a no-op."""
        if threading.current_thread() is not threading.main_thread():
            return self
        for signum in (signal.SIGINT, signal.SIGTERM):
            if signum not in self._old_handlers:
                self._old_handlers[signum] = signal.getsignal(signum)
                signal.signal(signum, self._on_signal)
        return self

    def restore(self) -> None:
        """Put back the handlers that were there before `install()`."""
        for signum, handler in self._old_handlers.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._old_handlers.clear()

    def _on_signal(self, signum: int, _frame: Any) -> None:
        now = time.monotonic()
        if signum == signal.SIGINT:
            if self._last_sigint is not None and now - self._last_sigint <= self.force_quit_window_s:
                raise KeyboardInterrupt("second Ctrl+C: forced quit without saving")
            self._last_sigint = now
        self._set_stop(signal.Signals(signum).name)

    # ---- files
    def poll(self, force: bool = False) -> list[str]:
        """Take request files from the control folder (at most every poll_interval_s unless `force`).

        Returns the names taken now (for logging); the flags keep them until taken with the methods below.
        """
        if self.control_dir is None:
            return []
        now = time.monotonic()
        if not force and now - self._last_poll < self.poll_interval_s:
            return []
        self._last_poll = now
        taken = []
        for name in REQUESTS:
            path = os.path.join(self.control_dir, name)
            try:
                os.remove(path)
            except FileNotFoundError:
                continue
            except OSError:  # e.g. a folder of that name or no permission: leave it, don't crash training
                continue
            taken.append(name)
            if name == "stop":
                self._set_stop("file")
            elif name == "save":
                self._save = True
            else:
                self._sample = True
        return taken

    # ---- flags
    def _set_stop(self, reason: str) -> None:
        if not self._stop:
            self.stop_reason = reason
        self._stop = True

    @property
    def stop_requested(self) -> bool:
        """True once a stop was asked for (it stays set)."""
        return self._stop

    def request_stop(self, reason: str = "request") -> None:
        """Set the stop flag from code (e.g. after `sync_flags` says another process was asked to stop)."""
        self._set_stop(reason)

    def take_save_request(self) -> bool:
        """True once per save request; clears it."""
        value, self._save = self._save, False
        return value

    def take_sample_request(self) -> bool:
        """True once per sample request; clears it."""
        value, self._sample = self._sample, False
        return value

    def __enter__(self) -> "RunControl":
        return self.install()

    def __exit__(self, *exc: Any) -> None:
        self.restore()


def sync_flags(accelerator: Any, flags: dict[str, bool]) -> dict[str, bool]:
    """OR boolean flags across all processes in one collective call; every process must pass the same keys.

    With one process (or without torch.distributed set up) the flags come back unchanged and nothing collective
    happens. Works with gloo (CPU) and NCCL (the tensor goes on `accelerator.device`).
    """
    if getattr(accelerator, "num_processes", 1) <= 1:
        return dict(flags)
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return dict(flags)
    keys = sorted(flags)
    device = _collective_device(accelerator, dist)
    values = torch.tensor([1 if flags[k] else 0 for k in keys], dtype=torch.int32, device=device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return {k: bool(v) for k, v in zip(keys, values.tolist())}


def _collective_device(accelerator: Any, dist: Any) -> Any:
    """The device the process group's collectives use: CPU for gloo, the accelerator's device otherwise."""
    import torch

    if dist.get_backend() == "gloo":
        return torch.device("cpu")
    return getattr(accelerator, "device", torch.device("cpu"))

