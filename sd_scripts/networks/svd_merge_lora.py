"""Merge kohya LoRA files into one LoRA of a new rank by SVD (sd-scripts' svd_merge_lora).

    python -m sd_scripts.networks.svd_merge_lora --models a.safetensors b.safetensors --ratios 0.6 0.4 \
        --new_rank 16 [--new_conv_rank 8] --save_to merged.safetensors [--precision float] [--save_precision fp16]

Per module, the updates (up @ down x alpha/rank x ratio) of every file that has it are summed, and the sum is
factored by SVD at `new_rank` (3x3 conv modules: `new_conv_rank`, default new_rank; at most the layer's size), with
alpha = rank. Like sd-scripts, the factors' entries are clipped at their 0.99 quantile of magnitude
(`--clamp_quantile`, our addition; 1 keeps them as they are). The share of each merged update that the new rank
keeps is reported (summary line; per module with --verbose). `--lbws`: U-Net block weights per LoRA, as in
merge_lora. Modules of different shapes under one name are an
error naming the module (LoRAs of different base models). Metadata: minimal ss_* keys (dim/alpha = new_rank,
conv_dim/conv_alpha in ss_network_args when conv modules are present), modelspec with merged_from unless
--no_metadata, sshs_* hashes.
"""
from __future__ import annotations

import argparse
import logging
from typing import Sequence

from ..errors import NetworkError
from .lora_tools import (PRECISION_CHOICES, LoRAModuleWeights, LowRank, ToolOption, build_parser, check_lbws_apply,
                         check_output_path, dim_text, dtype_of, fidelity_line, fidelity_summary, lbw_factor,
                         lora_family, low_rank, modelspec, network_metadata, output_title, parse_lbws, read_lora,
                         run_tool, title_of, torch_device, write_lora)

log = logging.getLogger(__name__)

CLAMP_QUANTILE = 0.99

