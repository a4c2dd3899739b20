"""Convert a model between a single file (original layout, .safetensors or .ckpt) and a diffusers folder
(sd-scripts' tools/convert_diffusers20_original_sd.py), for every model family we load.

    python -m sd_scripts.tools.convert_diffusers20_original_sd MODEL_TO_LOAD MODEL_TO_SAVE
        [--v1 | --v2] [--fp16 | --bf16 | --float | --save_precision_as fp16|bf16|float] [--use_safetensors]
        [--reference_model DIR] [--variant fp16] [--unet_use_linear_projection] [--metadata "{'k': 'v'}"]
        [--epoch N] [--global_step N]

MODEL_TO_SAVE with a file extension is a single file, without one a diffusers folder. The family is read from the
files (the registry), loaded by the family's loader and written by its `save_checkpoint`, so a round trip is exact.
`--v1`/`--v2` confirm the kind of SD model (a mismatch is an error; without them it is detected). `--fp16` loads a
diffusers folder in fp16 and saves fp16; `--bf16`/`--float`/`--save_precision_as` set the saved precision (of a
single file or a folder). A folder is saved with safetensors weights with `--use_safetensors`, else with the
PyTorch `.bin` files sd-scripts writes by default. `--reference_model` (a local diffusers folder) gives the saved
folder its scheduler config, as sd-scripts copies it from the reference. `--variant` loads a folder's
`*.<variant>.safetensors` weights. `--metadata` (a Python dict literal) goes into a .safetensors header; a .ckpt
records `epoch` and `global_step`. Everything is written atomically.
"""
from __future__ import annotations

import ast
import logging
import os
import shutil
import sys
import tempfile

from ..errors import UserError
from .tool_cli import ToolOption, run_tool

log = logging.getLogger(__name__)

OPTIONS: tuple[ToolOption, ...] = (
    ToolOption("v1", bool, False, "the model is an SD 1.x model (checked)"),
    ToolOption("v2", bool, False, "the model is an SD 2.x model (checked)"),
    ToolOption("unet_use_linear_projection", bool, False, "when saving a diffusers folder, give the U-Net "
                                                          "use_linear_projection=true (as stabilityai's v2 models)"),
    ToolOption("fp16", bool, False, "load a diffusers folder as fp16 and save as fp16"),
    ToolOption("bf16", bool, False, "save as bf16"),
    ToolOption("float", bool, False, "save as float (float32)"),
    ToolOption("save_precision_as", str, "no", "saved precision (do not combine with --fp16/--bf16/--float)",
               choices=("no", "fp16", "bf16", "float")),
    ToolOption("epoch", int, 0, "epoch recorded in a .ckpt"),
    ToolOption("global_step", int, 0, "global_step recorded in a .ckpt"),
    ToolOption("metadata", str, None, "metadata for a .safetensors file, as a Python dict, e.g. "
                                      "\"{'name': 'model', 'resolution': '512x512'}\""),
    ToolOption("variant", str, None, "variant of a diffusers folder's weights to load, e.g. fp16"),
    ToolOption("reference_model", str, None, "local diffusers folder whose scheduler config the saved folder takes",
               path="dir"),
    ToolOption("use_safetensors", bool, False, "save a diffusers folder's weights as .safetensors (default .bin)"),
    ToolOption("model_to_load", str, None, "model to load: a single file (.safetensors/.ckpt) or a diffusers folder",
               positional=True, required=True, path="file_or_dir"),
    ToolOption("model_to_save", str, None, "model to save: a file name with extension (single file) or a folder",
               positional=True, required=True, path="file_or_dir"),
)


def _part_options() -> tuple[ToolOption, ...]:
    """The trainers' loading options that name separate part files or a model variant (--vae, --clip_l, --t5xxl,
    --ae, --clip_g, --model_type, ...; sd_scripts.options, group 'model'): a single file of a family whose parts
    live in separate files converts with them."""
    from ..options import OPTIONS as SCHEMA

    skip = {"pretrained_model_name_or_path", "tokenizer_cache_dir"}
    return tuple(ToolOption(o.name, str, None, o.help, choices=tuple(c for c in (o.choices or ()) if c) or None,
                            path=getattr(o, "path", None))
                 for o in SCHEMA if o.group == "model" and o.type is str and o.name not in skip)


