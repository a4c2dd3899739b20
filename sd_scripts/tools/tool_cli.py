"""What the model, dataset and captioning tools share: their declared options (one `ToolOption` per command-line
option, so the argparse parser and later a GUI form come from the same list), the parser built from them, running a
tool with user errors as one line, precision names, and writing small files atomically.

Torch-free: a GUI can import a tool's `OPTIONS` without loading torch (tools import torch where the work is).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from ..errors import UserError


@dataclass(frozen=True)
class ToolOption:
    """One command-line option of a tool. `type` bool is a flag (off by default); `nargs` '+'/'*' a list;
    `positional` an argument without '--'; `path` 'file' | 'dir' | 'out_file' | 'out_dir' | 'file_or_dir' tells a
    form what to offer; `aliases` are other spellings sd-scripts or kohya_ss accept for the same option."""

    name: str
    type: type
    default: Any
    help: str
    choices: tuple | None = None
    nargs: str | None = None
    required: bool = False
    positional: bool = False
    path: str | None = None
    aliases: tuple[str, ...] = ()

    @property
    def flags(self) -> list[str]:
        if self.positional:
            return [self.name]
        return ["--" + self.name] + ["--" + a for a in self.aliases]


class _ToolParser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 2 (argparse's status), without the usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(prog: str, description: str, options: Sequence[ToolOption]) -> argparse.ArgumentParser:
    """An argparse parser from a tool's declared options."""
    parser = _ToolParser(prog=prog, description=description)
    for opt in options:
        kwargs: dict[str, Any] = {"help": opt.help}
        if opt.type is bool:
            kwargs.update(action="store_true", default=bool(opt.default))
        else:
            kwargs.update(type=opt.type, default=opt.default)
            if opt.choices:
                kwargs["choices"] = opt.choices
            if opt.nargs:
                kwargs["nargs"] = opt.nargs
        if opt.positional:
            if opt.nargs is None and not opt.required:
                kwargs["nargs"] = "?"
        else:
            kwargs["dest"] = opt.name
            if opt.required:
                kwargs["required"] = True
        parser.add_argument(*opt.flags, **kwargs)
    return parser


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


#: precision option values -> torch dtype names (names only, so option lists stay torch-free)
PRECISIONS = {"float": "float32", "fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16",
              "bf16": "bfloat16", "bfloat16": "bfloat16"}


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
