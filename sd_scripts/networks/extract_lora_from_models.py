"""Extract a kohya LoRA from a fine-tuned model and its base by SVD of the weight differences (sd-scripts'
extract_lora_from_models, and the options of its SDXL / FLUX.1 variants; one tool for every model family).

    python -m sd_scripts.networks.extract_lora_from_models --model_org base.safetensors \
        --model_tuned tuned.safetensors --save_to lora.safetensors --dim 16 [--conv_dim 8] \
        [--clamp_quantile 0.99] [--min_diff 0.01] [--load_precision fp16] [--save_precision fp16] [--device cuda]

Both models are read through the registry (single file or diffusers folder; the family comes from the files, and
sd-scripts' --v2 / --sdxl / --v_parameterization are checked against it). The layers a LoRA of the family adapts
(with --conv_dim also the ResNet/sampler layers, LoCon) are compared; each difference is factored by SVD at `dim`
(3x3 convs: `conv_dim`; at most the layer's size) with alpha = rank, its factors' entries clipped at the
`clamp_quantile` of their magnitudes (1: no clipping). When no text-encoder weight differs by more than `min_diff`,
the text encoders are left out (a U-Net-only LoRA), as sd-scripts does. The share of each difference the LoRA keeps
(Frobenius norm) is reported: a summary line always, per module with --verbose; with clamp_quantile 1 the error of
a module is exactly sqrt(1 - kept^2) of its difference. Models of different families or sizes are an error naming
the first layer that differs in shape.
"""
from __future__ import annotations

import argparse
import logging
from typing import Sequence

from ..errors import NetworkError
from .lora_tools import (PART_FILE_OPTIONS, part_files,
                         PRECISION_CHOICES, LoRAModuleWeights, LowRank, ToolOption, build_parser, check_output_path,
                         dtype_of, family_facts, family_flag_options, family_flags, fidelity_line, fidelity_summary,
                         load_base_model, low_rank, model_layers, modelspec, network_metadata, output_title,
                         run_tool, text_encoder_prefixes, torch_device, write_lora)

log = logging.getLogger(__name__)

OPTIONS: tuple[ToolOption, ...] = (
    ToolOption("model_org", str, None, "the base model (single file or diffusers folder)", path="file_or_dir"),
    ToolOption("model_tuned", str, None, "the fine-tuned model; the LoRA is the change from model_org to it",
               path="file_or_dir"),
    ToolOption("save_to", str, None, "file to write (.safetensors, .ckpt, .pt)", path="out_file"),
    ToolOption("dim", int, 4, "rank of the LoRA"),
    ToolOption("conv_dim", int, None, "rank of 3x3 conv modules; set it to extract the ResNet layers too (LoCon)"),
    ToolOption("clamp_quantile", float, 0.99, "clip the factors' entries at this quantile of their magnitudes "
               "(0-1; 1 keeps them)"),
    ToolOption("min_diff", float, 0.01, "text encoders whose weights differ by at most this are left out"),
    ToolOption("load_precision", str, None, "precision to load the models in (default: as stored, read as float)",
               choices=PRECISION_CHOICES),
    ToolOption("save_precision", str, None, "precision of the saved tensors (default float)",
               choices=PRECISION_CHOICES),
    ToolOption("device", str, None, "device to compute the SVDs on (cuda for a GPU)"),
    ToolOption("load_original_model_to", str, None, "device to load model_org to (default cpu)"),
    ToolOption("load_tuned_model_to", str, None, "device to load model_tuned to (default cpu)"),
    ToolOption("no_metadata", bool, False, "write no modelspec metadata (the minimal ss_* keys are kept)"),
    ToolOption("verbose", bool, False, "print the share of each module's difference kept"),
    ToolOption("v2", bool, False, "the models are SD 2.x (checked against the files)"),
    *family_flag_options(),
    ToolOption("v_parameterization", bool, False, "write v-prediction metadata (default: what the base model says)"),
    *PART_FILE_OPTIONS,
    ToolOption("mem_eff_safe_open", bool, False, "accepted for sd-scripts command lines: our loader always "
               "memory-maps"),
)


def parse_args(argv: Sequence[str] | None = None, prog: str = "extract_lora_from_models") -> argparse.Namespace:
    return build_parser(prog, __doc__.splitlines()[0], OPTIONS).parse_args(argv)


def _load(args: argparse.Namespace, option: str, device_option: str):
    import torch

    dtype = dtype_of(args.load_precision, "load_precision") or torch.float32
    return load_base_model(getattr(args, option), option, dtype=dtype,
                           device=torch_device(getattr(args, device_option), device_option),
                           flags=family_flags(args, "v2", "v_parameterization"),
                           **part_files(args))