OPTIONS: tuple[ToolOption, ...] = (
    ToolOption("models", str, None, "LoRA files to merge", nargs="*", path="file"),
    ToolOption("ratios", float, None, "ratio of each LoRA (default 1 each)", nargs="*"),
    ToolOption("save_to", str, None, "file to write (.safetensors, .ckpt, .pt)", path="out_file"),
    ToolOption("new_rank", int, 4, "rank of the merged LoRA"),
    ToolOption("new_conv_rank", int, None, "rank of its 3x3 conv modules (default new_rank)"),
    ToolOption("precision", str, "float", "precision of the merge arithmetic (float recommended)",
               choices=PRECISION_CHOICES),
    ToolOption("save_precision", str, None, "precision of the saved tensors (default: the merge precision)",
               choices=PRECISION_CHOICES),
    ToolOption("device", str, None, "device to compute on (cuda for a GPU)"),
    ToolOption("clamp_quantile", float, CLAMP_QUANTILE, "clip the factors' entries at this quantile of their "
               "magnitudes (sd-scripts: always 0.99); 1 keeps them"),
    ToolOption("no_metadata", bool, False, "write no modelspec metadata (the minimal ss_* keys are kept)"),
    ToolOption("verbose", bool, False, "print the share of each module's merged update kept"),
    ToolOption("lbws", str, None, "U-Net block weights per LoRA: JSON lists of 12, 17, 20 or 26 numbers (BASE, "
               "IN.., MID, OUT.. slots), multiplying each module's ratio", nargs="*"),
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return build_parser("svd_merge_lora", __doc__.splitlines()[0], OPTIONS).parse_args(argv)


def summed_updates(paths: Sequence[str], ratios: Sequence[float], *, dtype: torch.dtype, device: torch.device,
                   lbws: list | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Per module, the ratio-weighted (and block-weighted) sum of the files' updates; and the first file's
    metadata."""
    import torch

    sums: dict[str, torch.Tensor] = {}
    first_meta: dict[str, str] | None = None
    families = set()
    for i, (path, ratio) in enumerate(zip(paths, ratios)):
        lora = read_lora(path, dtype)
        check_lbws_apply(lbws, list(lora.modules), path)
        first_meta = lora.metadata if first_meta is None else first_meta
        families.add(lora_family(lora.metadata))
        for name, m in lora.modules.items():
            delta = m.delta(dtype, device) * (ratio * lbw_factor(lbws[i] if lbws else None, name))
            if name not in sums:
                sums[name] = delta
            elif sums[name].shape != delta.shape:
                raise NetworkError(f"{path}: module {name} adapts a {list(delta.shape)} weight but the LoRAs before "
                                   f"it a {list(sums[name].shape)} one: they were made for different base models")
            else:
                sums[name] = sums[name] + delta
    families.discard(None)
    if len(families) > 1:
        raise NetworkError(f"the LoRAs were made for different models ({', '.join(sorted(f[0] for f in families))} "
                           f"by their metadata): merge LoRAs of one model family")
    return sums, first_meta or {}


def merge(args: argparse.Namespace) -> tuple[dict[str, LoRAModuleWeights], dict[str, LowRank]]:
    import torch

    if not args.models:
        raise NetworkError("option '--models' is required: the LoRA files to merge")
    ratios = list(args.ratios) if args.ratios else [1.0] * len(args.models)
    if len(ratios) != len(args.models):
        raise NetworkError(f"--ratios has {len(ratios)} values for {len(args.models)} --models: give one ratio per "
                           f"LoRA")
    lbws = parse_lbws(args.lbws, len(args.models))
    if args.new_rank < 1 or (args.new_conv_rank is not None and args.new_conv_rank < 1):
        raise NetworkError("--new_rank and --new_conv_rank must be 1 or more")
    if not 0 < args.clamp_quantile <= 1:
        raise NetworkError("--clamp_quantile must be in (0, 1]")
    save_to = check_output_path(args.save_to)
    merge_dtype = dtype_of(args.precision, "precision")
    save_dtype = dtype_of(args.save_precision, "save_precision") or merge_dtype
    device = torch_device(args.device, "device")
    conv_rank = args.new_conv_rank if args.new_conv_rank is not None else args.new_rank
    log.info("new rank: %d, new conv rank: %d", args.new_rank, conv_rank)

    sums, first_meta = summed_updates(args.models, ratios, dtype=merge_dtype, device=device, lbws=lbws)
    modules: dict[str, LoRAModuleWeights] = {}
    infos: dict[str, LowRank] = {}
    with torch.no_grad():
        for name, delta in sums.items():
            is_kxk = delta.dim() == 4 and tuple(delta.shape[2:]) != (1, 1)
            info = low_rank(delta.float(), conv_rank if is_kxk else args.new_rank,
                            clamp_quantile=args.clamp_quantile, device=device)
            modules[name] = LoRAModuleWeights(name, info.down, info.up, float(info.rank))
            infos[name] = info
    if args.verbose:
        print()
        for name, info in infos.items():
            print(fidelity_line(name, info))
    summary = fidelity_summary(list(infos.values()))
    if args.verbose:
        print(summary)
    else:
        log.info(summary)

    has_conv = any(m.is_conv_kxk for m in modules.values())
    metadata = network_metadata(v2=first_meta.get("ss_v2"), base_model=first_meta.get("ss_base_model_version"),
                                dim=str(args.new_rank), alpha=str(args.new_rank),
                                network_args={"conv_dim": conv_rank, "conv_alpha": conv_rank} if has_conv else None)
    if not args.no_metadata:
        family = lora_family(first_meta)
        metadata.update(modelspec(family[0] if family else None, bool(family and family[1]),
                                  title=output_title(save_to), merged_from=", ".join(title_of(p) for p in args.models)))
    write_lora(save_to, modules, metadata, save_dtype)
    log.info("saved the merged LoRA (%d modules, ranks %s) to %s", len(modules),
             dim_text(m.rank for m in modules.values()), save_to)
    return modules, infos


def main(argv: Sequence[str] | None = None) -> int:
    return run_tool("svd_merge_lora", parse_args, merge, argv)


if __name__ == "__main__":
    raise SystemExit(main())
