"""sd-scripts' HunyuanImage-2.1 LoRA files in other layouts.

- diffusers: 0.42 has no LoRA loader for HunyuanImagePipeline, but its HunyuanImageTransformer2DModel takes PEFT
  adapters (`transformer.load_lora_adapter(state_dict, prefix="transformer")`). `to_diffusers_lora` writes those
  names: `lora_unet_<official path>` -> `transformer.<diffusers path>.lora_A/lora_B.weight` through
  `layout.transformer_key_table` (a fused `*_attn_qkv` / `linear1` module becomes its parts, each with the same
  down weight and its rows of the up weight), alpha / rank folded into the up weight.
- ComfyUI: sd-scripts' `networks/convert_hunyuan_image_lora_to_comfy.py` renames the modules ComfyUI calls
  differently (`img_mlp_fc1` -> `img_mlp_0`, `img_mod_linear` -> `img_mod_lin`, `modulation_linear` ->
  `modulation_lin`, ...); `to_comfy` / `from_comfy` do the same.
"""
from __future__ import annotations

import re
from typing import Mapping

import torch

from ...errors import NetworkError
from . import layout

# (sd-scripts name part, ComfyUI name part) in double / single block module names
COMFY_DOUBLE = (("img_mlp_fc1", "img_mlp_0"), ("img_mlp_fc2", "img_mlp_2"), ("img_mod_linear", "img_mod_lin"),
                ("txt_mlp_fc1", "txt_mlp_0"), ("txt_mlp_fc2", "txt_mlp_2"), ("txt_mod_linear", "txt_mod_lin"))
COMFY_SINGLE = (("modulation_linear", "modulation_lin"),)


def _rename(name: str, reverse: bool) -> str:
    table = COMFY_DOUBLE if "double_blocks" in name else COMFY_SINGLE if "single_blocks" in name else ()
    for ours, comfy in table:
        name = name.replace(comfy, ours) if reverse else name.replace(ours, comfy)
    return name


def to_comfy(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """sd-scripts' LoRA names -> ComfyUI's (tensors unchanged)."""
    return {_rename(k, False): v for k, v in tensors.items()}


def from_comfy(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI's LoRA names -> sd-scripts' (the inverse of to_comfy)."""
    return {_rename(k, True): v for k, v in tensors.items()}


def to_diffusers_lora(tensors: Mapping[str, torch.Tensor], *, transformer_config: Mapping) -> dict[str, torch.Tensor]:
    """The diffusers PEFT LoRA state dict (`transformer.` prefix) of an sd-scripts HunyuanImage LoRA. NetworkError
    naming the first module that has no place in the DiT."""
    rows: dict[str, tuple[list[str], tuple[int, ...]]] = {}
    for rule in layout.transformer_key_table(transformer_config):
        if rule.official.endswith(".weight"):
            module = rule.official[:-len(".weight")]
            rows["lora_unet_" + module.replace(".", "_")] = ([d[:-len(".weight")] for d in rule.diffusers],
                                                             rule.sizes)
    out: dict[str, torch.Tensor] = {}
    for name in sorted({k.split(".", 1)[0] for k in tensors}):
        if name not in rows:
            raise NetworkError(f"LoRA module {name!r} has no place in the HunyuanImage-2.1 DiT (text-encoder and "
                               f"unknown modules cannot be converted)")
        down, up = tensors[f"{name}.lora_down.weight"].float(), tensors[f"{name}.lora_up.weight"].float()
        rank = down.shape[0]
        alpha = float(tensors[f"{name}.alpha"]) if f"{name}.alpha" in tensors else float(rank)
        up = up * (alpha / rank)
        targets, sizes = rows[name]
        ups = up.split(list(sizes), dim=0) if len(targets) > 1 else (up,)
        for target, part in zip(targets, ups):
            out[f"transformer.{target}.lora_A.weight"] = down
            out[f"transformer.{target}.lora_B.weight"] = part.contiguous()
    return out


def comfy_main(argv: list[str] | None = None) -> int:
    """sd-scripts' convert_hunyuan_image_lora_to_comfy.py: SRC DST [--reverse]; metadata kept."""
    import argparse
    import sys

    from ...errors import UserError
    from ...models.module_io import save_safetensors_atomic
    from ...networks.weights_file import load_weights_file

    parser = argparse.ArgumentParser(prog="convert_hunyuan_image_lora_to_comfy",
                                     description="Rename a HunyuanImage-2.1 LoRA between sd-scripts' and ComfyUI's "
                                                 "module names.")
    parser.add_argument("src_path", help="source LoRA (.safetensors), sd-scripts' names")
    parser.add_argument("dst_path", help="destination (.safetensors), ComfyUI's names")
    parser.add_argument("--reverse", action="store_true", help="ComfyUI's names to sd-scripts'")
    args = parser.parse_args(argv)
    try:
        tensors, metadata = load_weights_file(args.src_path)
        if not any(re.match(r"lora_unet_(double|single)_blocks_", k) for k in tensors):
            raise NetworkError(f"{args.src_path}: no HunyuanImage-2.1 LoRA modules (lora_unet_double_blocks_* / "
                               f"lora_unet_single_blocks_*); pass a LoRA trained on HunyuanImage-2.1")
        converted = from_comfy(tensors) if args.reverse else to_comfy(tensors)
        save_safetensors_atomic(converted, args.dst_path, metadata)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    renamed = sum(1 for a, b in zip(sorted(tensors), sorted(converted)) if a != b)
    print(f"{args.dst_path}: {len(converted)} tensors ({renamed} renamed)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """python -m sd_scripts.families.hunyuan_image.lora_files --lora IN --model MODEL --out OUT: the diffusers PEFT
    form of an sd-scripts HunyuanImage-2.1 LoRA (for `HunyuanImageTransformer2DModel.load_lora_adapter(sd,
    prefix="transformer")`), the layer layout read from MODEL's header (the DiT file) or its transformer/config.json."""
    import argparse
    import json
    import os
    import sys

    from ...errors import UserError
    from ...models.module_io import save_safetensors_atomic
    from ...networks.weights_file import load_weights_file
    from .. import read_safetensors_header

    parser = argparse.ArgumentParser(prog="python -m sd_scripts.families.hunyuan_image.lora_files",
                                     description=main.__doc__)
    parser.add_argument("--lora", required=True, help="sd-scripts HunyuanImage-2.1 LoRA (.safetensors)")
    parser.add_argument("--model", required=True, help="the DiT file or diffusers folder it was trained on")
    parser.add_argument("--out", required=True, help="output .safetensors in diffusers' PEFT LoRA layout")
    args = parser.parse_args(argv)
    try:
        tensors, metadata = load_weights_file(args.lora)
        if os.path.isdir(args.model):
            sub = os.path.join(args.model, "transformer", "config.json")
            with open(sub if os.path.isfile(sub) else os.path.join(args.model, "config.json"), encoding="utf-8") as f:
                config = json.load(f)
        else:
            config = layout.infer_dit_config(read_safetensors_header(args.model)[0])
        converted = to_diffusers_lora(tensors, transformer_config=config)
        save_safetensors_atomic(converted, args.out, metadata)
    except (UserError, OSError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.out}: {len(converted)} tensors in diffusers' PEFT LoRA layout")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