def weight_differences(org, tuned, *, include_conv: bool, min_diff: float, source: str,
                       ) -> dict[str, torch.Tensor]:
    """Per LoRA module name, tuned - base (float32, CPU); text-encoder modules only when one differs by more than
    min_diff."""
    import torch

    if org.family != tuned.family:
        raise NetworkError(f"{source}: the models are of different families ({org.family} and {tuned.family}): "
                           f"extract from a fine-tune of the same model")
    base_layers = model_layers(org, include_conv=include_conv, outside_blocks=False)
    tuned_layers = model_layers(tuned, include_conv=include_conv, outside_blocks=False)
    te_prefixes = tuple(p + "_" for p in text_encoder_prefixes(org.family))
    diffs: dict[str, torch.Tensor] = {}
    te_max = 0.0
    for name, layer in base_layers.items():
        other = tuned_layers.get(name)
        if other is None or other.shape != layer.shape:
            found = "missing" if other is None else list(other.shape)
            raise NetworkError(f"{source}: layer {name} is {list(layer.shape)} in the base model but {found} in the "
                               f"tuned one: the models are of different sizes; extract from a fine-tune of the base")
        diff = other.weight(torch.float32).cpu() - layer.weight(torch.float32).cpu()
        if name.startswith(te_prefixes):
            te_max = max(te_max, float(diff.abs().max()) if diff.numel() else 0.0)
        diffs[name] = diff
    if te_max <= min_diff:
        log.warning("the text encoders differ by at most %g (<= min_diff %g): extracting the denoiser only", te_max,
                    min_diff)
        diffs = {n: d for n, d in diffs.items() if not n.startswith(te_prefixes)}
    else:
        log.info("the text encoders differ (up to %g > min_diff %g): extracting them too", te_max, min_diff)
    return diffs


def extract(args: argparse.Namespace) -> tuple[dict[str, LoRAModuleWeights], dict[str, LowRank]]:
    import torch

    for option in ("model_org", "model_tuned"):
        if not getattr(args, option):
            raise NetworkError(f"option '--{option}' is required: the {'base' if option == 'model_org' else 'tuned'} "
                               f"model file or folder")
    save_to = check_output_path(args.save_to)
    if args.dim < 1 or (args.conv_dim is not None and args.conv_dim < 1):
        raise NetworkError("--dim and --conv_dim must be 1 or more")
    if not 0 < args.clamp_quantile <= 1:
        raise NetworkError("--clamp_quantile must be in (0, 1]")
    save_dtype = dtype_of(args.save_precision, "save_precision") or torch.float32
    device = torch_device(args.device, "device")
    org = _load(args, "model_org", "load_original_model_to")
    tuned = _load(args, "model_tuned", "load_tuned_model_to")
    diffs = weight_differences(org, tuned, include_conv=args.conv_dim is not None, min_diff=args.min_diff,
                               source=args.model_tuned)
    family, v_prediction = org.family, bool(args.v_parameterization or org.v_prediction)
    del tuned

    modules: dict[str, LoRAModuleWeights] = {}
    infos: dict[str, LowRank] = {}
    with torch.no_grad():
        for name, diff in diffs.items():
            is_kxk = diff.dim() == 4 and tuple(diff.shape[2:]) != (1, 1)
            info = low_rank(diff, args.conv_dim if is_kxk else args.dim, clamp_quantile=args.clamp_quantile,
                            device=device)
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

    network_args = None
    if args.conv_dim is not None:
        network_args = {"conv_dim": args.conv_dim, "conv_alpha": float(args.conv_dim)}
    facts = family_facts(family, v_prediction)
    metadata = network_metadata(v2=facts["ss_v2"], base_model=facts["ss_base_model_version"], dim=str(args.dim),
                                alpha=str(float(args.dim)), network_args=network_args)
    if not args.no_metadata:
        metadata.update(modelspec(family, v_prediction, title=output_title(save_to)))
    write_lora(save_to, modules, metadata, save_dtype)
    log.info("saved the extracted LoRA (%d modules) to %s", len(modules), save_to)
    return modules, infos


def main(argv: Sequence[str] | None = None, prog: str = "extract_lora_from_models") -> int:
    """`prog`: the sd-scripts name the command line used (its sdxl_ / flux_ variants run this same tool)."""
    return run_tool(prog, lambda a: parse_args(a, prog), extract, argv)


if __name__ == "__main__":
    raise SystemExit(main())
