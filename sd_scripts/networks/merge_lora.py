"""Merge kohya LoRA files into a model checkpoint, or into one LoRA file (sd-scripts' merge_lora /
sdxl_merge_lora / flux_merge_lora, one tool for every model family).

    python -m sd_scripts.networks.merge_lora --sd_model model.safetensors --models a.safetensors b.safetensors \
        --ratios 1.0 0.5 --save_to merged.safetensors [--precision float] [--save_precision fp16]
    python -m sd_scripts.networks.merge_lora --models a.safetensors b.safetensors --ratios 1 1 --save_to ab.safetensors
        [--concat] [--shuffle]

Into a model: each LoRA's update (up @ down x alpha/rank x ratio) is added to the weight of the layer its module
names; the layers come from the model family's LoRA naming (read from the file through the registry), so the same
command merges SD 1.x/2.x, SDXL, SD3 and FLUX.1 LoRAs into their models. The merged model is saved the way the family
saves full checkpoints (single file, original layout), atomically, with modelspec metadata naming what was merged
(`modelspec.merged_from`). A LoRA whose shapes do not fit the model is an error naming the first such module.

Without a model: the LoRAs become one LoRA. `--concat` stacks their ranks (the result's rank is the sum; its update is
exactly the ratio-weighted sum of theirs). Without it the factors are added module by module (every file needs the
same rank per module), each scaled so that a single file merged at ratio r gives exactly r x its update; the sum of
several files' factors is an approximation, as in sd-scripts (use --concat or svd_merge_lora for an exact merge).
Note: sd-scripts scales both factors by the ratio, so its ratio r acts as r x |r|; ours acts as r.

`--lbws` (sdxl_merge_lora's U-Net block weights, both modes): per LoRA a JSON list of 12, 17, 20 or 26 weights for
the block slots (BASE = text encoders, IN00-IN11, MID, OUT00-OUT11; lora_tools.LBW_PRESETS says which slots a length
sets) that multiply the ratio of the modules in those blocks.
"""
from __future__ import annotations

import argparse
import logging
import math
from typing import Sequence

from ..errors import NetworkError
from .lora_tools import (PART_FILE_OPTIONS, part_files,
                         PRECISION_CHOICES, PRECISIONS, LoRAModuleWeights, ToolOption, build_parser,
                         check_lbws_apply, check_output_path, dim_text, dtype_of, lbw_factor, load_base_model,
                         lora_family, match_layers, model_layers, modelspec, network_metadata, output_title,
                         parse_lbws, read_lora, run_tool, text_encoder_prefixes, title_of, torch_device, write_lora)

log = logging.getLogger(__name__)

OPTIONS: tuple[ToolOption, ...] = (
    ToolOption("sd_model", str, None, "model to merge into (single file or diffusers folder); without it the LoRAs "
               "are merged into one LoRA", path="file_or_dir", aliases=("flux_model",)),
    ToolOption("models", str, None, "LoRA files to merge", nargs="*", path="file"),
    ToolOption("ratios", float, None, "ratio of each LoRA (default 1 each)", nargs="*"),
    ToolOption("save_to", str, None, "file to write (.safetensors or .ckpt)", path="out_file"),
    ToolOption("precision", str, "float", "precision of the merge arithmetic (float recommended)",
               choices=PRECISION_CHOICES),
    ToolOption("save_precision", str, None, "precision of the saved tensors (default: the merge precision)",
               choices=tuple(PRECISIONS)),
    ToolOption("concat", bool, False, "LoRA merge: stack the ranks (result rank = sum of the inputs' ranks)"),
    ToolOption("shuffle", bool, False, "LoRA merge: permute each module's rank dimension (the update is unchanged)"),
    ToolOption("no_metadata", bool, False, "write no modelspec metadata (a LoRA keeps the minimal ss_* keys)"),
    ToolOption("v2", bool, False, "the model is SD 2.x (checked against the file; the kind is read from it)"),
    *PART_FILE_OPTIONS,
    ToolOption("loading_device", str, "cpu", "device to hold the model on while merging"),
    ToolOption("working_device", str, "cpu", "device to compute the LoRA updates on"),
    ToolOption("mem_eff_load_save", bool, False, "accepted for sd-scripts command lines: our loader always "
               "memory-maps and our writer streams tensor by tensor"),
    ToolOption("lbws", str, None, "U-Net block weights per LoRA: JSON lists of 12, 17, 20 or 26 numbers (BASE, "
               "IN.., MID, OUT.. slots), multiplying each module's ratio", nargs="*"),
    ToolOption("clip_l_save_to", str, None, "where to save the merged CLIP-L (not supported yet: refused)",
               path="out_file"),
    ToolOption("t5xxl_save_to", str, None, "where to save the merged T5-XXL (not supported yet: refused)",
               path="out_file"),
    ToolOption("diffusers", bool, False, "the LoRAs are diffusers-format (not supported: refused)"),
)


