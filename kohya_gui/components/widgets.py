"""One gradio widget per schema option, and the conversions between widget values and option values.

The kind of widget follows from the option alone: Dropdown for choices (one that also takes typed values for
suggestions), Checkbox for bool, Number for int/float, Textbox for strings, paths (typed: the server never opens file
dialogs) and lists (`nargs`, space separated, quotes allowed). Nothing here lists options by name.

A number option without a default ("not set" means the trainer decides) is a Textbox that parses a number: gradio's
Number cannot be empty (it shows and sends 0), and 0 is a real value for e.g. seed.
"""
from __future__ import annotations

import shlex
from typing import Any

import gradio as gr

from sd_scripts.options import Option

NONE_LABEL = "(default)"
PATH_HINTS = {
    "file": "path to a file",
    "dir": "path to a folder",
    "file_or_dir": "path to a file or folder",
    "out_dir": "folder (created if missing)",
    "out_file": "file (created)",
}


def _choice_value(choice: Any) -> Any:
    return "" if choice is None else choice


def make_widget(opt: Option, value: Any, elem_prefix: str, visible: bool = True) -> gr.components.Component:
    """The widget of `opt` holding `value` (an option value, e.g. None for 'not set')."""
    common = dict(label=opt.title, info=opt.help, elem_id=f"{elem_prefix}-{opt.name}", visible=visible,
                  value=to_widget_value(opt, value))
    if opt.choices and not opt.nargs:
        choices = [(NONE_LABEL if c is None else str(c), _choice_value(c)) for c in opt.choices]
        return gr.Dropdown(choices=choices, **common)
    if opt.type is bool:
        return gr.Checkbox(**common)
    if opt.suggestions and not opt.nargs:  # known values offered, any other typed in
        return gr.Dropdown(choices=[str(c) for c in opt.suggestions], allow_custom_value=True, **common)
    if opt.nargs:
        hint = "numbers separated by spaces" if opt.type in (int, float) else "key=value key=value ..."
        return gr.Textbox(placeholder=hint, **common)
    if opt.secret:  # masked; never saved to presets or job files (kohya_gui/secrets.py)
        return gr.Textbox(type="password", placeholder=f"or set {opt.env} in the environment" if opt.env else "",
                          **common)
    if opt.type is str:
        return gr.Textbox(placeholder=PATH_HINTS.get(opt.path or "", ""), **common)
    if is_optional_number(opt):
        return gr.Textbox(placeholder="not set (a number)", **common)
    return gr.Number(precision=0 if opt.type is int else None, **common)


def to_widget_value(opt: Option, value: Any) -> Any:
    """Option value -> what the widget shows."""
    if opt.choices and not opt.nargs:
        return _choice_value(value)
    if opt.type is bool:
        return bool(value)
    if opt.nargs:
        if not value:
            return ""
        items = value.split() if isinstance(value, str) else value
        return " ".join(shlex.quote(str(v)) for v in items)
    if opt.type is str or is_optional_number(opt):
        return "" if value is None else str(value)
    return value


def is_optional_number(opt: Option) -> bool:
    return opt.type not in (str, bool) and opt.default is None and not opt.nargs and not opt.choices


def to_option_value(opt: Option, raw: Any) -> Any:
    """Widget value -> option value (None = not set, so the trainer's default applies). ValueError names the option."""
    try:
        if opt.type is bool:
            return bool(raw)
        if opt.nargs:
            items = shlex.split(raw or "")
            return items or None
        if raw is None or (raw == "" and opt.default != ""):
            return None
        if opt.choices:
            return raw
        if opt.type is str:
            return str(raw).strip() if opt.path else str(raw)
        if isinstance(raw, str) and not raw.strip():
            return None
        if isinstance(raw, str):
            raw = raw.strip()
        if opt.type is int:
            number = float(raw)
            if not number.is_integer():
                raise ValueError(f"{raw!r} is not a whole number")
            return int(number)
        return opt.type(raw)
    except ValueError as e:
        raise ValueError(f"{opt.title} ({opt.name}): {e}") from None
