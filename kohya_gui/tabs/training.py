"""A training tab (LoRA, DreamBooth, Fine-tune, Textual Inversion): presets, the settings form, the run buttons and
the pre-flight panel. The tabs differ only by their kind; a tab whose trainer module is not installed yet shows a
notice and disables its launch buttons until `sd_scripts.<trainer>` becomes importable (checked on each page load).
"""
from __future__ import annotations

import html
import importlib.util
from typing import TYPE_CHECKING, Any

import gradio as gr

from kohya_gui.command import KIND_TO_TRAINER, TRAINER_MODULES, build_command, format_command
from kohya_gui.components.form import TrainingForm
from kohya_gui.components.path_picker import PathPicker

if TYPE_CHECKING:
    from kohya_gui.app import AppContext

TRAINING_TABS = (("lora", "LoRA"), ("dreambooth", "DreamBooth"), ("finetune", "Fine-tune"),
                 ("ti", "Textual Inversion"))
LEVEL_ICONS = {"error": "❌", "warning": "⚠️", "info": "ℹ️"}


def trainer_available(kind: str) -> bool:
    """True when the trainer module of `kind` can be imported (found, not imported: no torch in the GUI)."""
    try:
        return importlib.util.find_spec(TRAINER_MODULES[KIND_TO_TRAINER[kind]]) is not None
    except (ImportError, ValueError):
        return False


def preflight_html(checks: list[Any], heading: str = "Pre-flight") -> str:
    """Errors first, then warnings; each with the field it is about."""
    if not checks:
        return f'<div class="kg-preflight kg-ok"><b>{heading}:</b> no problems found.</div>'
    order = {"error": 0, "warning": 1}
    items = []
    for check in sorted(checks, key=lambda c: order.get(c.level, 2)):
        field = f"<code>{html.escape(check.field)}</code>: " if getattr(check, "field", None) else ""
        items.append(f'<li class="kg-{html.escape(check.level)}">{LEVEL_ICONS.get(check.level, "")} '
                     f'{field}{html.escape(check.message)}</li>')
    errors = sum(1 for c in checks if c.level == "error")
    summary = f"{errors} error(s), {len(checks) - errors} warning(s)"
    return f'<div class="kg-preflight"><b>{heading}:</b> {summary}<ul>{"".join(items)}</ul></div>'


class _Issue:
    """A Check-like message for problems found before pre-flight can run (e.g. a value that is not a number)."""

    def __init__(self, field: str, message: str, level: str = "error"):
        self.level, self.field, self.message = level, field, message


