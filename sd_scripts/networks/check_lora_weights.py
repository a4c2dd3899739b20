"""Per-key statistics of a LoRA (or any weights) file (sd-scripts' check_lora_weights).

    python -m sd_scripts.networks.check_lora_weights lora.safetensors [-s]

Prints the number of LoRA tensors (kohya lora_up/lora_down, PEFT lora_A/lora_B, OFT), then one CSV line per tensor:
`key,shape (dims joined by '-'),mean |value|,min |value|` as sd-scripts does (plain numbers where it prints tensor
reprs); `-s` / `--show_all_keys` adds every other tensor (alpha, ...). Our addition: a last line counting tensors
with NaN or Inf values (a training that diverged) and kohya modules with an all-zero up weight (never trained).
"""
from __future__ import annotations

import argparse
import logging
from typing import Sequence, TextIO

from .lora_tools import ToolOption, build_parser, run_tool

log = logging.getLogger(__name__)

LORA_KEY_MARKS = ("lora_up", "lora_down", "lora_A", "lora_B", "oft_")

OPTIONS: tuple[ToolOption, ...] = (
    ToolOption("file", str, None, "the weights file to check (.safetensors, .ckpt, .pt)", positional=True,
               path="file"),
    ToolOption("show_all_keys", bool, False, "also list the tensors that are not LoRA weights", short="-s"),
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return build_parser("check_lora_weights", __doc__.splitlines()[0], OPTIONS).parse_args(argv)


def key_stats(tensor: torch.Tensor) -> tuple[tuple[int, ...], float, float]:
    """(shape, mean |value|, min |value|) of a tensor, computed in float32."""
    values = tensor.detach().float().abs()
    if values.numel() == 0:
        return tuple(tensor.shape), float("nan"), float("nan")
    return tuple(tensor.shape), float(values.mean()), float(values.min())


def check(args: argparse.Namespace, out: TextIO | None = None) -> list[tuple[str, tuple, float, float]]:
    """Print the statistics; returns the rows printed."""
    import torch

    import sys

    from .weights_file import load_weights_file

    out = out or sys.stdout
    log.info("loading: %s", args.file)
    tensors, _ = load_weights_file(args.file)
    keys = [k for k in tensors if any(mark in k for mark in LORA_KEY_MARKS)]
    print(f"number of LoRA modules: {len(keys)}", file=out)
    if args.show_all_keys:
        keys += [k for k in tensors if k not in set(keys)]
        print(f"number of all modules: {len(keys)}", file=out)
    rows = []
    for key in keys:
        shape, mean, low = key_stats(tensors[key])
        rows.append((key, shape, mean, low))
        print(f"{key},{str(shape).replace(', ', '-')},{mean},{low}", file=out)
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v.float()).all()]
    zero_ups = [k for k, v in tensors.items() if k.endswith("lora_up.weight") and not v.float().abs().sum()]
    print(f"tensors with NaN/Inf: {len(bad)}{' (e.g. ' + bad[0] + ')' if bad else ''}; modules with an all-zero "
          f"lora_up: {len(zero_ups)}", file=out)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    return run_tool("check_lora_weights", parse_args, check, argv)


if __name__ == "__main__":
    raise SystemExit(main())
