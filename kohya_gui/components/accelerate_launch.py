"""`accelerate launch` settings, one widget per field of `command.AccelerateSettings` (not listed by hand).

A field whose value defaults to the run's option of the same name (mixed_precision: None = the run's) takes that
option's choices, plus "(from the run's option)" for None. (dynamo_backend is accelerate's own setting, 'no' by
default, beside the trainer's option of that name.)
"""
from __future__ import annotations

import dataclasses
import shlex
from typing import Any

import gradio as gr

from kohya_gui.command import ACCEL_PREFIX, AccelerateSettings
from sd_scripts.options import BY_NAME

from .widgets import NONE_LABEL

HELP = {  # what each setting means to a user (the field names are accelerate's own)
    "num_processes": "Processes (usually one per GPU).",
    "num_machines": "Machines taking part (multi-node).",
    "machine_rank": "Rank of this machine (multi-node).",
    "main_process_ip": "Address of the rank-0 machine (multi-node).",
    "main_process_port": "Port of the rank-0 machine.",
    "mixed_precision": "Overrides the run's mixed precision when set.",
    "gpu_ids": "GPUs to use: '0,1' or 'all'.",
    "num_cpu_threads_per_process": "CPU threads per process.",
    "dynamo_backend": "torch.compile backend ('no' to disable).",
    "multi_gpu": "Distributed data parallel over several GPUs.",
    "config_file": "An accelerate / DeepSpeed / FSDP config made by `accelerate config` (path).",
    "extra_args": "More `accelerate launch` flags, space separated.",
    "cpu": "Train on the CPU even when a GPU is present.",
}


class AccelerateLaunch:
    """Widgets for AccelerateSettings; `collect` turns their values back into an AccelerateSettings."""

    def __init__(self, values: dict[str, Any], elem_prefix: str):
        base = AccelerateSettings().to_dict()
        self.widgets: dict[str, gr.components.Component] = {}
        self.fields = {f.name: f for f in dataclasses.fields(AccelerateSettings)}
        with gr.Accordion("Accelerate launch", open=False, elem_id=f"{elem_prefix}-AccelerateLaunch"):
            names = list(self.fields)
            for start in range(0, len(names), 3):
                with gr.Row():
                    for name in names[start:start + 3]:
                        value = values.get(ACCEL_PREFIX + name, base[name])
                        self.widgets[name] = self._widget(name, value, elem_prefix)

    def _widget(self, name: str, value: Any, elem_prefix: str) -> gr.components.Component:
        kind = str(self.fields[name].type)
        common = dict(label=name.replace("_", " ").capitalize(), info=HELP.get(name),
                      elem_id=f"{elem_prefix}-accelerate-{name}")
        opt = BY_NAME.get(name)
        if opt is not None and opt.choices and self.fields[name].default is None:  # None: the run's option
            choices = [(NONE_LABEL + " (from the run's option)", "")] + [(str(c), c) for c in opt.choices if c]
            return gr.Dropdown(choices=choices, value="" if value is None else value, **common)
        if kind.startswith("bool"):
            return gr.Checkbox(value=bool(value), **common)
        if kind.startswith("int"):
            return gr.Number(value=value, precision=0, **common)
        if kind.startswith("list"):
            return gr.Textbox(value=shlex.join(value or []), **common)
        return gr.Textbox(value="" if value is None else str(value), **common)

    def updates(self, values: dict[str, Any]) -> dict[gr.components.Component, Any]:
        """Widget values for flat `values` ('accelerate.<name>' keys; missing ones back to their defaults)."""
        base = AccelerateSettings().to_dict()
        out = {}
        for name, widget in self.widgets.items():
            value = values.get(ACCEL_PREFIX + name, base[name])
            if isinstance(value, list):
                value = shlex.join(value)
            out[widget] = value if value is not None or isinstance(widget, gr.Number) else ""
        return out

    def collect(self, data: dict[gr.components.Component, Any]) -> AccelerateSettings:
        """Widget values -> AccelerateSettings (CommandError naming a bad field)."""
        raw = {}
        for name, widget in self.widgets.items():
            value = data.get(widget)
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            raw[name] = value
        if raw.get("extra_args") is None:
            raw["extra_args"] = ""
        return AccelerateSettings.from_dict(raw)

    def flat(self, accel: AccelerateSettings) -> dict[str, Any]:
        """'accelerate.<name>' entries of the settings that differ from the defaults (for presets)."""
        base = AccelerateSettings().to_dict()
        return {ACCEL_PREFIX + k: v for k, v in accel.to_dict().items() if v != base[k]}
