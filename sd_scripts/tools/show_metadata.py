"""Print the header metadata of a .safetensors file as sorted, indented JSON (sd-scripts' tools/show_metadata.py).

    python -m sd_scripts.tools.show_metadata --model FILE.safetensors

Only the header is read (no weights). A file without metadata logs "No metadata found" and exits 0, as sd-scripts.
"""
from __future__ import annotations

import json
import logging
import os
import struct
import sys

from ..errors import UserError
from .tool_cli import ToolOption, run_tool

log = logging.getLogger(__name__)

OPTIONS: tuple[ToolOption, ...] = (
    ToolOption("model", str, None, ".safetensors file whose metadata to print", required=True, path="file"),
)


def read_metadata(path: str) -> dict[str, str] | None:
    """The `__metadata__` of a .safetensors header, or None when it has none; UserError for an unreadable file."""
    from ..families import read_safetensors_header

    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file; check the --model path")
    try:
        _shapes, metadata = read_safetensors_header(path)
    except (OSError, ValueError, struct.error):
        raise UserError(f"{path}: not a .safetensors file (no readable header); pass a .safetensors model or LoRA") from None
    return metadata or None


def show(args) -> None:
    metadata = read_metadata(args.model)
    if metadata is None:
        log.error("No metadata found")
        return
    print(json.dumps(metadata, indent=4, sort_keys=True))


def main(argv: list[str] | None = None) -> int:
    return run_tool("python -m sd_scripts.tools.show_metadata", "Print a .safetensors file's metadata.", OPTIONS,
                    show, argv)


if __name__ == "__main__":
    sys.exit(main())
