"""Pure rendering of a run for the run monitor: progress bar HTML, status, loss table, gallery items, outputs.

No gradio and no file access here (except listing nothing): these take a `monitor.RunView` plus the job's status and
return strings / lists, so they are unit-tested directly.
"""
from __future__ import annotations

import html
import os
from typing import Any

from kohya_gui.monitor import RunView

STATUS_COLOURS = {"running": "#2563eb", "completed": "#16a34a", "stopped": "#d97706", "failed": "#dc2626",
                  "queued": "#6b7280", "cancelled": "#6b7280", "stopping": "#d97706"}


def progress_html(view: RunView, status: str) -> str:
    """A progress bar with 'step s / total (p %)', epoch, it/s and ETA."""
    percent = int(round(view.fraction * 100))
    if status == "completed" and view.total_steps:
        percent = 100 if view.step >= view.total_steps else percent
    colour = STATUS_COLOURS.get(status, "#2563eb")
    parts = [f"step {view.step} / {view.total_steps if view.total_steps else '?'}", f"{percent} %"]
    if view.total_epochs:
        parts.append(f"epoch {view.epoch} / {view.total_epochs}")
    if view.it_per_s:
        parts.append(f"{view.it_per_s:.2f} it/s" if view.it_per_s >= 1 else f"{1 / view.it_per_s:.2f} s/it")
    if view.eta_text and status == "running":
        parts.append(f"ETA {view.eta_text}")
    if view.loss is not None:
        parts.append(f"loss {view.loss:.4f}")
    return (f'<div class="kg-progress" data-status="{html.escape(status)}" data-percent="{percent}">'
            f'<div class="kg-bar"><div class="kg-fill" style="width:{percent}%;background:{colour}"></div></div>'
            f'<div class="kg-progress-text">{html.escape(" · ".join(parts))}</div></div>')


def status_markdown(job: Any, view: RunView) -> str:
    """Heading with the job's name and status; on failure the exit code, the trainer's error and its hint."""
    status = job_status(job)
    lines = [f"### {html.escape(str(getattr(job, 'name', '') or job.id))} — **{status}**",
             f"`{job.id}` · {getattr(job, 'kind', '')} · folder `{getattr(job, 'job_dir', '')}`"]
    if status == "failed":
        code = getattr(job, "exit_code", None)
        lines.append(f"**Exit code:** `{code}`" if code is not None else "**Exit code:** unknown (process vanished)")
        if view.error_message:
            lines.append(f"**Error:** {html.escape(view.error_message)}")
        if view.error_hint:
            lines.append(f"**Hint:** {html.escape(view.error_hint)}")
        message = getattr(job, "message", None) or getattr(job, "error", None)
        if message and message != view.error_message:
            lines.append(f"**Job:** {html.escape(str(message))}")
    for warning in view.warnings[-5:]:
        lines.append(f"⚠️ {html.escape(warning)}")
    return "\n\n".join(lines)


def job_status(job: Any) -> str:
    return str(getattr(job, "status", "unknown"))


def loss_rows(view: RunView) -> list[tuple[int, float, str]]:
    """(step, loss, series) rows: the raw losses, their moving average and the validation loss (its own line)."""
    rows = [(step, loss, "loss") for step, loss in view.loss_points]
    rows += [(step, loss, "smoothed") for step, loss in view.smoothed]
    rows += [(step, loss, "validation") for step, loss in view.validation_points]
    return rows


def gallery_items(view: RunView) -> list[tuple[str, str]]:
    """(image path, caption) of the samples that exist, newest first."""
    items = []
    for step, path, prompt in reversed(view.samples):
        if os.path.isfile(path):
            items.append((path, f"step {step}: {prompt}" if prompt else f"step {step}"))
    return items


def outputs_markdown(view: RunView, output_dir: str | None) -> str:
    """Where the results are: the saved models (final first) and the output folder."""
    lines = []
    seen = set()
    for path in view.outputs + [p for _, p in reversed(view.saves)]:
        if path and path not in seen:
            seen.add(path)
            exists = "" if os.path.exists(path) else " (missing)"
            lines.append(f"- `{path}`{exists}")
    if output_dir:
        lines.append(f"\nOutput folder: `{output_dir}`")
    return "**Outputs**\n\n" + "\n".join(lines) if lines else ""
