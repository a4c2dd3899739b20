"""Turn a run's files into what the GUI shows: events.jsonl -> progress, loss series, samples; log.txt -> its tail.

Torch-free and incremental: `EventTail` remembers its byte offset, so the UI reads only what is new each second.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

EMA_ALPHA = 0.1  # weight of the newest loss in the smoothed curve
MAX_LOSS_POINTS = 20000
MAX_LINE_BYTES = 1 << 20  # keep memory bounded on very long runs (older points are thinned)


class EventTail:
    """Reads new complete JSON lines from an events file. A partial last line waits for the next `read()`.

    Tolerates a missing file (no events yet), garbage lines (skipped) and a file that was replaced by a shorter one
    (read again from the start).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.offset = 0
        self._pending = b""
        self.restarted = False  # the last read() started again from the top (file replaced or truncated)

    def read(self) -> list[dict[str, Any]]:
        """Events appended since the last call."""
        self.restarted = False
        try:
            with open(self.path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                self.restarted = size < self.offset
                if self.restarted:  # replaced or truncated
                    self.offset, self._pending = 0, b""
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        data = self._pending + data
        lines = data.split(b"\n")
        self._pending = lines.pop()  # b"" when data ended with a newline
        if len(self._pending) > MAX_LINE_BYTES:  # no event is that long: drop the garbage, keep memory bounded
            self._pending = b""
        events = []
        for line in lines:
            record = _parse(line)
            if record is not None:
                events.append(record)
        return events


def _parse(line: bytes) -> dict | None:
    if not line.strip():
        return None
    try:
        record = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return record if isinstance(record, dict) and "type" in record else None


@dataclass
class RunView:
    """Everything the run panel shows, built from events (`update`) plus the job status and log tail."""

    status: str = "queued"
    step: int = 0
    total_steps: int | None = None
    epoch: int = 0
    total_epochs: int | None = None
    it_per_s: float | None = None
    eta_s: float | None = None
    loss: float | None = None
    avg_loss: float | None = None
    lr: float | None = None
    loss_points: list[tuple[int, float]] = field(default_factory=list)
    smoothed: list[tuple[int, float]] = field(default_factory=list)  # EMA of loss_points
    samples: list[tuple[int, str, str]] = field(default_factory=list)  # (step, image path, prompt)
    saves: list[tuple[str, str]] = field(default_factory=list)  # (kind, path)
    warnings: list[str] = field(default_factory=list)
    validations: list[dict[str, Any]] = field(default_factory=list)
    validation_points: list[tuple[int, float]] = field(default_factory=list)  # (step, validation loss)
    start: dict[str, Any] = field(default_factory=dict)  # the run summary of the start event
    error_message: str | None = None
    error_hint: str | None = None
    done_status: str | None = None
    outputs: list[str] = field(default_factory=list)
    log_tail: str = ""

    @property
    def fraction(self) -> float:
        """Progress 0..1 (0 when the total is not known yet)."""
        return min(1.0, self.step / self.total_steps) if self.total_steps else 0.0

    @property
    def eta_text(self) -> str:
        """'1h 02m 03s' style ETA, '' when unknown."""
        return format_duration(self.eta_s)


def format_duration(seconds: float | None) -> str:
    """Seconds -> '1h 02m 03s' / '2m 05s' / '7s'; '' for None."""
    if seconds is None:
        return ""
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    if h:
        return f"{h}h {m:02d}m {s:02d}s"
    return f"{m}m {s:02d}s" if m else f"{s}s"


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _texts(value: Any) -> list[str]:
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def update(view: RunView, events: Iterable[dict[str, Any]]) -> RunView:
    """Apply events to `view` in place (and return it). Unknown event types, missing fields and fields of the wrong
    type (the file is written by another process and may be damaged) are ignored, never raised."""
    for ev in events:
        if isinstance(ev, dict):
            _apply(view, ev)
    return view


def _apply(view: RunView, ev: dict[str, Any]) -> None:
    kind = ev.get("type")
    if kind == "start":
        view.start = {k: v for k, v in ev.items() if k not in ("type", "time")}
        view.total_steps = _int(ev.get("total_steps", ev.get("steps"))) or view.total_steps
        view.total_epochs = _int(ev.get("total_epochs", ev.get("epochs"))) or view.total_epochs
        if view.status == "queued":
            view.status = "running"
    elif kind == "progress":
        _progress(view, ev)
    elif kind == "sample":
        prompts = ev.get("prompts") if isinstance(ev.get("prompts"), list) else []
        step = _int(ev.get("step")) or 0
        for i, path in enumerate(_texts(ev.get("paths"))):
            prompt = prompts[i] if i < len(prompts) and isinstance(prompts[i], str) else ""
            view.samples.append((step, path, prompt))
    elif kind == "save":
        view.saves.append((_text(ev.get("kind")), _text(ev.get("path"))))
    elif kind == "validation":
        view.validations.append({k: v for k, v in ev.items() if k != "type"})
        step, loss = _int(ev.get("step")), _num(ev.get("loss"))
        # an epoch's validation right after a step's one has the same weights: one point
        if step is not None and loss is not None and (step, loss) not in view.validation_points[-1:]:
            view.validation_points.append((step, loss))
    elif kind == "warning":
        message, hint = _text(ev.get("message")), _text(ev.get("hint"))
        view.warnings.append(f"{message} ({hint})" if hint else message)
    elif kind == "error":
        view.error_message = _text(ev.get("message")) or view.error_message
        view.error_hint = _text(ev.get("hint")) or view.error_hint
    elif kind == "done":
        status = ev.get("status")
        view.done_status = status if status in ("completed", "stopped", "failed") else view.done_status
        view.outputs = _texts(ev.get("outputs"))


def _progress(view: RunView, ev: dict[str, Any]) -> None:
    for name in ("step", "epoch"):
        if isinstance(ev.get(name), int):
            setattr(view, name, ev[name])
    for name in ("total_steps", "total_epochs"):
        if isinstance(ev.get(name), int):
            setattr(view, name, ev[name])
    view.it_per_s, view.eta_s = _num(ev.get("it_per_s")), _num(ev.get("eta_s"))
    view.lr, view.avg_loss = _num(ev.get("lr")), _num(ev.get("avg_loss"))
    loss = _num(ev.get("loss"))
    view.loss = loss
    if loss is None:  # NaN is written as null: keep the chart going without it
        return
    view.loss_points.append((view.step, loss))
    previous = view.smoothed[-1][1] if view.smoothed else loss
    view.smoothed.append((view.step, previous + EMA_ALPHA * (loss - previous)))
    if len(view.loss_points) > MAX_LOSS_POINTS:
        view.loss_points = view.loss_points[::2]
        view.smoothed = view.smoothed[::2]


def read_log_tail(path: str | os.PathLike, n_lines: int = 40, max_bytes: int = 256 * 1024) -> str:
    """The last `n_lines` lines of a log, reading at most `max_bytes` from its end. tqdm's carriage-return updates
    collapse to their latest state. A missing file gives ''."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except (FileNotFoundError, IsADirectoryError):
        return ""
    text = data.decode("utf-8", errors="replace")
    lines = [line.rsplit("\r", 1)[-1] if "\r" in line.rstrip("\r") else line.rstrip("\r")
             for line in text.split("\n")]
    if lines and lines[-1] == "":
        lines.pop()
    return "\n".join(lines[-n_lines:])


#: a tqdm bar's counter: "  40%|████      | 4/10 [00:01<00:02, 2.9it/s]"
_TQDM_COUNT = re.compile(r"\|\s*(\d+)/(\d+)\s*\[")


def log_progress(log_text: str) -> tuple[int, int] | None:
    """(done, total) of the last tqdm bar in a log, or None: the progress of a tool that writes no events."""
    found = None
    for found in _TQDM_COUNT.finditer(log_text):
        pass
    if found is None or int(found.group(2)) <= 0:
        return None
    return int(found.group(1)), int(found.group(2))


def view_from_files(events_path: str, log_path: str | None = None, status: str = "running") -> RunView:
    """A RunView built from scratch from a job's files (e.g. for a finished job)."""
    view = update(RunView(status=status), EventTail(events_path).read())
    if log_path:
        view.log_tail = read_log_tail(log_path)
    return view
