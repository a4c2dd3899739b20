"""Merge LyCORIS files (LoCon, LoHa, LoKr, IA3, GLoRA, (Diag-/B)OFT, full, norms; kohya LoRA too) into a model
checkpoint, through lycoris-lora's own modules (LyCORIS' merge, with our family's names and saving).

    python -m sd_scripts.networks.merge_lycoris --sd_model model.safetensors --models a.safetensors b.safetensors \
        --ratios 1.0 0.5 --save_to merged.safetensors [--precision float] [--save_precision fp16] [--device cuda]

Each file is read as our `lycoris.kohya` / `networks.loha` / `networks.lokr` loaders read it (adapter_network
.network_from_file: lycoris' `get_module` / `make_module` rebuild each module from its tensors, on the layer its name
points at under the family's LoRA naming, so SDXL's SAI names and DiT families' `lycoris_<path>` names resolve); then
each module's `merge_to(ratio)` (lycoris-lora's merge) adds its update to the layer's weight. lycoris-lora's own
`lycoris.utils.merge` does the same loop but names layers by their module paths only (no family name maps) and
prints the whole state dict. The merged model is saved the way the family saves full checkpoints, atomically, with
modelspec metadata naming what was merged (`modelspec.merged_from`).

lycoris-lora 4.1.3's LoHa / LoKr merge applies alpha/rank twice, their forward once (as ComfyUI and A1111 read the
files): where a module's merge and forward disagree so, the ratio handed to the merge divides the extra factor out,
so that the merged model computes what the file applied at runtime computes.
"""
from __future__ import annotations

import argparse
import logging
from typing import Sequence

from ..errors import NetworkError
from .lora_tools import (PART_FILE_OPTIONS, part_files,
                         PRECISION_CHOICES, PRECISIONS, ToolOption, build_parser, check_output_path, dtype_of,
                         load_base_model, modelspec, output_title, run_tool, title_of, torch_device)

log = logging.getLogger(__name__)

OPTIONS: tuple[ToolOption, ...] = (
    ToolOption("sd_model", str, None, "model to merge into (single file or diffusers folder)", path="file_or_dir",
               aliases=("base_model",)),
    ToolOption("models", str, None, "LyCORIS files to merge (LoCon, LoHa, LoKr, IA3, GLoRA, OFT, full; LoRA too)",
               nargs="*", path="file"),
    ToolOption("ratios", float, None, "ratio of each file (default 1 each)", nargs="*"),
    ToolOption("save_to", str, None, "file to write (.safetensors or .ckpt)", path="out_file"),
    ToolOption("precision", str, "float", "precision of the merge arithmetic (float recommended)",
               choices=PRECISION_CHOICES),
    ToolOption("save_precision", str, None, "precision of the saved tensors (default: the merge precision)",
               choices=tuple(PRECISIONS)),
    ToolOption("device", str, None, "device to merge on (cuda for a GPU; default cpu)"),
    ToolOption("no_metadata", bool, False, "write no modelspec metadata"),
    ToolOption("v2", bool, False, "the model is SD 2.x (checked against the file; the kind is read from it)"),
    *PART_FILE_OPTIONS,
)
MODULE = "lycoris.kohya"  # how the files are labelled in messages


def parse_args(argv: Sequence[str] | None = None, prog: str = "merge_lycoris") -> argparse.Namespace:
    return build_parser(prog, __doc__.splitlines()[0], OPTIONS).parse_args(argv)


def file_network(path: str, bundle, model_path: str):
    """The LyCORIS modules of a file on the bundle's layers (AdapterNetwork), as our loaders build them.
    NetworkError naming the file when its names or shapes do not fit the model."""
    from .adapter_network import network_from_file
    from .lycoris_kohya import LYCORIS_PREFIX, lycoris_naming
    from .weights_file import load_weights_file

    tensors, _ = load_weights_file(path)
    # lycoris.kohya names a DiT family's denoiser layers `lycoris_<path>`; other files use the family's LoRA names
    naming = lycoris_naming if any(k.startswith(LYCORIS_PREFIX + "_") for k in tensors) else None
    del tensors
    try:
        return network_from_file(path, unet=bundle.denoiser, text_encoders=list(bundle.text_encoders),
                                 family=bundle.family, multiplier=1.0, module=MODULE, naming=naming)
    except RuntimeError as e:  # a module's tensors do not fit its layer (copy_ into the library's module)
        raise NetworkError(f"{path}: its modules do not fit the layers of {model_path} ({str(e).splitlines()[0]}): "
                           f"the file was made for another base model; use one of this model's family and size") \
            from None


