"""Resize a kohya LoRA to a lower rank by SVD of each module's update (sd-scripts' resize_lora).

    python -m sd_scripts.networks.resize_lora --model in.safetensors --save_to out.safetensors --new_rank 8 \
        [--new_conv_rank 4] [--dynamic_method sv_fro --dynamic_param 0.9] [--save_precision fp16] [--verbose]

Each module's update up @ down is factored again at `new_rank` (3x3 conv modules: `new_conv_rank`, default
new_rank) and alpha is set so alpha / rank (the update's scale) is unchanged. With a dynamic method the rank is the
smallest that keeps the stated share of the update (at most new_rank; lora_tools.choose_rank): sv_ratio (keep singular
values within a factor dynamic_param of the largest), sv_fro (keep dynamic_param of the Frobenius norm),
sv_cumulative (keep dynamic_param of the sum of singular values). A zero update becomes rank 1; no module grows
beyond its own rank (the extra directions would be zeros). sd-scripts keeps one
rank more than the threshold needs; here the kept rank is the smallest that meets it, so the stated share is what
is kept. The share kept is reported per module with --verbose (sum(S), Frobenius norm, max(S) ratio, as sd-scripts
prints it) and in a summary line always. Metadata: the input's, with ss_network_dim / ss_network_alpha
('Dynamic' when modules differ), ss_training_comment saying what was resized, and new sshs_* hashes.
"""
from __future__ import annotations

import argparse
import logging
from typing import Sequence

from ..errors import NetworkError
from .lora_tools import (DYNAMIC_METHODS, PRECISION_CHOICES, LoRAFile, LoRAModuleWeights, LowRank, ToolOption,
                         build_parser, check_output_path, dim_text, dtype_of, fidelity_line, fidelity_summary,
                         low_rank, read_lora, run_tool, torch_device, write_lora)

log = logging.getLogger(__name__)

OPTIONS: tuple[ToolOption, ...] = (
    ToolOption("model", str, None, "LoRA file to resize", path="file"),
    ToolOption("save_to", str, None, "file to write (.safetensors, .ckpt, .pt, .pth)", path="out_file"),
    ToolOption("new_rank", int, 4, "rank of the output (with a dynamic method: the largest rank)"),
    ToolOption("new_conv_rank", int, None, "rank of 3x3 conv modules (default new_rank)"),
    ToolOption("save_precision", str, None, "precision of the saved tensors (default float)",
               choices=PRECISION_CHOICES),
    ToolOption("device", str, None, "device to compute the SVDs on (cuda for a GPU)"),
    ToolOption("verbose", bool, False, "print the share of each module's update kept"),
    ToolOption("dynamic_method", str, None, "choose each module's rank by the share kept", choices=DYNAMIC_METHODS),
    ToolOption("dynamic_param", float, None, "the share (sv_fro, sv_cumulative: 0-1) or ratio (sv_ratio) to keep"),
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return build_parser("resize_lora", __doc__.splitlines()[0], OPTIONS).parse_args(argv)


def resize_modules(lora: LoRAFile, new_rank: int, new_conv_rank: int, *, method: str | None = None,
                   param: float | None = None, device: torch.device | None = None,
                   ) -> tuple[dict[str, LoRAModuleWeights], dict[str, LowRank]]:
    """Every module factored again (scale alpha / rank kept), and what each kept."""
    import torch

    modules, infos = {}, {}
    with torch.no_grad():
        for name, m in lora.modules.items():
            # never above the module's own rank: the directions beyond it would be zeros
            rank = min(new_conv_rank if m.is_conv_kxk else new_rank, m.rank)
            info = low_rank(m.product(torch.float32, device), rank, method=method, param=param, device=device,
                            zero_rank_one=True)
            modules[name] = LoRAModuleWeights(name, info.down, info.up, m.scale * info.rank)
            infos[name] = info
    return modules, infos


def resize(args: argparse.Namespace) -> tuple[dict[str, LoRAModuleWeights], dict[str, LowRank]]:
    import torch

    if not args.model:
        raise NetworkError("option '--model' is required: the LoRA file to resize")
    save_to = check_output_path(args.save_to)
    if args.dynamic_method and args.dynamic_param is None:
        raise NetworkError(f"--dynamic_method {args.dynamic_method} needs --dynamic_param (the share to keep)")
    if args.dynamic_param is not None and not args.dynamic_method:
        raise NetworkError("--dynamic_param is used only with --dynamic_method; add one or remove it")
    if args.dynamic_param is not None and args.dynamic_param <= 0:
        raise NetworkError("--dynamic_param must be greater than 0")
    if args.new_rank < 1 or (args.new_conv_rank is not None and args.new_conv_rank < 1):
        raise NetworkError("--new_rank and --new_conv_rank must be 1 or more")
    conv_rank = args.new_conv_rank if args.new_conv_rank is not None else args.new_rank
    save_dtype = dtype_of(args.save_precision, "save_precision") or torch.float32
    device = torch_device(args.device, "device")
    lora = read_lora(args.model, torch.float32)
    old_rank = max(m.rank for m in lora.modules.values())
    below = sum(1 for m in lora.modules.values() if m.rank < (conv_rank if m.is_conv_kxk else args.new_rank))
    if below:
        log.warning("%d modules have a rank below the new one; they keep their rank (resize_lora lowers ranks)",
                    below)
    if args.dynamic_method:
        log.info("choosing ranks with %s %s, at most %d", args.dynamic_method, args.dynamic_param, args.new_rank)
    modules, infos = resize_modules(lora, args.new_rank, conv_rank, method=args.dynamic_method,
                                    param=args.dynamic_param, device=device)
    if args.verbose:
        print()
        for name, info in infos.items():
            print(fidelity_line(name, info, alpha=modules[name].alpha if args.dynamic_method else None))
    summary = fidelity_summary(list(infos.values()))
    if args.verbose:
        print(summary)
    else:
        log.info(summary)

    metadata = dict(lora.metadata)
    comment = metadata.get("ss_training_comment", "")
    if args.dynamic_method:
        metadata["ss_training_comment"] = (f"Dynamic resize with {args.dynamic_method}: {args.dynamic_param} from "
                                           f"{old_rank}; {comment}")
        metadata["ss_network_dim"] = "Dynamic"
        metadata["ss_network_alpha"] = "Dynamic"
    else:
        conv = "" if conv_rank == args.new_rank else f" (conv: {conv_rank})"
        metadata["ss_training_comment"] = f"dimension is resized from {old_rank} to {args.new_rank}{conv}; {comment}"
        linear = [m for m in modules.values() if not m.is_conv_kxk] or list(modules.values())
        metadata["ss_network_dim"] = dim_text(m.rank for m in linear)
        metadata["ss_network_alpha"] = dim_text(m.alpha for m in linear)
    write_lora(save_to, modules, metadata, save_dtype, extra=lora.other)
    log.info("saved the resized LoRA (%d modules) to %s", len(modules), save_to)
    return modules, infos


def main(argv: Sequence[str] | None = None) -> int:
    return run_tool("resize_lora", parse_args, resize, argv)


if __name__ == "__main__":
    raise SystemExit(main())
