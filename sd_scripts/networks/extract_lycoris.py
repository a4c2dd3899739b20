"""Extract a LyCORIS LoCon from a fine-tuned model and its base through lycoris-lora's extraction
(`lycoris.utils.extract_diff`, what LyCORIS' extract_locon tool runs), written under the model family's names.

    python -m sd_scripts.networks.extract_lycoris --model_org base.safetensors --model_tuned tuned.safetensors \
        --save_to locon.safetensors [--mode fixed --linear_dim 64 --conv_dim 32 | --mode threshold \
        --linear_threshold 0.1 --conv_threshold 0.1 | --mode ratio --linear_ratio 0.5 --conv_ratio 0.5 | --mode \
        quantile --linear_quantile 0.9 --conv_quantile 0.9 | --mode full] [--disable_cp] [--device cuda]

Both models are read through the registry (single file or diffusers folder, any family). lycoris' extraction factors
the difference of every Linear / Conv2d layer that changed by SVD, the rank chosen by the mode (per layer: `fixed` the
given dims; `threshold` the singular values above it; `ratio` those above ratio x the largest; `quantile` the fewest
whose sum stays under that share of the total; `full` no factoring), 3x3 convs with a Tucker core unless
--disable_cp; a layer whose rank would reach half its output size is stored whole (`.diff`, lycoris' full module).
The file uses LyCORIS' key format (`lora_down` / `lora_up` / `lora_mid` / `alpha`, `diff`) under the names our
`lycoris.kohya` loader and lycoris' own give the family's layers (SDXL's SAI names; a DiT's `lycoris_<path>`).

Stated error: lycoris writes the factors in half precision, so besides the singular values the mode drops, each
update carries fp16 rounding (relative error about 1e-3). The tool reads the written file back with the loader and
reports each module's relative error ||applied - difference|| / ||difference||: a summary line always, per module with
--verbose. (lycoris' extraction makes LoCon only: it has no LoHa / LoKr extraction; its sparse-bias option writes
tensors no loader applies, so it is not offered.)
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
from typing import Sequence

from ..errors import NetworkError
from .lora_tools import (PART_FILE_OPTIONS, part_files,
                         PRECISION_CHOICES, ToolOption, build_parser, check_output_path, dim_text, dtype_of,
                         family_facts, family_flag_options, family_flags, load_base_model, modelspec,
                         network_metadata, output_title, run_tool, torch_device)

log = logging.getLogger(__name__)

MODES = ("fixed", "threshold", "ratio", "quantile", "full")
MODULE = "lycoris.kohya"
#: mode -> (linear option, conv option) holding its parameter
MODE_PARAMS = {"fixed": ("linear_dim", "conv_dim"), "threshold": ("linear_threshold", "conv_threshold"),
               "ratio": ("linear_ratio", "conv_ratio"), "quantile": ("linear_quantile", "conv_quantile")}

OPTIONS: tuple[ToolOption, ...] = (
    ToolOption("model_org", str, None, "the base model (single file or diffusers folder)", path="file_or_dir",
               aliases=("base_model",)),
    ToolOption("model_tuned", str, None, "the fine-tuned model; the LyCORIS is the change from model_org to it",
               path="file_or_dir", aliases=("db_model",)),
    ToolOption("save_to", str, None, "file to write (.safetensors, .ckpt, .pt)", path="out_file",
               aliases=("output_name",)),
    ToolOption("mode", str, "fixed", "how each layer's rank is chosen: fixed dims, singular values above a "
               "threshold, above a ratio of the largest, a quantile of their sum, or full (no factoring)",
               choices=MODES),
    ToolOption("linear_dim", int, 64, "fixed mode: rank of Linear and 1x1 conv layers"),
    ToolOption("conv_dim", int, 32, "fixed mode: rank of 3x3 conv layers"),
    ToolOption("linear_threshold", float, 0.0, "threshold mode: keep singular values above this (Linear, 1x1)"),
    ToolOption("conv_threshold", float, 0.0, "threshold mode: keep singular values above this (3x3 conv)"),
    ToolOption("linear_ratio", float, 0.0, "ratio mode: keep singular values above this x the largest (0-1)"),
    ToolOption("conv_ratio", float, 0.0, "ratio mode, 3x3 conv layers (0-1)"),
    ToolOption("linear_quantile", float, 1.0, "quantile mode: keep the singular values whose running sum stays "
               "under this share of the total (0-1)"),
    ToolOption("conv_quantile", float, 1.0, "quantile mode, 3x3 conv layers (0-1)"),
    ToolOption("disable_cp", bool, False, "3x3 convs without a Tucker core (plain LoCon down/up)"),
    ToolOption("load_precision", str, None, "precision to load the models in (default: as stored, read as float)",
               choices=PRECISION_CHOICES),
    ToolOption("save_precision", str, None, "precision of the saved tensors (default fp16, as lycoris writes "
               "them)", choices=PRECISION_CHOICES),
    ToolOption("device", str, None, "device to compute the SVDs on (cuda for a GPU; default cpu)"),
    ToolOption("no_metadata", bool, False, "write no modelspec metadata (the minimal ss_* keys are kept)"),
    ToolOption("verbose", bool, False, "print each module's relative error"),
    ToolOption("v2", bool, False, "the models are SD 2.x (checked against the files)"),
    *family_flag_options(),
    *PART_FILE_OPTIONS,
)


def parse_args(argv: Sequence[str] | None = None, prog: str = "extract_lycoris") -> argparse.Namespace:
    return build_parser(prog, __doc__.splitlines()[0], OPTIONS).parse_args(argv)


def mode_params(args: argparse.Namespace) -> tuple[float, float]:
    """(linear, conv) parameter of the mode; NetworkError naming the option when lycoris would refuse it."""
    if args.mode == "full":
        return 0, 0
    values = []
    for option in MODE_PARAMS[args.mode]:
        value = getattr(args, option)
        if args.mode == "fixed" and value < 1:
            raise NetworkError(f"--{option} must be 1 or more (the rank of mode fixed)")
        if args.mode == "threshold" and value < 0:
            raise NetworkError(f"--{option} must be 0 or more (singular values above it are kept)")
        if args.mode in ("ratio", "quantile") and not 0 <= value <= 1:
            raise NetworkError(f"--{option} must be between 0 and 1 for mode {args.mode}")
        values.append(value)
    return values[0], values[1]


def _parts(org, tuned) -> list[tuple[str, object, object]]:
    """(lycoris' name prefix, base root, tuned root) in the order and with the prefixes lycoris' extract_diff gives
    them: 'lora_unet'; one text encoder 'lora_te', several 'lora_te1', 'lora_te2', ..."""
    tes = [(a, b) for a, b in zip(org.text_encoders, tuned.text_encoders) if a is not None and b is not None]
    parts = [("lora_unet", org.denoiser, tuned.denoiser)]
    for i, (a, b) in enumerate(tes):
        parts.append(("lora_te" if len(tes) == 1 else f"lora_te{i + 1}", a, b))
    return parts


def name_map(org) -> dict[str, str]:
    """lycoris' extract name of each base-model layer (prefix + module path, '.' -> '_') -> the file name our
    lycoris.kohya loader and lycoris' loader give that layer under the family's naming."""
    from .adapter_network import LayerNames
    from .lora import family_naming
    from .lycoris_kohya import lycoris_naming

    names = LayerNames(org.denoiser, list(org.text_encoders), lycoris_naming(family_naming(org.family, org.denoiser)))
    out = {}
    for prefix, root, _ in _parts(org, org):
        for path, module in root.named_modules():
            try:
                ours = names.name(module)
            except NetworkError:
                ours = None
            if ours:
                out[f"{prefix}.{path}".replace(".", "_")] = ours
    return out


def rename(tensors: dict, names: dict[str, str]) -> dict:
    """lycoris' keys under the family's names; modules of layers the family's files cannot name are left out."""
    out, left_out = {}, set()
    for key, value in tensors.items():
        module, _, suffix = key.partition(".")
        if module in names:
            out[f"{names[module]}.{suffix}"] = value
        else:
            left_out.add(module)
    if left_out:
        log.warning("%d changed layers have no name in this family's files and are left out (e.g. %s)",
                    len(left_out), sorted(left_out)[0])
    return out


def relative_errors(path: str, org, tuned) -> dict[str, float]:
    """Per module of the written file, ||update applied by the loader - (tuned - base)|| / ||tuned - base||."""
    import torch

    from .adapter_network import LayerNames, network_from_file
    from .lora import family_naming
    from .lycoris_kohya import lycoris_naming

    network = network_from_file(path, unet=org.denoiser, text_encoders=list(org.text_encoders), family=org.family,
                                multiplier=1.0, module=MODULE, naming=lycoris_naming)
    tuned_layers = LayerNames(tuned.denoiser, list(tuned.text_encoders),
                              lycoris_naming(family_naming(tuned.family, tuned.denoiser))).layers_by_name(
        [tuned.denoiser, *tuned.text_encoders])
    errors = {}
    with torch.no_grad():
        for module in network.all_loras():
            base = module.org_module[0].weight.float()
            want = tuned_layers[module.lora_name].weight.float().to(base.device) - base
            got = module.get_diff_weight(1.0, tuple(base.shape))[0].float().to(base.device)
            norm = float(want.norm())
            errors[module.lora_name] = float((got - want).norm()) / norm if norm > 0 else float((got - want).norm())
    return errors


def _load(args: argparse.Namespace, option: str, device):
    import torch

    return load_base_model(getattr(args, option), option,
                           dtype=dtype_of(args.load_precision, "load_precision") or torch.float32, device=device,
                           flags=family_flags(args, "v2"), **part_files(args))


def extract(args: argparse.Namespace) -> dict[str, float]:
    """Write the extracted LyCORIS; its modules' relative errors."""
    import torch
    from lycoris.utils import extract_diff

    for option in ("model_org", "model_tuned"):
        if not getattr(args, option):
            raise NetworkError(f"option '--{option}' is required: the {'base' if option == 'model_org' else 'tuned'} "
                               f"model file or folder")
    save_to = check_output_path(args.save_to)
    linear_param, conv_param = mode_params(args)
    save_dtype = dtype_of(args.save_precision, "save_precision")
    device = torch_device(args.device, "device")
    org = _load(args, "model_org", None)
    tuned = _load(args, "model_tuned", None)
    if org.family != tuned.family:
        raise NetworkError(f"{args.model_tuned}: the models are of different families ({org.family} and "
                           f"{tuned.family}): extract from a fine-tune of the same model")
    parts = _parts(org, tuned)
    for prefix, a, b in parts:
        shapes_a = {k: tuple(v.shape) for k, v in a.state_dict().items()}
        for key, value in b.state_dict().items():
            if shapes_a.get(key) != tuple(value.shape):
                raise NetworkError(f"{args.model_tuned}: {key} is {list(value.shape)} but "
                                   f"{shapes_a.get(key, 'missing')} in {args.model_org}: the models are of "
                                   f"different sizes; extract from a fine-tune of the base")
    tes = [p for p in parts if p[0] != "lora_unet"]
    log.info("extracting the differences (mode %s) through lycoris-lora", args.mode)
    # lycoris prints progress bars and a module count: kept off the console, where our summary says it all
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        tensors = extract_diff([a for _, a, _ in tes], [b for _, _, b in tes], org.denoiser, tuned.denoiser,
                               mode=args.mode, linear_mode_param=linear_param, conv_mode_param=conv_param,
                               extract_device=device, use_bias=False, small_conv=not args.disable_cp)
    tensors = rename(tensors, name_map(org))
    if not tensors:
        raise NetworkError(f"{args.model_tuned}: no layer differs from {args.model_org}: nothing to extract")
    if save_dtype is not None:
        tensors = {k: v.to(save_dtype) if v.is_floating_point() and not k.endswith(".alpha") else v
                   for k, v in tensors.items()}
    tensors = {k: v.contiguous() for k, v in tensors.items()}

    ranks = [int(v.shape[0]) for k, v in tensors.items() if k.endswith(".lora_down.weight")]
    dims = {"fixed": (args.linear_dim, args.conv_dim)}.get(args.mode)
    network_args = {"algo": "locon", "extract_mode": args.mode, "disable_cp": args.disable_cp}
    if dims:
        network_args.update(conv_dim=dims[1], conv_alpha=float(dims[1]))
    family = org.family
    facts = family_facts(family, bool(org.v_prediction))
    metadata = network_metadata(v2=facts["ss_v2"], base_model=facts["ss_base_model_version"],
                                dim=dim_text(ranks or [0]), alpha=dim_text(ranks or [0]), network_args=network_args)
    metadata["ss_network_module"] = MODULE
    if not args.no_metadata:
        metadata.update(modelspec(family, bool(org.v_prediction), title=output_title(save_to)))
        metadata["ss_extract_params"] = json.dumps({"linear": linear_param, "conv": conv_param})
    from .weights_file import save_weights_file

    save_weights_file(tensors, save_to, metadata)
    errors = relative_errors(save_to, org, tuned)
    if args.verbose:
        for name, error in errors.items():
            print(f"{name:75} | relative error: {error:.2e}")
    values = list(errors.values()) or [0.0]
    summary = (f"extracted {len(errors)} modules to {save_to}: relative error of the updates mean "
               f"{sum(values) / len(values):.2e}, max {max(values):.2e}")
    if args.verbose:
        print(summary)
    else:
        log.info(summary)
    return errors


def main(argv: Sequence[str] | None = None, prog: str = "extract_lycoris") -> int:
    return run_tool(prog, lambda a: parse_args(a, prog), extract, argv)


if __name__ == "__main__":
    raise SystemExit(main())