def parse_args(argv: Sequence[str] | None = None, prog: str = "merge_lora") -> argparse.Namespace:
    return build_parser(prog, __doc__.splitlines()[0], OPTIONS).parse_args(argv)


# ------------------------------------------------------------------ into a model
def merge_into_model(args: argparse.Namespace, ratios: list[float], lbws: list | None) -> None:
    import torch

    merge_dtype = dtype_of(args.precision, "precision")
    save_dtype = dtype_of(args.save_precision, "save_precision") or merge_dtype
    holder = torch_device(args.loading_device, "loading_device")
    worker = torch_device(args.working_device, "working_device")
    save_to = check_output_path(args.save_to)
    bundle = load_base_model(args.sd_model, "sd_model", dtype=merge_dtype, device=holder, flags={"v2": args.v2},
                             **part_files(args))
    layers = model_layers(bundle)
    te_prefixes = tuple(p + "_" for p in text_encoder_prefixes(bundle.family))
    text_encoder_merged = False
    with torch.no_grad():
        for i, (path, ratio) in enumerate(zip(args.models, ratios)):
            lora = read_lora(path, merge_dtype)
            matched = match_layers(lora, layers, args.sd_model)
            weights = lbws[i] if lbws else None
            check_lbws_apply(lbws, list(lora.modules), path)
            for name, layer in matched.items():
                factor = ratio * lbw_factor(weights, name)
                layer.add(lora.modules[name].delta(merge_dtype, worker) * factor, dtype=merge_dtype)
            text_encoder_merged |= any(n.startswith(te_prefixes) for n in matched)
            log.info("merged %s (ratio %s): %d modules", path, ratio, len(matched))
    given = [f"--{o}" for o in part_files(args)]
    if text_encoder_merged and given:
        log.warning("the LoRAs change the text encoders, and part files were given (%s), but this tool saves only "
                    "the checkpoint --save_to: changes to text encoders read from part files are not saved "
                    "(separate text-encoder outputs are not supported yet)", " / ".join(given))

    metadata = None
    if not args.no_metadata:
        merged_from = ", ".join(title_of(p) for p in [args.sd_model, *args.models])
        metadata = modelspec(bundle.family, bundle.v_prediction, title=output_title(save_to),
                             merged_from=merged_from, adapter="")
    from ..families import family_class

    family = family_class(bundle.family)(bundle)
    if metadata is not None:
        metadata = family.adjust_metadata(metadata)
    for part in (bundle.denoiser, *bundle.text_encoders):
        if part is not None:
            part.to("cpu")
    family.save_checkpoint(save_to, dtype=save_dtype, metadata=metadata, diffusers=False)
    log.info("saved the merged model to %s", save_to)


# ------------------------------------------------------------------ into one LoRA
def _split(k: float) -> tuple[float, float]:
    """Factors (for down, for up) whose product is k, equal in size, the sign on down."""
    root = math.sqrt(abs(k))
    return math.copysign(root, k), root