PART_OPTIONS = _part_options()
OPTIONS = OPTIONS + PART_OPTIONS


def save_dtype_of(args):
    import torch

    flags = [name for name in ("fp16", "bf16", "float") if getattr(args, name)]
    if args.save_precision_as != "no":
        flags.append(args.save_precision_as)
    if len(set(flags)) > 1:
        raise UserError(f"conflicting precisions {' and '.join(sorted(set(flags)))}: give one of --fp16, --bf16, "
                        f"--float or --save_precision_as")
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "float": torch.float32}.get(flags[0]) if flags else None


def parse_metadata(text: str | None) -> dict[str, str]:
    """--metadata: a Python dict literal (never evaluated as code) -> str values."""
    if not text:
        return {}
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = None
    if not isinstance(value, dict):
        raise UserError(f"--metadata {text!r} is not a Python dict literal; write e.g. \"{{'name': 'my model'}}\"")
    return {str(k): str(v) for k, v in value.items()}


def _variant_view(folder: str, variant: str, workdir: str) -> str:
    """A folder of links to `folder` in which each `<name>.<variant>.<ext>` weight file is seen as `<name>.<ext>`."""
    view = os.path.join(workdir, "view")
    found = False
    for root, _dirs, files in os.walk(folder):
        rel = os.path.relpath(root, folder)
        os.makedirs(os.path.join(view, rel), exist_ok=True)
        names = set(files)
        for name in files:
            stem, ext = os.path.splitext(name)
            target = name
            if stem.endswith("." + variant):
                target = stem[: -len(variant) - 1] + ext
                found = True
            elif f"{stem}.{variant}{ext}" in names:
                continue  # the variant's file stands in for it
            os.symlink(os.path.abspath(os.path.join(root, name)), os.path.join(view, rel, target))
    if not found:
        raise UserError(f"{folder}: no weight files of variant {variant!r} (*.{variant}.safetensors); leave out "
                        f"--variant or pass the right one")
    return view


def load_source(args, workdir: str):
    """The bundle of MODEL_TO_LOAD, its family checked against --v1/--v2."""
    import torch

    from ..families import family_spec
    from ..models.loading import load_model

    path = args.model_to_load
    if args.v1 and args.v2:
        raise UserError("--v1 and --v2 are both set: give the one that matches the model, or neither")
    if not os.path.exists(path):
        raise UserError(f"{path}: no such file or folder; check MODEL_TO_LOAD")
    is_folder = os.path.isdir(path)
    if args.variant:
        if not is_folder:
            raise UserError(f"--variant applies to a diffusers folder, but {path} is a file; remove --variant")
        path = _variant_view(path, args.variant, workdir)
    dtype = torch.float16 if args.fp16 and is_folder else torch.float32
    parts = {o.name: getattr(args, o.name) for o in PART_OPTIONS if getattr(args, o.name, None)}
    bundle = load_model(path, dtype=dtype, v2=True if args.v2 else None, **parts)
    bundle.source_path = args.model_to_load
    if args.v1 and family_spec(bundle.family).ss_v2:
        raise UserError(f"{args.model_to_load}: --v1 is set but this is a {family_spec(bundle.family).label} model; "
                        f"use --v2 or neither")
    log.info("loaded %s (%s)", args.model_to_load, family_spec(bundle.family).label)
    return bundle


def _linear_projection(bundle) -> None:
    """The denoiser rebuilt with use_linear_projection=true: 1x1-conv proj_in/proj_out weights become Linear ones."""
    denoiser = bundle.denoiser
    config = getattr(denoiser, "config", None)
    if config is None or "use_linear_projection" not in config:
        raise UserError("--unet_use_linear_projection applies to U-Net models only; remove it")
    if config["use_linear_projection"]:
        return
    state = {k: (v.flatten(1) if v.ndim == 4 and k.rsplit(".", 2)[-2] in ("proj_in", "proj_out") else v)
             for k, v in denoiser.state_dict().items()}
    rebuilt = type(denoiser).from_config({**dict(config), "use_linear_projection": True})
    rebuilt.load_state_dict(state, strict=True)
    bundle.denoiser = rebuilt.to(next(denoiser.parameters()).dtype).eval()


