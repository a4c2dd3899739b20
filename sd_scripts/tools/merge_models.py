"""Weighted merge of full checkpoints of one model family (sd-scripts' tools/merge_models.py).

    python -m sd_scripts.tools.merge_models --models A.safetensors B.safetensors [C ...] --output merged.safetensors
        [--ratios 0.7 0.3] [--unet_only] [--precision float|fp16|bf16] [--saving_precision float|fp16|bf16]
        [--device cpu] [--show_skipped]

merged[key] = sum_i ratio_i * model_i[key], computed in `--precision` and saved in `--saving_precision`. Ratios
default to 1/N each. Keys are those of the first model (keys only in a later model are skipped, listed with
`--show_skipped`); a key a later model lacks takes the first model's value for that model's share. With
`--unet_only` the autoencoder and text-encoder tensors are the first model's, unmerged. Integer tensors (position
ids) are copied from the first model. Old single files whose CLIP keys lack the `text_model.` level are matched with
new ones. Every input must be a .safetensors file of the same family (read from its header, through the registry).
The output (`.safetensors` appended when missing) is written atomically; its metadata is the first model's plus
`sd_merge_recipe` (the models and ratios).
"""
from __future__ import annotations

import json
import logging
import os
import re
import sys

from ..errors import UserError
from .tool_cli import ToolOption, run_tool

log = logging.getLogger(__name__)

PRECISION_CHOICES = ("float", "fp16", "bf16")
OPTIONS: tuple[ToolOption, ...] = (
    ToolOption("models", str, None, "models to merge (.safetensors single files of one family)", nargs="+",
               required=True, path="file"),
    ToolOption("output", str, None, "merged model to write (.safetensors)", required=True, path="out_file"),
    ToolOption("ratios", float, None, "ratio of each model (default: equal, 1/N each)", nargs="+"),
    ToolOption("unet_only", bool, False, "merge only the denoiser; autoencoder and text encoders from the first "
                                         "model"),
    ToolOption("device", str, "cpu", "device to compute on"),
    ToolOption("precision", str, "float", "calculation precision", choices=PRECISION_CHOICES),
    ToolOption("saving_precision", str, "float", "precision of the saved tensors", choices=PRECISION_CHOICES),
    ToolOption("show_skipped", bool, False, "log keys of later models that the first model does not have"),
)

#: single-file key prefixes of the parts that are not the denoiser (autoencoder, text encoders)
NON_DENOISER_PREFIXES = ("first_stage_model.", "cond_stage_model.", "conditioner.", "text_encoders.", "vae.")
_CLIP_WITHOUT_LEVEL = re.compile(r"(^|\.)transformer\.(embeddings|encoder|final_layer_norm)\.")


def is_denoiser_key(key: str) -> bool:
    return not key.startswith(NON_DENOISER_PREFIXES)


def canonical_key(key: str) -> str:
    """The key with a CLIP text model's `text_model.` level added where an old file leaves it out."""
    return _CLIP_WITHOUT_LEVEL.sub(lambda m: f"{m.group(1)}transformer.text_model.{m.group(2)}.", key, count=1)


def check_inputs(models: list[str], ratios: list[float] | None) -> list[float]:
    """The ratio of each model, after checking every file exists, is a .safetensors of a known family, and they
    are all of one family."""
    from ..families import family_spec, probe_model

    if len(models) < 2:
        raise UserError("--models needs at least two files to merge")
    if ratios is not None and len(ratios) != len(models):
        raise UserError(f"--ratios has {len(ratios)} values for {len(models)} models: give one ratio per model")
    families = []
    for path in models:
        if not path.lower().endswith(".safetensors"):
            raise UserError(f"{path}: only .safetensors models can be merged; convert it first "
                            f"(python -m sd_scripts.tools.convert_diffusers20_original_sd)")
        if not os.path.isfile(path):
            raise UserError(f"{path}: no such file; check the --models paths")
        families.append(probe_model(path).family)
    if len(set(families)) > 1:
        kinds = ", ".join(f"{os.path.basename(p)}: {family_spec(f).label}" for p, f in zip(models, families))
        raise UserError(f"--models are of different model families ({kinds}); merge models of one family")
    return list(ratios) if ratios is not None else [1.0 / len(models)] * len(models)


