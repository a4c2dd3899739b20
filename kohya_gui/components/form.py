"""The settings form of one training tab: model family, every schema section, accelerate settings.

Event handlers take the form's widgets as a *set* input, so gradio passes one {component: value} dict; `collect`
turns that into ONE dict keyed by option name (plus 'sample_prompts_text') and the AccelerateSettings. Nothing
depends on the order of widgets.
"""
from __future__ import annotations

from typing import Any

import gradio as gr

from kohya_gui.command import FAMILY_KEY, AccelerateSettings
from sd_scripts.options import Option

from .accelerate_launch import AccelerateLaunch
from .defaults import DEFAULT_FAMILY, FAMILY_CHOICES, family_defaults, option_shown
from .sections import SECTIONS, SampleImages, SchemaSection
from .widgets import to_option_value, to_widget_value

# FAMILY_KEY ('model_family', kohya_gui.command) is stored in presets next to the options; it chooses the trainer
# script of a family that has its own, and is never sent to the trainer


class TrainingForm:
    """All widgets of a training tab and the conversions between them and a values dict."""

    def __init__(self, kind: str, trainer: str, values: dict[str, Any], elem_prefix: str):
        self.kind, self.trainer = kind, trainer
        self.base = dict(values)  # what options a preset leaves out return to
        family = values.get(FAMILY_KEY) or DEFAULT_FAMILY
        values = {**family_defaults(kind, family), **values}
        self.family = gr.Dropdown(FAMILY_CHOICES, value=family, label="Model family",
                                  info="Shows the options of this family and sets its learning rate and resolution.",
                                  elem_id=f"{elem_prefix}-model_family")
        self.sections: list[SchemaSection] = [cls(trainer, values, family, elem_prefix) for cls in SECTIONS]
        self.accelerate = AccelerateLaunch(values, elem_prefix)
        self.options: dict[str, tuple[Option, gr.components.Component]] = {}
        for section in self.sections:
            self.options.update(section.widgets)
            if isinstance(section, SampleImages):
                self.prompts = section.prompts

    @property
    def inputs(self) -> set[gr.components.Component]:
        return {self.family, self.prompts, *(w for _, w in self.options.values()), *self.accelerate.widgets.values()}

    @property
    def outputs(self) -> list[gr.components.Component]:
        return [self.family, self.prompts, *(w for _, w in self.options.values()), *self.accelerate.widgets.values()]

    @property
    def option_widgets(self) -> list[gr.components.Component]:
        return [w for _, w in self.options.values()]

    def widget(self, name: str) -> gr.components.Component:
        return self.options[name][1]

    def collect(self, data: dict[gr.components.Component, Any]) -> tuple[dict[str, Any], AccelerateSettings, str]:
        """{component: value} -> (values by option name, accelerate settings, family).

        Options hidden for the chosen family are left out, so they never reach the trainer.
        """
        family = data[self.family] or DEFAULT_FAMILY
        values = {name: to_option_value(opt, data[widget]) for name, (opt, widget) in self.options.items()
                  if option_shown(opt, family)}
        values["sample_prompts_text"] = data[self.prompts] or ""
        values[FAMILY_KEY] = family
        return values, self.accelerate.collect(data), family

    def updates(self, values: dict[str, Any]) -> dict[gr.components.Component, Any]:
        """Show `values` (a preset: options it lacks return to the tab's defaults; 'accelerate.*' keys included)."""
        family = values.get(FAMILY_KEY) or DEFAULT_FAMILY
        full = {**family_defaults(self.kind, family), **self.base, **values}
        out: dict[gr.components.Component, Any] = {self.family: family,
                                                   self.prompts: full.get("sample_prompts_text") or ""}
        for name, (opt, widget) in self.options.items():
            out[widget] = gr.update(value=to_widget_value(opt, full.get(name, opt.default)),
                                    visible=option_shown(opt, family))
        out.update(self.accelerate.updates({**self.base, **values}))
        return out

    def family_changed(self, data: dict[gr.components.Component, Any], old_family: str) -> dict:
        """Visibility for the new family; family-dependent defaults follow unless the user changed them."""
        family = data[self.family] or DEFAULT_FAMILY
        old = family_defaults(self.kind, old_family or DEFAULT_FAMILY,
                              bool(self._raw(data, "v_parameterization")))
        new = family_defaults(self.kind, family, bool(self._raw(data, "v_parameterization")))
        out = {}
        for name, (opt, widget) in self.options.items():
            update: dict[str, Any] = {"visible": option_shown(opt, family)}
            if name in new and name in old and _same(to_option_value(opt, data[widget]), old[name]):
                update["value"] = to_widget_value(opt, new[name])
            out[widget] = gr.update(**update)
        return out

    def _raw(self, data: dict, name: str) -> Any:
        return data.get(self.options[name][1]) if name in self.options else None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(a - b) <= 1e-12 * max(abs(a), abs(b), 1e-30)
    return str(a) == str(b)
