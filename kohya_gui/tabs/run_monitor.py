"""The run monitor beside the tabs: progress bar, status (exit code and error on failure), loss chart, sample
gallery, log tail and outputs of the watched job, refreshed by one gr.Timer.

Each tick reads only what is new in the job's events.jsonl (`AppContext.view`) and sends only the parts that changed
(`gr.skip()` for the rest). A tick still costs the browser work in proportion to the page (it holds every option of
every trainer: ~0.1 CPU-s per tick in Chromium, measured), so the timer runs fast only while the shown job is queued
or running and slowly otherwise (to notice runs started from elsewhere); a change of the watched job (Start, Queue,
a tool, the Jobs tab) wakes it at once.
"""
from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import gradio as gr

from . import render

if TYPE_CHECKING:
    from kohya_gui.app import AppContext

TICK_S = 1.0  # while the shown job is queued or running
IDLE_TICK_S = 5.0  # otherwise
LIVE = ("queued", "running")
LOG_LINES = 40
EMPTY_TEXT = "No run yet. Configure a training tab and press **Start**; runs of earlier sessions appear under **Jobs**."


def _digest(value: Any) -> str:
    return hashlib.sha1(repr(value).encode("utf-8", "replace")).hexdigest()


class RunMonitor:
    """Widgets of the watched run, and the tick that refreshes them."""

    PARTS = ("status", "progress", "plot", "gallery", "log", "outputs")

    def __init__(self, ctx: "AppContext", watched: gr.State):
        self.ctx, self.watched = ctx, watched
        with gr.Column(elem_id="run-monitor"):
            self.status = gr.Markdown(EMPTY_TEXT, elem_id="run-status")
            self.progress = gr.HTML(render.progress_html(_empty_view(), "queued"), elem_id="run-progress")
            self.plot = gr.LinePlot(x="step", y="loss", color="series", label="Loss", height=280,
                                    color_map={"loss": "#93c5fd", "smoothed": "#1d4ed8"}, elem_id="run-loss")
            self.gallery = gr.Gallery(label="Samples (newest first)", columns=3, height=300, elem_id="run-samples",
                                      interactive=False)
            self.log = gr.Textbox(label="Log (tail)", lines=10, max_lines=10, autoscroll=True, interactive=False,
                                  elem_id="run-log")
            self.outputs = gr.Markdown(elem_id="run-outputs")
            with gr.Accordion("TensorBoard scalars (read from the run's logging_dir)", open=False,
                              elem_id="run-tb"):
                self.tb_tag = gr.Dropdown([], label="Scalar", elem_id="run-tb-tag")
                self.tb_refresh = gr.Button("Refresh", elem_id="run-tb-refresh")
                self.tb_plot = gr.LinePlot(x="step", y="value", label="Scalar", height=240, elem_id="run-tb-plot")
                self.tb_message = gr.Markdown(elem_id="run-tb-message")
        self.tb_refresh.click(self.scalars, [self.watched, self.tb_tag], [self.tb_tag, self.tb_plot,
                                                                          self.tb_message], show_progress="hidden")
        self.tb_tag.input(self.scalars, [self.watched, self.tb_tag], [self.tb_tag, self.tb_plot, self.tb_message],
                          show_progress="hidden")
        self.signature = gr.State({})
        self.timer = gr.Timer(IDLE_TICK_S)
        outputs = [self.status, self.progress, self.plot, self.gallery, self.log, self.outputs, self.signature,
                   self.timer]
        self.timer.tick(self.tick, [self.watched, self.signature], outputs, show_progress="hidden", queue=False)
        # a new watched job (Start, Queue, a tool, the Jobs tab): show it now and tick fast while it lives
        self.watched.change(self.tick, [self.watched, self.signature], outputs, show_progress="hidden",
                            queue=False)

    def tick(self, watched: str | None, signature: dict):
        job = self.ctx.job_to_show(watched)
        if job is None:
            timer = self._interval(signature, IDLE_TICK_S)
            return [*(gr.skip() for _ in self.PARTS), {**signature, "interval": IDLE_TICK_S}, timer]
        view = self.ctx.view(job)
        status = render.job_status(job)
        interval = TICK_S if status in LIVE else IDLE_TICK_S
        parts = {
            "status": render.status_markdown(job, view),
            "progress": render.progress_html(view, status),
            "plot": ("rows", job.id, len(view.loss_points), view.loss_points[-1:] if view.loss_points else None,
                     len(view.validation_points)),
            "gallery": ("samples", job.id, len(view.samples)),
            "log": self.ctx.log_tail(job, LOG_LINES),
            "outputs": render.outputs_markdown(view, self.ctx.output_dir(job)),
        }
        new_signature = {name: _digest(value) for name, value in parts.items()}
        timer = self._interval(signature, interval)
        new_signature["interval"] = interval
        out = []
        for name in self.PARTS:
            if signature.get(name) == new_signature[name]:
                out.append(gr.skip())
            elif name == "plot":
                out.append(self._plot_value(view))
            elif name == "gallery":
                out.append(self.ctx.gallery(job, render.gallery_items(view)))
            else:
                out.append(parts[name])
        return [*out, new_signature, timer]

    @staticmethod
    def _interval(signature: dict, interval: float):
        """The timer's update: skipped while its interval stays the same."""
        return gr.skip() if signature.get("interval", IDLE_TICK_S) == interval else gr.Timer(interval)

    def scalars(self, watched: str | None, tag: str | None):
        """The watched job's TensorBoard scalars: tag choices and the chosen tag's curve."""
        import pandas as pd  # already loaded by gradio

        job = self.ctx.job_to_show(watched)
        series = self.ctx.scalars(job) if job is not None else {}
        if not series:
            return gr.update(choices=[], value=None), None, "No TensorBoard scalars yet (set Logging dir)."
        tag = tag if tag in series else sorted(series)[0]
        frame = pd.DataFrame(series[tag], columns=["step", "value"]).astype({"step": "int64", "value": "float64"})
        return gr.update(choices=sorted(series), value=tag), frame, f"{len(series[tag])} points of `{tag}`."

    @staticmethod
    def _plot_value(view):
        import pandas as pd  # already loaded by gradio

        rows = render.loss_rows(view)
        if not rows:  # an empty frame has untyped columns: the chart would keep treating the axes as categories
            return None
        frame = pd.DataFrame(rows, columns=["step", "loss", "series"])
        return frame.astype({"step": "int64", "loss": "float64", "series": "str"})


def _empty_view():
    from kohya_gui.monitor import RunView

    return RunView()