def merge_loras(paths: Sequence[str], ratios: Sequence[float], *, dtype: torch.dtype, concat: bool,
                shuffle: bool, lbws: list | None = None) -> tuple[dict[str, LoRAModuleWeights], dict[str, str]]:
    """The merged modules and the first file's metadata (for its family facts). `lbws`: per file, block weights
    that multiply its ratio per module (parse_lbws)."""
    import torch

    files = [read_lora(p, dtype) for p in paths]
    families = {lora_family(f.metadata) for f in files} - {None}
    if len(families) > 1:
        raise NetworkError(f"the LoRAs were made for different models ({', '.join(sorted(str(f[0]) for f in families))}"
                           f" by their metadata): merge LoRAs of one model family")
    merged: dict[str, LoRAModuleWeights] = {}
    for i, (lora, file_ratio) in enumerate(zip(files, ratios)):
        check_lbws_apply(lbws, list(lora.modules), lora.path)
        for name, m in lora.modules.items():
            ratio = file_ratio * lbw_factor(lbws[i] if lbws else None, name)
            first = merged.get(name)
            if concat:
                down_k, up_k = _split(ratio * m.scale)
                if first is None:
                    merged[name] = LoRAModuleWeights(name, m.down * down_k, m.up * up_k, float(m.rank))
                    continue
                _check_fits(name, first, m, lora.path, same_rank=False)
                merged[name] = LoRAModuleWeights(name, torch.cat([first.down, m.down * down_k], 0),
                                                 torch.cat([first.up, m.up * up_k], 1), float(first.rank + m.rank))
                continue
            if first is None:  # this file's alpha is the module's alpha; scale the factors relative to it
                merged[name] = LoRAModuleWeights(name, torch.zeros_like(m.down), torch.zeros_like(m.up), m.alpha)
                first = merged[name]
            _check_fits(name, first, m, lora.path, same_rank=True)
            down_k, up_k = _split(ratio * m.scale / first.scale)
            first.down = first.down + m.down * down_k
            first.up = first.up + m.up * up_k
    if shuffle:
        for m in merged.values():
            order = torch.randperm(m.rank)
            m.down, m.up = m.down[order], m.up[:, order]
    return merged, files[0].metadata


def _check_fits(name: str, merged: LoRAModuleWeights, m: LoRAModuleWeights, path: str, *, same_rank: bool) -> None:
    if tuple(merged.down.shape[1:]) != tuple(m.down.shape[1:]) or merged.up.shape[0] != m.up.shape[0]:
        raise NetworkError(f"{path}: module {name} adapts a {[m.up.shape[0], *m.down.shape[1:]]} weight but the "
                           f"LoRAs before it a {[merged.up.shape[0], *merged.down.shape[1:]]} one: the LoRAs were "
                           f"made for different base models")
    if same_rank and merged.rank != m.rank:
        raise NetworkError(f"{path}: module {name} has rank {m.rank} but the LoRAs before it {merged.rank}: add "
                           f"--concat (ranks are stacked) or use svd_merge_lora (a new rank)")


def merge_into_lora(args: argparse.Namespace, ratios: list[float], lbws: list | None) -> None:
    merge_dtype = dtype_of(args.precision, "precision")
    save_dtype = dtype_of(args.save_precision, "save_precision") or merge_dtype
    save_to = check_output_path(args.save_to)
    modules, first_meta = merge_loras(args.models, ratios, dtype=merge_dtype, concat=args.concat,
                                      shuffle=args.shuffle, lbws=lbws)
    metadata = network_metadata(v2=first_meta.get("ss_v2"), base_model=first_meta.get("ss_base_model_version"),
                                dim=dim_text(m.rank for m in modules.values()),
                                alpha=dim_text(m.alpha for m in modules.values()))
    if not args.no_metadata:
        family = lora_family(first_meta)
        metadata.update(modelspec(family[0] if family else None, bool(family and family[1]),
                                  title=output_title(save_to), merged_from=", ".join(title_of(p) for p in args.models)))
    write_lora(save_to, modules, metadata, save_dtype)
    log.info("saved the merged LoRA (%d modules, rank %s) to %s", len(modules), metadata["ss_network_dim"], save_to)


def merge(args: argparse.Namespace) -> None:
    if not args.models:
        raise NetworkError("option '--models' is required: the LoRA files to merge")
    ratios = list(args.ratios) if args.ratios else [1.0] * len(args.models)
    if len(ratios) != len(args.models):
        raise NetworkError(f"--ratios has {len(ratios)} values for {len(args.models)} --models: give one ratio per "
                           f"LoRA")
    lbws = parse_lbws(args.lbws, len(args.models))
    for option in ("clip_l_save_to", "t5xxl_save_to", "diffusers"):
        if getattr(args, option):
            raise NetworkError(f"option '--{option}' is not supported by this merge_lora yet; remove it")
    if args.sd_model:
        for option in ("concat", "shuffle"):
            if getattr(args, option):
                raise NetworkError(f"option '--{option}' applies when LoRAs are merged into one LoRA; remove it or "
                                   f"--sd_model")
        merge_into_model(args, ratios, lbws)
    else:
        merge_into_lora(args, ratios, lbws)


def main(argv: Sequence[str] | None = None, prog: str = "merge_lora") -> int:
    """`prog`: the sd-scripts name the command line used (its sdxl_ / flux_ variants run this same tool)."""
    return run_tool(prog, lambda a: parse_args(a, prog), merge, argv)


if __name__ == "__main__":
    raise SystemExit(main())
