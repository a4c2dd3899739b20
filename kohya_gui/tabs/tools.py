"""The Utilities tab's tools: one form per tool of `sd_scripts.tools.registry` (chosen from a list), each run as a job
of the job queue (its log, progress and outputs in the run monitor; stop from there or the Jobs tab), and the files
finished tool jobs wrote, to put into a training tab's path field ("use as network weights", "use as base model").
"""
from __future__ import annotations

import html
from typing import TYPE_CHECKING, Any

import gradio as gr

from kohya_gui.command import CommandError, format_command
from kohya_gui.components.path_picker import PathPicker
from kohya_gui.components.tool_form import ToolForm, tool_summary
from kohya_gui.jobs import JobError
from sd_scripts.tools.registry import installed_tools, tool_options

if TYPE_CHECKING:
    from kohya_gui.app import AppContext
    from kohya_gui.tabs.training import TrainingTab

#: ToolOption / Option path kinds a result file can fill
FILE_FIELDS = ("file", "file_or_dir")
#: the target chosen first in "Use it as" (a LoRA result is most often trained on further)
FIRST_TARGET = "network_weights"


class ToolsPanel:
    """Tool chooser, the forms, and the results picker. `tabs`: the training tabs whose path fields results fill."""

    def __init__(self, ctx: "AppContext", tabs: list["TrainingTab"], watched: gr.State):
        self.ctx, self.watched = ctx, watched
        self.entries, broken = [], []
        for entry in installed_tools():  # a tool that cannot even declare its options is listed as unavailable
            try:
                tool_options(entry.name)
                self.entries.append(entry)
            except Exception as e:  # noqa: BLE001 - another engineer's module must not break the whole page
                broken.append(f"`{entry.module}` ({type(e).__name__}: {html.escape(str(e))[:200]})")
        if broken:
            gr.Markdown("⚠️ Tools not available in this build: " + "; ".join(broken), elem_id="tool-unavailable")
        self.forms: dict[str, ToolForm] = {}
        self.columns: dict[str, gr.Column] = {}
        first = self.entries[0].name if self.entries else None
        self.message = gr.Markdown(elem_id="tool-message", render=False)  # shown below the forms
        self.choice = gr.Dropdown([(f"{e.group}: {e.title}", e.name) for e in self.entries], value=first,
                                  label="Tool", elem_id="tool-choice")
        for entry in self.entries:
            prefix = f"tool-{entry.name}"
            with gr.Column(visible=entry.name == first, elem_id=f"{prefix}-form") as column:
                gr.Markdown(f"**{html.escape(entry.title)}** — {html.escape(tool_summary(entry))} "
                            f"(`python -m {entry.module}`)")
                form = ToolForm(entry, prefix)
                if form.path_targets():
                    PathPicker(ctx, form.path_targets(), prefix, multiple=form.list_paths())
                with gr.Row():
                    show = gr.Button("Print command", elem_id=f"{prefix}-print")
                    run = gr.Button("Run", variant="primary", elem_id=f"{prefix}-run")
                command = gr.Code(label="Command line", language="shell", interactive=False, visible=False,
                                  elem_id=f"{prefix}-command")
            self.forms[entry.name], self.columns[entry.name] = form, column
            show.click(lambda data, n=entry.name: self._print(n, data), form.inputs, command)
            run.click(lambda data, n=entry.name: self._run(n, data), form.inputs | {watched},
                      [self.message, watched])
        self.choice.change(self._show, self.choice, list(self.columns.values()), show_progress="hidden")
        self._results(tabs)

    def _results(self, tabs: list["TrainingTab"]) -> None:
        self.message.render()
        self.targets: dict[str, gr.components.Component] = {}
        labels = []
        for tab in tabs:
            for opt, widget in tab.form.options.values():
                if opt.path in FILE_FIELDS:
                    key = f"{tab.kind}:{opt.name}"
                    self.targets[key] = widget
                    labels.append((f"{tab.label}: {opt.title} ({opt.name})", key))
        first = next((k for k in self.targets if k.endswith(":" + FIRST_TARGET)), labels[0][1] if labels else None)
        gr.Markdown("**Results of finished tools** — put one into a training tab's field (the file browser lists "
                    "them too).")
        with gr.Row(equal_height=True):
            self.result = gr.Dropdown([], label="Result file", scale=4, elem_id="tool-result")
            self.refresh = gr.Button("Refresh", scale=0, elem_id="tool-result-refresh")
        with gr.Row(equal_height=True):
            self.target = gr.Dropdown(labels, value=first, label="Use it as", scale=4, elem_id="tool-result-target")
            self.use = gr.Button("Use", scale=0, variant="primary", elem_id="tool-result-use")
        self.use_message = gr.Markdown(elem_id="tool-result-message")
        self.refresh.click(self.result_choices, None, self.result, show_progress="hidden")
        self.use.click(self._use, [self.result, self.target], [*self.targets.values(), self.use_message],
                       show_progress="hidden")

    # ---- handlers
    def _show(self, name: str):
        return [gr.update(visible=n == name) for n in self.columns]

    def result_choices(self):
        results = self.ctx.tool_results()
        return gr.update(choices=results, value=results[0] if results else None)

    def _values(self, name: str, data: dict) -> dict[str, Any]:
        return self.forms[name].collect(data)

    def _print(self, name: str, data: dict):
        from kohya_gui.tool_command import normalize_tool_values, tool_argv

        try:
            values = normalize_tool_values(name, self._values(name, data), resolve=self.ctx.browser.resolve)
        except (CommandError, ValueError) as e:
            return gr.update(visible=True, value=f"# not valid: {e}")
        return gr.update(visible=True, value=format_command(tool_argv(name, values, self.ctx.jobs.python)))

    def _run(self, name: str, data: dict):
        watched = data[self.watched]
        try:
            busy = self.ctx.busy()
            job = self.ctx.create_tool_job(name, self._values(name, data))
        except (CommandError, JobError, ValueError, OSError) as e:
            return f"**Not started:** {html.escape(str(e))}", watched
        verb = "Queued" if busy else "Started"
        after = " (it runs when the current run ends)" if busy else ""
        return (f"{verb} job `{job.id}`{after}: its log, progress and outputs are in the run monitor; stop it there "
                f"or under Jobs."), job.id

    def _use(self, result: str | None, target: str | None):
        skip = [gr.skip() for _ in self.targets]
        if not result or result not in self.ctx.tool_results():
            return [*skip, "Choose a result file first (press Refresh after a tool finished)."]
        if target not in self.targets:
            return [*skip, "Choose the field to fill."]
        out = [result if key == target else gr.skip() for key in self.targets]
        kind, name = target.split(":", 1)
        return [*out, f"`{html.escape(name)}` of the {html.escape(kind)} tab = `{html.escape(result)}`"]
