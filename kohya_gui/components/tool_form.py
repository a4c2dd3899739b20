"""The form of one command-line tool, generated from its declared options (`OPTIONS`, a tuple of ToolOptions; the
tools are listed in `sd_scripts.tools.registry`). Nothing here names an option.

Flags are checkboxes, choices dropdowns (with "(default)" for unset), lists text (space separated, quotes allowed),
numbers with a default Number fields, everything else (paths, numbers without a default) text. `collect` gives the
{option: value} dict `tool_command.normalize_tool_values` checks.
"""
from __future__ import annotations

from typing import Any

import gradio as gr

from sd_scripts.tools.registry import ToolEntry, tool_options

from .widgets import NONE_LABEL, PATH_HINTS

COLUMNS = 3


def tool_summary(entry: ToolEntry) -> str:
    """The first line of the tool module's docstring (what it does)."""
    import importlib

    doc = (importlib.import_module(entry.module).__doc__ or "").strip()
    return " ".join(doc.split("\n\n", 1)[0].split())


class ToolForm:
    """The widgets of tool `entry`'s options, in declaration order, 3 per row."""

    def __init__(self, entry: ToolEntry, elem_prefix: str):
        self.entry = entry
        self.options = tool_options(entry.name)
        self.widgets: dict[str, gr.components.Component] = {}
        for start in range(0, len(self.options), COLUMNS):
            with gr.Row():
                for opt in self.options[start:start + COLUMNS]:
                    self.widgets[opt.name] = self._widget(opt, f"{elem_prefix}-{opt.name}")

    @staticmethod
    def _widget(opt: Any, elem_id: str) -> gr.components.Component:
        label = opt.name + (" (required)" if opt.required or opt.positional else "")
        common = dict(label=label, info=opt.help, elem_id=elem_id)
        if opt.type is bool:
            return gr.Checkbox(value=bool(opt.default), **common)
        if opt.choices and not opt.nargs:
            choices = [(f"{NONE_LABEL}", "")] + [(str(c), c) for c in opt.choices]
            return gr.Dropdown(choices=choices, value="" if opt.default is None else opt.default, **common)
        if opt.nargs:
            hint = "paths, space separated (quote a path with spaces)" if opt.path else "values, space separated"
            return gr.Textbox(value=" ".join(map(str, opt.default or [])), placeholder=hint, **common)
        if opt.type in (int, float) and opt.default is not None:
            return gr.Number(value=opt.default, precision=0 if opt.type is int else None, **common)
        placeholder = PATH_HINTS.get(opt.path or "", "not set" if opt.default is None else "")
        return gr.Textbox(value="" if opt.default is None else str(opt.default), placeholder=placeholder, **common)

    @property
    def inputs(self) -> set[gr.components.Component]:
        return set(self.widgets.values())

    def path_targets(self) -> dict[str, tuple[str, gr.components.Component]]:
        """The path fields, for the file browser."""
        return {opt.name: (opt.name, self.widgets[opt.name]) for opt in self.options if opt.path}

    def list_paths(self) -> tuple[str, ...]:
        return tuple(opt.name for opt in self.options if opt.path and opt.nargs)

    def collect(self, data: dict[gr.components.Component, Any]) -> dict[str, Any]:
        """{widget: value} -> {option: value} ('' and None: not set)."""
        out = {}
        for name, widget in self.widgets.items():
            value = data.get(widget)
            if isinstance(value, float) and value.is_integer() and _type(self.options, name) is int:
                value = int(value)
            out[name] = None if value == "" else value
        return out


def _type(options: tuple, name: str) -> type:
    return next(o.type for o in options if o.name == name)