class TrainingTab:
    """One training kind's tab. `watched` is the app's State holding the job id the run monitor shows."""

    def __init__(self, ctx: "AppContext", kind: str, label: str, watched: gr.State):
        self.ctx, self.kind, self.label = ctx, kind, label
        self.trainer = KIND_TO_TRAINER[kind]
        prefix = kind
        with gr.Tab(label, id=kind, elem_id=f"tab-{kind}"):
            self.notice = gr.Markdown(self._notice(), visible=not trainer_available(kind),
                                      elem_id=f"{prefix}-notice")
            with gr.Row(equal_height=False):
                self.preset = gr.Dropdown(label="Preset", choices=[], value=None, allow_custom_value=False,
                                          elem_id=f"{prefix}-preset", scale=3)
                self.load_preset = gr.Button("Load preset", size="md", elem_id=f"{prefix}-load-preset", scale=1)
                self.preset_name = gr.Textbox(label="Save as preset", placeholder="name", scale=2,
                                              elem_id=f"{prefix}-preset-name")
                self.save_preset = gr.Button("Save preset", size="md", elem_id=f"{prefix}-save-preset", scale=1)
            with gr.Row(equal_height=False):
                self.import_path = gr.Textbox(label="Import a kohya_ss JSON config", scale=5,
                                              placeholder="path to a kohya_ss .json file on the server",
                                              elem_id=f"{prefix}-import-path")
                self.import_button = gr.Button("Import", size="md", scale=1, elem_id=f"{prefix}-import")
            self.form = TrainingForm(kind, self.trainer, ctx.initial_values(kind), prefix)
            self.picker = PathPicker(ctx, self.form, prefix)
            self.family_state = gr.State(self.form.family.value)
            with gr.Row():
                self.print_button = gr.Button("Print command", elem_id=f"{prefix}-print")
                self.start_button = gr.Button("Start", variant="primary", elem_id=f"{prefix}-start")
                self.queue_button = gr.Button("Add to queue", elem_id=f"{prefix}-queue")
            with gr.Row():
                self.stop_button = gr.Button("Stop", variant="stop", elem_id=f"{prefix}-stop")
                self.save_now = gr.Button("Save now", elem_id=f"{prefix}-save-now")
                self.sample_now = gr.Button("Sample now", elem_id=f"{prefix}-sample-now")
                self.tensorboard_button = gr.Button("TensorBoard", elem_id=f"{prefix}-tensorboard")
            self.message = gr.Markdown(elem_id=f"{prefix}-message")
            self.preflight = gr.HTML(elem_id=f"{prefix}-preflight")
            with gr.Accordion("Command", open=False, visible=False) as self.command_box:
                self.command_text = gr.Code(label="Command line", language="shell", interactive=False,
                                            elem_id=f"{prefix}-command")
                self.toml_text = gr.Code(label="Run TOML", language=None, interactive=False,
                                         elem_id=f"{prefix}-toml")
        self.watched = watched
        self._wire()

    # ---- wiring
    def _wire(self) -> None:
        form = self.form
        inputs = form.inputs
        form.family.change(self._family_changed, inputs | {self.family_state},
                           [*form.option_widgets, self.family_state], show_progress="hidden")
        self.print_button.click(self._print, inputs, [self.command_box, self.command_text, self.toml_text,
                                                      self.preflight])
        self.start_button.click(self._launch_now, inputs | {self.watched},
                                [self.preflight, self.message, self.watched])
        self.queue_button.click(self._enqueue, inputs | {self.watched},
                                [self.preflight, self.message, self.watched])
        self.stop_button.click(lambda w: self._control(w, "stop"), self.watched, self.message)
        self.save_now.click(lambda w: self._control(w, "save"), self.watched, self.message)
        self.sample_now.click(lambda w: self._control(w, "sample"), self.watched, self.message)
        self.tensorboard_button.click(self._tensorboard, {form.widget("logging_dir")}, self.message)
        self.load_preset.click(self._load_preset, self.preset, [*form.outputs, self.family_state, self.message])
        self.save_preset.click(self._save_preset, inputs | {self.preset_name}, [self.preset, self.message])
        self.import_button.click(self._import, self.import_path, [*form.outputs, self.family_state, self.message])

    def on_load(self) -> list:
        """Page load: preset list and whether the trainer exists now (it may have been installed meanwhile)."""
        available = trainer_available(self.kind)
        buttons = [gr.update(interactive=available) for _ in range(2)]
        return [gr.update(choices=self.ctx.preset_names(self.kind)), gr.update(visible=not available,
                                                                               value=self._notice()), *buttons]

    @property
    def load_outputs(self) -> list:
        return [self.preset, self.notice, self.start_button, self.queue_button]

    def _notice(self) -> str:
        module = TRAINER_MODULES[self.trainer]
        return (f"**{self.label} training is not available yet:** the trainer `{module}` is not installed in this "
                f"build. You can prepare settings, print the command and save presets; Start switches on by itself "
                f"once `{module}` exists (reload the page).")

    # ---- handlers
    def _collect(self, data: dict) -> tuple[dict, Any, str]:
        return self.form.collect(data)

    def _family_changed(self, data: dict):
        family = data[self.form.family]
        updates = self.form.family_changed(data, data[self.family_state])
        return [*(updates[w] for w in self.form.option_widgets), family]

    def _command(self, data: dict, job_dir: str):
        values, accel, _ = self._collect(data)
        return build_command(self.kind, values, accel, job_dir)

    def _print(self, data: dict):
        try:
            cmd = self._command(data, self.ctx.preview_job_dir())
        except ValueError as e:
            return gr.update(visible=False), "", "", preflight_html([_Issue(_field(e), str(e))], "Command")
        prompts = f"\n# {cmd.prompts_path}\n{cmd.prompts_text}" if cmd.prompts_text else ""
        return gr.update(visible=True, open=True), format_command(cmd), cmd.toml_text + prompts, ""

    def _checks(self, data: dict) -> tuple[list, dict | None, Any]:
        try:
            values, accel, family = self._collect(data)
            self._command(data, self.ctx.preview_job_dir())
        except ValueError as e:
            return [_Issue(_field(e), str(e))], None, None
        return self.ctx.preflight(self.kind, values, accel, family), values, accel

    def _launch(self, data: dict, start_now: bool):
        watched = data[self.watched]
        if not trainer_available(self.kind):
            return "", self._notice(), watched
        checks, values, accel = self._checks(data)
        panel = preflight_html(checks)
        if any(c.level == "error" for c in checks):
            return panel, "**Not started:** fix the errors listed in the pre-flight panel.", watched
        if start_now and self.ctx.busy():
            return panel, ("**A run is already in progress.** Stop it, or use *Add to queue* to run this one "
                           "after it."), watched
        try:
            job = self.ctx.create_job(self.kind, values, accel, values.get("output_name") or self.label)
        except ValueError as e:
            return panel, f"**Not started:** {html.escape(str(e))}", watched
        verb = "Started" if start_now else "Queued"
        return panel, f"{verb} job `{job.id}`.", job.id

    def _launch_now(self, data: dict):
        return self._launch(data, start_now=True)

    def _enqueue(self, data: dict):
        return self._launch(data, start_now=False)

    def _control(self, watched: str | None, what: str) -> str:
        return self.ctx.control(watched, what)

    def _tensorboard(self, data: dict) -> str:
        return self.ctx.toggle_tensorboard(data[self.form.widget("logging_dir")])

    def _load_preset(self, name: str | None):
        if not name:
            return [*(gr.skip() for _ in self.form.outputs), gr.skip(), "Choose a preset first."]
        try:
            values, notes = self.ctx.load_preset(self.kind, name)
        except (OSError, ValueError) as e:
            return [*(gr.skip() for _ in self.form.outputs), gr.skip(), f"**Preset not loaded:** {e}"]
        note = "".join(f"\n- {html.escape(n)}" for n in notes)
        return self._show_values(values, f"Loaded preset **{html.escape(name)}**.{note}")

    def _show_values(self, values: dict, message: str):
        updates = self.form.updates(values)
        family = updates[self.form.family]
        return [*(updates[w] for w in self.form.outputs), family, message]

    def _save_preset(self, data: dict):
        name = (data[self.preset_name] or "").strip()
        if not name:
            return gr.skip(), "Type a name for the preset first."
        try:
            values, accel, _ = self._collect(data)
            values.update(self.form.accelerate.flat(accel))
            path = self.ctx.save_preset(self.kind, name, values)
        except (OSError, ValueError) as e:
            return gr.skip(), f"**Preset not saved:** {html.escape(str(e))}"
        return (gr.update(choices=self.ctx.preset_names(self.kind), value=name),
                f"Saved preset **{html.escape(name)}** to `{path}`.")

    def _import(self, path: str):
        path = (path or "").strip()
        if not path:
            return [*(gr.skip() for _ in self.form.outputs), gr.skip(), "Type the path of a kohya_ss JSON file."]
        try:
            values, notes = self.ctx.import_kohya(self.kind, path)
        except (OSError, ValueError) as e:
            return [*(gr.skip() for _ in self.form.outputs), gr.skip(), f"**Not imported:** {e}"]
        note = "".join(f"\n- {html.escape(n)}" for n in notes)
        return self._show_values(values, f"Imported `{html.escape(path)}`.{note}")


def _field(error: Exception) -> str:
    return getattr(error, "field", "") or ""
