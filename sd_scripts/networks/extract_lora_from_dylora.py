"""Split a DyLoRA file into fixed-rank LoRA files (sd-scripts' extract_lora_from_dylora).

    python -m sd_scripts.networks.extract_lora_from_dylora --model dylora.safetensors --save_to out.safetensors \
        --unit 4

A DyLoRA is trained so that every leading block of its ranks is a LoRA of its own: for rank r = unit, 2*unit, ...
below the file's rank, `<save_to stem>-<r:04d><ext>` keeps the first r rows of each lora_down and the first r columns
of each lora_up, with alpha unchanged (so its scale is alpha / r, as sd-scripts writes it). `--unit` defaults to the
`unit` the DyLoRA was trained with (its ss_network_args). Metadata: the input's, with ss_network_dim = r,
ss_training_comment 'split from DyLoRA, rank R to r; ...' and new sshs_* hashes; files are written atomically.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from typing import Sequence

from ..errors import NetworkError
from .lora_tools import LoRAFile, LoRAModuleWeights, ToolOption, build_parser, check_output_path, read_lora, \
    run_tool, write_lora

log = logging.getLogger(__name__)

OPTIONS: tuple[ToolOption, ...] = (
    ToolOption("unit", int, None, "rank step to split at (default: the DyLoRA's unit network_arg)"),
    ToolOption("save_to", str, None, "base name of the files to write (.safetensors, .ckpt, .pt); each gets "
               "-<rank:04d> before its extension", path="out_file"),
    ToolOption("model", str, None, "DyLoRA file to split", path="file"),
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return build_parser("extract_lora_from_dylora", __doc__.splitlines()[0], OPTIONS).parse_args(argv)


def truncate(lora: LoRAFile, rank: int) -> dict[str, LoRAModuleWeights]:
    """Every module cut to its first `rank` ranks (a module of lower rank is kept whole), alpha unchanged."""
    out = {}
    for name, m in lora.modules.items():
        r = min(rank, m.rank)
        out[name] = LoRAModuleWeights(name, m.down[:r].contiguous(), m.up[:, :r].contiguous(), m.alpha)
    return out


def _unit_of(lora: LoRAFile) -> int | None:
    try:
        unit = json.loads(lora.metadata.get("ss_network_args") or "{}").get("unit")
        return None if unit is None else int(unit)
    except (ValueError, TypeError, AttributeError):
        return None


def split(args: argparse.Namespace) -> list[str]:
    """Write the fixed-rank files; returns their paths."""
    if not args.model:
        raise NetworkError("option '--model' is required: the DyLoRA file to split")
    save_to = check_output_path(args.save_to)
    lora = read_lora(args.model)
    unit = args.unit if args.unit is not None else _unit_of(lora)
    if unit is None:
        raise NetworkError(f"option '--unit' is required: {args.model} does not record the unit it was trained with "
                           f"(give the rank step, e.g. --unit 4)")
    if unit < 1:
        raise NetworkError(f"option '--unit' must be 1 or more, not {unit}")
    max_rank = max(m.rank for m in lora.modules.values())
    if unit >= max_rank:
        raise NetworkError(f"option '--unit': {unit} leaves no lower rank to extract from {args.model} (rank "
                           f"{max_rank}): use a unit below it")
    comment = lora.metadata.get("ss_training_comment", "")
    stem, ext = os.path.splitext(save_to)
    written = []
    for rank in range(unit, max_rank, unit):
        metadata = dict(lora.metadata)
        metadata["ss_training_comment"] = f"split from DyLoRA, rank {max_rank} to {rank}; {comment}"
        metadata["ss_network_dim"] = str(rank)
        path = f"{stem}-{rank:04d}{ext}"
        write_lora(path, truncate(lora, rank), metadata, None, extra=lora.other)
        log.info("saved rank %d to %s", rank, path)
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    return run_tool("extract_lora_from_dylora", parse_args, split, argv)


if __name__ == "__main__":
    raise SystemExit(main())