def _scheduler_from_reference(reference: str, folder: str) -> None:
    source = os.path.join(reference, "scheduler", "scheduler_config.json")
    if not os.path.isfile(source):
        raise UserError(f"--reference_model {reference}: no scheduler/scheduler_config.json; pass a diffusers folder")
    from ..models.module_io import read_json, write_json

    config = read_json(source, reference, "diffusers folder")
    if not os.path.isdir(os.path.join(folder, "scheduler")):
        return
    shutil.copyfile(source, os.path.join(folder, "scheduler", "scheduler_config.json"))
    index_path = os.path.join(folder, "model_index.json")
    index = read_json(index_path, folder, "diffusers folder")
    if config.get("_class_name"):  # the pipeline builds the scheduler class model_index.json names
        index["scheduler"] = ["diffusers", config["_class_name"]]
        write_json(index_path, index)


def _weights_as_bin(folder: str) -> None:
    """Every .safetensors weight file of a diffusers folder rewritten as the PyTorch .bin file of the same part
    (diffusion_pytorch_model.bin, pytorch_model.bin), as save_pretrained(safe_serialization=False) names them."""
    import torch
    from safetensors.torch import load_file

    for root, _dirs, files in os.walk(folder):
        for name in files:
            if not name.endswith(".safetensors"):
                continue
            stem = name[: -len(".safetensors")]
            target = "pytorch_model" if stem == "model" else stem
            source = os.path.join(root, name)
            torch.save(load_file(source), os.path.join(root, target + ".bin"))
            os.remove(source)


def _ckpt_with_steps(path: str, epoch: int, global_step: int) -> None:
    import torch

    from ..training.saving import atomic_torch_save

    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict):
        return
    data.update(epoch=epoch, global_step=global_step)
    atomic_torch_save(data, path)


def convert(args) -> None:
    from ..families import family_class

    save_dtype = save_dtype_of(args)
    metadata = parse_metadata(args.metadata)
    if args.reference_model and not os.path.isdir(args.reference_model):
        raise UserError(f"--reference_model {args.reference_model!r} is not a folder: pass a local diffusers folder")
    out = args.model_to_save
    to_file = bool(os.path.splitext(out)[1])
    if os.path.abspath(out) == os.path.abspath(args.model_to_load):
        raise UserError(f"{out}: MODEL_TO_SAVE is MODEL_TO_LOAD; give another output path")
    with tempfile.TemporaryDirectory(prefix="convert-") as work:
        bundle = load_source(args, work)
        family = family_class(bundle.family)(bundle)
        if to_file:
            family.save_checkpoint(out, dtype=save_dtype, metadata=metadata, diffusers=False)
            if not out.lower().endswith(".safetensors"):
                _ckpt_with_steps(out, args.epoch, args.global_step)
            log.info("saved single file %s", out)
            return
        if args.unet_use_linear_projection:
            _linear_projection(bundle)
        parent = os.path.dirname(os.path.abspath(out))
        os.makedirs(parent, exist_ok=True)
        staged = tempfile.mkdtemp(dir=parent, prefix="." + os.path.basename(os.path.abspath(out)) + ".tmp-")
        try:
            built = os.path.join(staged, "model")
            family.save_checkpoint(built, dtype=save_dtype, metadata=metadata, diffusers=True)
            if args.reference_model:
                _scheduler_from_reference(args.reference_model, built)
            if not args.use_safetensors:
                _weights_as_bin(built)
            _swap_into_place(built, os.path.abspath(out))
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        log.info("saved diffusers folder %s", out)


def _swap_into_place(built: str, out: str) -> None:
    """Move a finished folder to `out`; an existing folder there is moved aside first and deleted after."""
    old = None
    if os.path.exists(out):
        old = out + f".old-{os.getpid()}"
        os.replace(out, old)
    os.replace(built, out)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    return run_tool("python -m sd_scripts.tools.convert_diffusers20_original_sd",
                    "Convert a model between a single file and a diffusers folder.", OPTIONS, convert, argv)


if __name__ == "__main__":
    sys.exit(main())
