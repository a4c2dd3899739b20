"""What the model, dataset and captioning tools share: their declared options (one `ToolOption` per command-line
option, so the argparse parser and later a GUI form come from the same list; `ToolOption` and `build_parser` are the
LoRA tools' own, in sd_scripts/networks/lora_tools.py), running a tool with user errors as one line, precision
names, devices, and writing small files atomically.

Torch-free: a GUI can import a tool's `OPTIONS` without loading torch (tools import torch where the work is).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Callable, Sequence

from ..errors import UserError
from ..networks.lora_tools import PRECISIONS, ToolOption, build_parser

__all__ = ["ToolOption", "build_parser", "run_tool", "torch_dtype", "torch_device", "write_text_atomic",
           "require_dir", "PRECISIONS"]


def run_tool(prog: str, description: str, options: Sequence[ToolOption], work: Callable[[argparse.Namespace], Any],
             argv: Sequence[str] | None) -> int:
    """Parse `argv` with the declared options, run `work`, and turn a user error into one line on stderr and exit
    status 1 (no traceback). Returns the exit status."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args = build_parser(prog, description, options).parse_args(None if argv is None else list(argv))
    try:
        work(args)
    except UserError as e:
        print(f"{prog.split()[-1]}: error: {e}", file=sys.stderr)
        return 1
    return 0


def torch_dtype(name: str | None, option: str):
    """'fp16' -> torch.float16 (None, 'no' -> None); UserError naming the option for an unknown name."""
    import torch

    if name in (None, "", "no"):
        return None
    try:
        return getattr(torch, PRECISIONS[str(name).lower()])
    except KeyError:
        raise UserError(f"--{option} {name!r} is not a precision: use one of float, fp16, bf16") from None


def torch_device(name: str | None, option: str = "device"):
    """The torch device of a --device option (None: cuda when available, else the CPU); UserError when unusable."""
    import torch

    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--{option} {name!r} is not a device: use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--{option} {name}: no CUDA GPU is available here; use --{option} cpu")
    return device


def write_text_atomic(path: str, text: str) -> None:
    """A UTF-8 text file written through a temp file beside it and os.replace."""
    from ..training.saving import atomic_write

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def require_dir(path: str | None, option: str) -> str:
    """`path` when it is an existing folder; UserError naming the option otherwise."""
    if not path or not os.path.isdir(path):
        raise UserError(f"--{option} {path!r} is not a folder: check the path")
    return path
