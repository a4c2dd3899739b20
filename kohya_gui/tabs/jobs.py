"""The Jobs tab: every run (queued, running, finished) with its status; reorder or cancel queued runs, stop or kill
a running one, and pick any job to show in the run monitor. The list refreshes on its own timer when it changes,
only while the tab is shown (every tick costs the browser work in proportion to the whole page).
"""
from __future__ import annotations

import hashlib
import time
from typing import TYPE_CHECKING

import gradio as gr

from kohya_gui.jobs import JobError

from .render import job_status

if TYPE_CHECKING:
    from kohya_gui.app import AppContext

HEADERS = ["id", "name", "kind", "status", "progress", "created", "exit code"]
REFRESH_S = 2.0
LABEL = "Jobs"


class JobsTab:
    def __init__(self, ctx: "AppContext", watched: gr.State):
        self.ctx, self.watched = ctx, watched
        with gr.Tab(LABEL, id="jobs", elem_id="tab-jobs"):
            self.table = gr.Dataframe(headers=HEADERS, datatype="str", interactive=False, wrap=True,
                                      elem_id="jobs-table", label="Jobs (newest first; click a row to select it)")
            with gr.Row(equal_height=True):
                self.selected = gr.Dropdown(label="Job", choices=[], value=None, scale=3, elem_id="jobs-selected")
                self.view_button = gr.Button("View", variant="primary", elem_id="jobs-view")
            with gr.Row():
                self.up = gr.Button("Move up", elem_id="jobs-up")
                self.down = gr.Button("Move down", elem_id="jobs-down")
                self.cancel = gr.Button("Cancel (queued)", elem_id="jobs-cancel")
                self.stop = gr.Button("Stop", variant="stop", elem_id="jobs-stop")
                self.kill = gr.Button("Kill now", variant="stop", elem_id="jobs-kill")
            self.message = gr.Markdown(elem_id="jobs-message")
            self.viewer_notice = gr.Markdown(self._viewer_text(), elem_id="jobs-viewer")
            self.command = gr.Code(label="Command of the selected job", language="shell", interactive=False,
                                   elem_id="jobs-command")
        self.signature = gr.State("")
        self.timer = gr.Timer(REFRESH_S, active=False)  # see `watch_tabs`
        self.timer.tick(self.refresh_if_changed, [self.signature], [self.table, self.selected, self.signature],
                        show_progress="hidden", queue=False)
        self.table.select(self._row_selected, [self.table], [self.selected])
        self.selected.change(self._command_of, self.selected, self.command, show_progress="hidden")
        self.view_button.click(lambda job_id: (job_id, f"Showing `{job_id}` in the run monitor." if job_id else
                                               "Choose a job first."), self.selected, [self.watched, self.message])
        for button, action in ((self.up, "up"), (self.down, "down"), (self.cancel, "cancel"), (self.stop, "stop"),
                               (self.kill, "kill")):
            button.click(lambda job_id, a=action: self._act(job_id, a), self.selected,
                         [self.message, self.table, self.selected, self.signature])

    def _viewer_text(self) -> str:
        jobs = self.ctx.jobs
        return "" if jobs.is_runner else f"**Read-only:** {jobs.viewer_reason()}."

    # ---- table
    def _rows(self) -> list[list[str]]:
        rows = []
        for job in self.ctx.jobs.list():
            status = job_status(job)
            if status == "running" and job.stop_requested:
                status = "stopping"
            if status in ("running", "stopping") or job.status in ("completed", "stopped", "failed"):
                view = self.ctx.view(job)
                progress = f"{view.step}/{view.total_steps}" if view.total_steps else ""
            else:
                progress = ""
            if job.status == "queued":
                progress = f"queue #{self._queue_position(job.id)}"
            rows.append([job.id, job.name, job.kind, status, progress,
                         time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.created)),
                         "" if job.exit_code is None else str(job.exit_code)])
        for job_id, reason in self.ctx.jobs.unreadable():  # shown with the reason, never run
            rows.append([job_id, reason, "", "unreadable", "", "", ""])
        return rows

    def _queue_position(self, job_id: str) -> int:
        ids = [j.id for j in self.ctx.jobs.queued()]
        return ids.index(job_id) + 1 if job_id in ids else 0

    def refresh(self):
        rows = self._rows()
        return self._table_outputs(rows) + [_digest(rows)]

    def watch_tabs(self, tabs: gr.Tabs) -> None:
        """Refresh the list when this tab is chosen in `tabs` and keep refreshing only while it is shown."""
        tabs.select(self._tab_chosen, [self.signature], [self.table, self.selected, self.signature, self.timer],
                    show_progress="hidden", queue=False)

    def _tab_chosen(self, signature: str, evt: gr.SelectData):
        if evt.value != LABEL:
            return gr.skip(), gr.skip(), signature, gr.Timer(active=False)
        return [*self.refresh_if_changed(signature), gr.Timer(REFRESH_S, active=True)]

    @property
    def refresh_outputs(self) -> list:
        return [self.table, self.selected, self.signature]

    def refresh_if_changed(self, signature: str):
        rows = self._rows()
        digest = _digest(rows)
        if digest == signature:
            return gr.skip(), gr.skip(), signature
        return [*self._table_outputs(rows), digest]

    @staticmethod
    def _table_outputs(rows: list[list[str]]) -> list:
        choices = [(f"{r[0]} — {r[3]}", r[0]) for r in rows]
        return [rows or [["" for _ in HEADERS]], gr.update(choices=choices)]

    # ---- actions
    @staticmethod
    def _row_selected(table, evt: gr.SelectData):
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        try:
            job_id = table.iloc[row, 0] if hasattr(table, "iloc") else table[row][0]
        except (IndexError, KeyError, TypeError):
            return gr.skip()
        return job_id or gr.skip()

    def _command_of(self, job_id: str | None) -> str:
        job = self.ctx.jobs.get(job_id) if job_id else None
        return job.command_line if job else ""

    def _act(self, job_id: str | None, action: str):
        if not job_id:
            message = "Choose a job first."
        else:
            try:
                if action in ("up", "down"):
                    self.ctx.jobs.move(job_id, action)
                    message = f"Moved `{job_id}` {action}."
                elif action == "cancel":
                    self.ctx.jobs.cancel(job_id)
                    message = f"Cancelled `{job_id}`."
                elif action == "stop":
                    self.ctx.jobs.stop(job_id)
                    message = f"Asked `{job_id}` to stop (it saves first)."
                else:
                    self.ctx.jobs.kill(job_id)
                    message = f"Killed `{job_id}`."
            except JobError as e:
                message = f"**Not done:** {e}"
        rows = self._rows()
        return [message, *self._table_outputs(rows), _digest(rows)]


def _digest(rows: list) -> str:
    return hashlib.sha1(repr(rows).encode()).hexdigest()
