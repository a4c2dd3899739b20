"""The option sections of a training tab, each generated from schema groups (no option is listed by hand).

A section renders, for one trainer, every option of its groups: basic ones in rows, `advanced` ones in a closed
"Advanced" accordion. Options that do not apply to the chosen model family are built hidden and shown when the family
changes (see `TrainingForm.family_visibility`). `AdvancedTraining` takes every group no other section claims, so an
option added to a new schema group still gets a widget.
"""
from __future__ import annotations

from typing import Any

import gradio as gr

from sd_scripts.options import GROUPS, Option, options_for

from .defaults import option_shown
from .widgets import make_widget

COLUMNS = 3


class SchemaSection:
    """Widgets of the options of `groups` that apply to `trainer`, inside an accordion titled `title`."""

    title = ""
    groups: tuple[str, ...] = ()
    open = False

    def __init__(self, trainer: str, values: dict[str, Any], family: str, elem_prefix: str):
        self.trainer = trainer
        self.widgets: dict[str, tuple[Option, gr.components.Component]] = {}
        self.options = [o for o in options_for(trainer) if o.group in self.groups and not o.refused]
        self.block = None
        if not self.options:
            return
        with gr.Accordion(self.title, open=self.open, elem_id=f"{elem_prefix}-{type(self).__name__}") as self.block:
            self.render(values, family, elem_prefix)

    def render(self, values: dict[str, Any], family: str, elem_prefix: str) -> None:
        basic = [o for o in self.options if not o.advanced]
        advanced = [o for o in self.options if o.advanced]
        self._rows(basic, values, family, elem_prefix, subtitles=len(self.groups) > 1)
        if advanced:
            with gr.Accordion("Advanced", open=False):
                self._rows(advanced, values, family, elem_prefix, subtitles=len(self.groups) > 1)

    def _rows(self, opts: list[Option], values: dict, family: str, elem_prefix: str, subtitles: bool) -> None:
        for group in self.groups:
            in_group = [o for o in opts if o.group == group]
            if not in_group:
                continue
            if subtitles:
                gr.Markdown(f"**{GROUPS.get(group, group)}**")
            for start in range(0, len(in_group), COLUMNS):
                with gr.Row():
                    for opt in in_group[start:start + COLUMNS]:
                        widget = make_widget(opt, values.get(opt.name, opt.default), elem_prefix,
                                             visible=option_shown(opt, family))
                        self.widgets[opt.name] = (opt, widget)


class SourceModel(SchemaSection):
    title, groups, open = "Source model", ("model",), True


class Folders(SchemaSection):
    title, groups, open = "Folders", ("folders",), True


class Network(SchemaSection):
    title, groups, open = "Network (LoRA)", ("network",), True


class BasicTraining(SchemaSection):
    title, groups, open = "Basic training", ("dataset", "training", "optimizer"), True


class SampleImages(SchemaSection):
    """Sample options plus the prompts themselves: the run gets its own prompt file written before launch."""

    title, groups = "Sample images", ("sampling",)

    def render(self, values: dict[str, Any], family: str, elem_prefix: str) -> None:
        self.prompts = gr.Textbox(
            label="Sample prompts", lines=3, elem_id=f"{elem_prefix}-sample_prompts_text",
            value=values.get("sample_prompts_text", ""),
            info="One prompt per line; options after ' --': --n negative, --w/--h size, --d seed, --s steps, "
                 "--l CFG scale. Written into the run folder before the trainer starts (used when 'Sample prompts' "
                 "file is empty).")
        super().render(values, family, elem_prefix)


class Metadata(SchemaSection):
    title, groups = "Metadata", ("metadata",)


_CLAIMED = {g for cls in (SourceModel, Folders, Network, BasicTraining, SampleImages, Metadata) for g in cls.groups}


class AdvancedTraining(SchemaSection):
    title = "Advanced training"
    groups = tuple(g for g in GROUPS if g not in _CLAIMED)


SECTIONS = (SourceModel, Folders, Network, BasicTraining, SampleImages, AdvancedTraining, Metadata)