def merge_ratio(module, ratio: float, path: str) -> float:
    """The multiplier to hand lycoris' merge_to so that the merge adds what the module's forward adds at `ratio`
    (see the module docstring: LoHa / LoKr of lycoris-lora 4.1.3 scale their merge by alpha/rank twice)."""
    import torch

    if type(module).__name__ not in ("LohaModule", "LokrModule") or float(module.scale) == 1.0:
        return ratio
    with torch.no_grad():
        merged = module.get_diff_weight(1.0, module.shape)[0].float()
        forward = (module.get_weight(module.shape) * module.scalar).float()
    if torch.allclose(merged, forward, rtol=1e-4, atol=1e-7):
        return ratio  # a lycoris-lora whose merge agrees with its forward
    if getattr(module, "wd", False):
        raise NetworkError(f"{path}: {module.lora_name} is a DoRA {type(module).__name__[:4]} with alpha != rank, "
                           f"which lycoris-lora's merge scales differently from its forward; apply the file at "
                           f"runtime instead of merging it")
    return ratio / float(module.scale)


def merge_file_into(bundle, path: str, ratio: float, model_path: str) -> int:
    """Merge one LyCORIS file into the loaded model at `ratio`; the number of modules merged."""
    import torch

    network = file_network(path, bundle, model_path)
    with torch.no_grad():
        for module in network.all_loras():
            module.merge_to(merge_ratio(module, ratio, path))
    return len(network.all_loras())


def merge(args: argparse.Namespace) -> None:
    import os

    import torch

    if not args.models:
        raise NetworkError("option '--models' is required: the LyCORIS files to merge")
    missing = next((p for p in args.models if not os.path.isfile(p)), None)
    if missing:
        raise NetworkError(f"option '--models': {missing} does not exist; check the path")
    ratios = list(args.ratios) if args.ratios else [1.0] * len(args.models)
    if len(ratios) != len(args.models):
        raise NetworkError(f"--ratios has {len(ratios)} values for {len(args.models)} --models: give one ratio per "
                           f"file")
    merge_dtype = dtype_of(args.precision, "precision") or torch.float32
    save_dtype = dtype_of(args.save_precision, "save_precision") or merge_dtype
    device = torch_device(args.device, "device")
    save_to = check_output_path(args.save_to)
    bundle = load_base_model(args.sd_model, "sd_model", dtype=merge_dtype, device=device, flags={"v2": args.v2},
                             **part_files(args))
    for path, ratio in zip(args.models, ratios):
        count = merge_file_into(bundle, path, ratio, args.sd_model)
        log.info("merged %s (ratio %s): %d modules", path, ratio, count)

    from ..families import family_class

    metadata = None
    if not args.no_metadata:
        merged_from = ", ".join(title_of(p) for p in [args.sd_model, *args.models])
        metadata = modelspec(bundle.family, bundle.v_prediction, title=output_title(save_to),
                             merged_from=merged_from, adapter="")
    family = family_class(bundle.family)(bundle)
    if metadata is not None:
        metadata = family.adjust_metadata(metadata)
    for part in (bundle.denoiser, *bundle.text_encoders):
        if part is not None:
            part.to("cpu")
    family.save_checkpoint(save_to, dtype=save_dtype, metadata=metadata, diffusers=False)
    log.info("saved the merged model to %s", save_to)


def main(argv: Sequence[str] | None = None, prog: str = "merge_lycoris") -> int:
    return run_tool(prog, lambda a: parse_args(a, prog), merge, argv)


if __name__ == "__main__":
    raise SystemExit(main())