def merge_models(models: list[str], ratios: list[float] | None = None, *, unet_only: bool = False,
                 precision: str = "float", device: str = "cpu", show_skipped: bool = False) -> tuple[dict, dict]:
    """(merged tensors in `precision`, the first model's metadata)."""
    import torch
    from safetensors import safe_open

    from .tool_cli import torch_device, torch_dtype

    ratios = check_inputs(models, ratios)
    dtype = torch_dtype(precision, "precision")
    dev = str(torch_device(device))
    merged: dict[str, torch.Tensor] = {}
    first_only: dict[str, float] = {}  # key -> share of the first model's value still to add
    with safe_open(models[0], framework="pt", device=dev) as f:
        metadata = dict(f.metadata() or {})
        for key in f.keys():
            value = f.get_tensor(key)
            name = canonical_key(key)
            if not value.is_floating_point() or (unet_only and not is_denoiser_key(name)):
                merged[name] = value  # kept as the first model has it
                continue
            merged[name] = value.to(dtype) * ratios[0]
    float_keys = {k for k, v in merged.items() if v.is_floating_point()
                  and not (unet_only and not is_denoiser_key(k))}
    for path, ratio in zip(models[1:], ratios[1:]):
        log.info("merging %s, ratio %s", path, ratio)
        seen = set()
        with safe_open(path, framework="pt", device=dev) as f:
            for key in f.keys():
                name = canonical_key(key)
                if name not in float_keys:
                    if show_skipped and name not in merged:
                        log.info("Skip: %s (not in %s)", name, models[0])
                    continue
                value = f.get_tensor(key)
                if value.shape != merged[name].shape:
                    raise UserError(f"{path}: tensor {key} has shape {tuple(value.shape)} but "
                                    f"{tuple(merged[name].shape)} in {models[0]}; the models are of different "
                                    f"sizes and cannot be merged")
                merged[name] += value.to(dtype) * ratio
                seen.add(name)
        for name in float_keys - seen:
            log.warning("%s not in %s: the first model's value is used for its share", name, path)
            first_only[name] = first_only.get(name, 0.0) + ratio
    if first_only:
        with safe_open(models[0], framework="pt", device=dev) as f:
            for key in f.keys():
                name = canonical_key(key)
                if name in first_only:
                    merged[name] += f.get_tensor(key).to(dtype) * first_only[name]
    return merged, metadata


def run(args) -> None:
    from ..models.module_io import save_safetensors_atomic
    from .tool_cli import torch_dtype

    output = args.output if args.output.lower().endswith(".safetensors") else args.output + ".safetensors"
    merged, metadata = merge_models(args.models, args.ratios, unet_only=args.unet_only, precision=args.precision,
                                    device=args.device, show_skipped=args.show_skipped)
    ratios = args.ratios or [1.0 / len(args.models)] * len(args.models)
    metadata["sd_merge_recipe"] = json.dumps({
        "type": "merge_models", "models": [os.path.basename(m) for m in args.models], "ratios": ratios,
        "unet_only": args.unet_only, "precision": args.precision})
    save_dtype = torch_dtype(args.saving_precision, "saving_precision")
    tensors = {k: v.cpu() for k, v in merged.items()}
    save_safetensors_atomic(tensors, output, metadata, dtype=save_dtype)
    log.info("saved %s (%d tensors)", output, len(tensors))


def main(argv: list[str] | None = None) -> int:
    return run_tool("python -m sd_scripts.tools.merge_models", "Weighted merge of checkpoints of one model family.",
                    OPTIONS, run, argv)


if __name__ == "__main__":
    sys.exit(main())
