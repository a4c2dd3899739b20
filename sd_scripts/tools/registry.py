"""The command-line tools the GUI offers as forms (its Utilities tab): one line per tool, its module and its title.

A tool listed here is a module that
- declares `OPTIONS`: a tuple of `sd_scripts.networks.lora_tools.ToolOption` (name, type, default, help, choices,
  nargs, required, positional, path kind) — importing the module must not import torch (the GUI reads the list);
- runs as `python -m <module> <options>` (its parser built from OPTIONS with `lora_tools.build_parser`), prints its
  progress to stdout/stderr (tqdm bars are shown as a progress bar), writes its outputs atomically to the paths of its
  `out_file` / `out_dir` options and exits 0, or prints a one-line error and exits 1 (`lora_tools.run_tool`).

Torch-free: nothing here imports a tool until its options are asked for.
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ToolEntry:
    """One tool: its module (run with `python -m`), the title of its form, and the group it is listed under."""

    module: str
    title: str
    group: str = "LoRA"

    @property
    def name(self) -> str:
        """The tool's short name (the module's last part): its id in the GUI and in job kinds."""
        return self.module.rsplit(".", 1)[-1]


TOOLS: tuple[ToolEntry, ...] = (
    ToolEntry("sd_scripts.networks.merge_lora", "Merge LoRA (into a model, or into one LoRA)"),
    ToolEntry("sd_scripts.networks.svd_merge_lora", "Merge LoRA to a new rank (SVD)"),
    ToolEntry("sd_scripts.networks.extract_lora_from_models", "Extract a LoRA from two models"),
    ToolEntry("sd_scripts.networks.resize_lora", "Resize a LoRA (lower rank)"),
    ToolEntry("sd_scripts.networks.check_lora_weights", "Check LoRA weights"),
    ToolEntry("sd_scripts.networks.extract_lora_from_dylora", "Extract fixed-rank LoRAs from a DyLoRA"),
    ToolEntry("sd_scripts.networks.merge_lycoris", "Merge LyCORIS into a model"),
    ToolEntry("sd_scripts.networks.extract_lycoris", "Extract a LyCORIS (LoCon) from two models"),
    ToolEntry("sd_scripts.tools.convert_diffusers20_original_sd", "Convert a model (single file / diffusers)", "Model"),
    ToolEntry("sd_scripts.tools.merge_models", "Merge models", "Model"),
    ToolEntry("sd_scripts.tools.show_metadata", "Show a file's metadata", "Model"),
    ToolEntry("sd_scripts.finetune.tag_images_by_wd14_tagger", "Tag images (WD14 tagger)", "Captioning"),
    ToolEntry("sd_scripts.finetune.make_captions", "Caption images (BLIP)", "Captioning"),
    ToolEntry("sd_scripts.finetune.make_captions_by_git", "Caption images (GIT)", "Captioning"),
    ToolEntry("sd_scripts.finetune.make_captions_by_florence2", "Caption images (Florence-2)", "Captioning"),
    ToolEntry("sd_scripts.tools.basic_caption", "Basic captioning (prefix, postfix, find / replace)", "Dataset"),
    ToolEntry("sd_scripts.tools.group_images", "Group images by aspect ratio", "Dataset"),
    ToolEntry("sd_scripts.tools.dataset_balancing", "Balance a dataset (repeats)", "Dataset"),
    ToolEntry("sd_scripts.tools.resize_images_to_resolution", "Resize images", "Dataset"),
    ToolEntry("sd_scripts.tools.canny", "Canny edge images", "Dataset"),
)


class UnknownToolError(KeyError):
    """A tool name that is not in TOOLS."""


def tool_entry(name: str) -> ToolEntry:
    """The registry line of tool `name` (UnknownToolError otherwise)."""
    for entry in TOOLS:
        if entry.name == name:
            return entry
    raise UnknownToolError(name)


def installed_tools() -> list[ToolEntry]:
    """The listed tools whose module exists in this build (found, not imported)."""
    out = []
    for entry in TOOLS:
        try:
            if importlib.util.find_spec(entry.module) is not None:
                out.append(entry)
        except (ImportError, ValueError):
            continue
    return out


def tool_options(name: str) -> tuple[Any, ...]:
    """The declared ToolOptions of tool `name` (imports its module: torch-free by the contract above)."""
    return tuple(importlib.import_module(tool_entry(name).module).OPTIONS)
