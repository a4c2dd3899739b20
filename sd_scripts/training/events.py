"""The trainer's event stream: one JSON object per line in `--events_file` (ARCHITECTURE.md, principle 3).

Every line has `type` and `time` (unix seconds, float) plus the fields of its type:

- `start`: a run summary (images, steps, model family, ...), whatever the trainer passes.
- `progress`: step, total_steps, epoch, total_epochs, loss, avg_loss, lr, it_per_s, eta_s (plus the method's
  step metrics, e.g. keys_scaled, avg_key_norm, max_key_norm with scale_weight_norms).
- `sample`: step, epoch, paths, prompts.
- `save`: path, kind (e.g. "final", "epoch", "step", "state"), plus free fields (step, epoch).
- `validation`: kind ("step" after validate_every_n_steps, "epoch" at an epoch's end), step, epoch, loss (mean over the
  held-out batches and the fixed timesteps), divergence (loss minus the recent training loss, or null), batches,
  timesteps (training/validation.py).
- `warning` / `error`: message, hint.
- `done`: status ("completed" | "stopped" | "failed"), outputs (list of paths), plus free fields.

Non-finite floats (NaN, +-inf) are written as `null`, so every line is strict JSON. Tensors and numpy scalars are
written as plain numbers. The file is opened once in append mode and line-buffered: each event reaches the OS as one
write of one whole line (readers may still see a partial last line while it is being written; `read_events` and
`tail_events` skip it). There is no fsync per event: losing the last lines on a power cut is acceptable.

This module is torch-free so the GUI and tools can import `read_events` / `tail_events`.
"""
from __future__ import annotations

import json
import math
import os
import threading
import time
from typing import Any, Iterable

DONE_STATUSES = ("completed", "stopped", "failed")


def _plain(value: Any) -> Any:
    """Convert a value to something `json.dumps(allow_nan=False)` accepts; non-finite floats become None."""
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    item = getattr(value, "item", None)  # torch tensors with one element, numpy scalars
    if callable(item) and getattr(value, "ndim", 0) == 0:
        try:
            return _plain(item())
        except (TypeError, ValueError, RuntimeError):
            pass
    tolist = getattr(value, "tolist", None)  # small arrays
    if callable(tolist):
        return _plain(tolist())
    return str(value)


class EventWriter:
    """Appends events to a JSON-lines file. With `path=None` or `enabled=False` (non-main processes) it does nothing.

    Thread-safe; cheap enough to call every step (one short write, no fsync).
    """

    def __init__(self, path: str | os.PathLike | None, enabled: bool = True):
        self.path = os.fspath(path) if path is not None else None
        self.enabled = bool(enabled and path is not None)
        self._lock = threading.Lock()
        self._file = None
        if self.enabled:
            folder = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(folder, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8", buffering=1, newline="\n")

    # ---- generic
    def emit(self, type: str, **fields: Any) -> None:  # noqa: A002 - "type" is the field's name in the file
        """Write one event line: {"type": type, "time": now, **fields}. A no-op when disabled or closed."""
        if self._file is None:
            return
        record = {"type": type, "time": time.time()}
        record.update({k: _plain(v) for k, v in fields.items()})
        line = json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n"
        with self._lock:
            if self._file is not None:
                self._file.write(line)

    # ---- typed helpers (the names the GUI relies on)
    def start(self, **summary: Any) -> None:
        """Run summary: images, steps, epochs, model family, trainer, ..."""
        self.emit("start", **summary)

    def progress(self, step: int, total_steps: int, epoch: int, total_epochs: int, loss: float | None,
                 avg_loss: float | None, lr: float | None, it_per_s: float | None, eta_s: float | None,
                 **metrics: Any) -> None:
        """Progress after an optimizer step; `metrics`: the method's extra scalars (e.g. keys_scaled,
        avg_key_norm, max_key_norm with scale_weight_norms)."""
        self.emit("progress", step=step, total_steps=total_steps, epoch=epoch, total_epochs=total_epochs, loss=loss,
                  avg_loss=avg_loss, lr=lr, it_per_s=it_per_s, eta_s=eta_s, **metrics)

    def sample(self, step: int, epoch: int | None, paths: Iterable[str], prompts: Iterable[str]) -> None:
        """Sample images were written."""
        self.emit("sample", step=step, epoch=epoch, paths=list(paths), prompts=list(prompts))

    def save(self, path: str, kind: str, **fields: Any) -> None:
        """A model or state folder was saved (kind: final, epoch, step, state, ...; extra fields e.g. step, epoch)."""
        self.emit("save", path=path, kind=kind, **fields)

    def validation(self, **fields: Any) -> None:
        """Validation results (kind, step, epoch, loss, divergence, batches, timesteps)."""
        self.emit("validation", **fields)

    def warning(self, message: str, hint: str = "") -> None:
        """Something the user should know; training goes on."""
        self.emit("warning", message=message, hint=hint)

    def error(self, message: str, hint: str = "") -> None:
        """The run cannot go on: what went wrong and how to fix it."""
        self.emit("error", message=message, hint=hint)

    def done(self, status: str, outputs: Iterable[str] = (), **fields: Any) -> None:
        """The last event of a run: status is completed, stopped or failed."""
        if status not in DONE_STATUSES:
            raise ValueError(f"done status must be one of {DONE_STATUSES}, got {status!r}")
        self.emit("done", status=status, outputs=list(outputs), **fields)

    def close(self) -> None:
        """Close the file; later events are ignored."""
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def __enter__(self) -> "EventWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _parse_lines(data: bytes) -> tuple[list[dict], int]:
    """Complete lines of `data` -> (events, bytes consumed). A trailing line without newline is left unconsumed
    unless it parses (a finished last line whose newline was lost). Lines that are not JSON objects are skipped."""
    events: list[dict] = []
    consumed = 0
    while consumed < len(data):
        end = data.find(b"\n", consumed)
        last = end < 0
        chunk = data[consumed:] if last else data[consumed:end]
        try:
            record = json.loads(chunk.decode("utf-8")) if chunk.strip() else None
        except (UnicodeDecodeError, ValueError):
            record = None
            if last:  # probably still being written
                break
        if isinstance(record, dict):
            events.append(record)
        consumed = len(data) if last else end + 1
    return events, consumed


def read_events(path: str | os.PathLike) -> list[dict]:
    """All events in a file (tolerates a partial last line). A missing file gives []."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    return _parse_lines(data)[0]


def tail_events(path: str | os.PathLike, offset: int = 0) -> tuple[list[dict], int]:
    """Events written since byte `offset` -> (events, new offset). Call again with the new offset to follow the file;
    a partial last line is returned on a later call once it is complete. A file shorter than `offset` (replaced) is
    read from the start."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            if size < offset:
                offset = 0
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], 0
    events, consumed = _parse_lines(data)
    return events, offset + consumed
