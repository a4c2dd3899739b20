"""sd-scripts Lumina LoRA files (`lora_unet_<Alpha-VLLM path>`, `lora_te_<Gemma-2 path>`) -> the diffusers (PEFT)
layout that `Lumina2Pipeline.load_lora_weights` reads.

diffusers 0.42's Lumina2 loader converts only ComfyUI-style `diffusion_model.*.lora_A/lora_B` files, with the 2B's
q/k/v sizes fixed, and loads into the transformer only. This writes its own names instead:
`lora_unet_<path>` -> `transformer.<diffusers path>.lora_A/lora_B.weight` through `layout.linear_table` (a fused
`attention_qkv` module becomes to_q / to_k / to_v with the same down weight and their rows of the up weight, at the
model's own sizes). Each module's alpha / rank is folded into its up weight, so the result equals the sd-scripts LoRA
at strength 1. Gemma-2 modules (`lora_te_*`) have no place in diffusers' Lumina2 loader: refused, or left out with
`drop_text_encoder`.
"""
from __future__ import annotations

from typing import Mapping

import torch

from ...errors import NetworkError
from . import layout


def to_diffusers_lora(tensors: Mapping[str, torch.Tensor], *, transformer_config: Mapping,
                      drop_text_encoder: bool = False) -> dict[str, torch.Tensor]:
    """The diffusers LoRA state dict of an sd-scripts Lumina LoRA (`tensors` as in the file). NetworkError naming the
    first module that has no place in diffusers' transformer."""
    rows: dict[str, list[tuple[str, int, int]]] = {}
    for diffusers_path, entry in layout.linear_table(transformer_config).items():
        alpha_path, part, parts = (entry, 0, 1) if isinstance(entry, str) else entry
        rows.setdefault("lora_unet_" + alpha_path.replace(".", "_"), []).append((diffusers_path, part, parts))
    sizes = layout.qkv_sizes(transformer_config)
    out: dict[str, torch.Tensor] = {}
    for name in sorted({k.split(".", 1)[0] for k in tensors}):
        if name.startswith("lora_te_"):
            if drop_text_encoder:
                continue
            raise NetworkError(f"LoRA module {name!r}: diffusers' Lumina2Pipeline loads LoRA into the transformer "
                               f"only; train with network_train_unet_only, or leave the Gemma-2 modules out")
        if name not in rows:
            raise NetworkError(f"LoRA module {name!r} has no place in diffusers' Lumina2Transformer2DModel")
        down, up = tensors[f"{name}.lora_down.weight"].float(), tensors[f"{name}.lora_up.weight"].float()
        rank = down.shape[0]
        alpha = float(tensors[f"{name}.alpha"]) if f"{name}.alpha" in tensors else float(rank)
        up = up * (alpha / rank)
        targets = sorted(rows[name], key=lambda t: t[1])
        ups = up.split(list(sizes), dim=0) if len(targets) == 3 else (up,)
        for (path, _part, _parts), part_up in zip(targets, ups):
            out[f"transformer.{path}.lora_A.weight"] = down.contiguous()
            out[f"transformer.{path}.lora_B.weight"] = part_up.contiguous()
    return out


def main(argv: list[str] | None = None) -> int:
    """python -m sd_scripts.families.lumina.lora_files --lora IN --model MODEL --out OUT: write the diffusers form of
    an sd-scripts Lumina LoRA (for `Lumina2Pipeline.load_lora_weights`), the layer sizes read from MODEL (a Lumina
    2 single file or diffusers folder)."""
    import argparse
    import os
    import sys

    from ...errors import UserError
    from ...models.checkpoint import open_checkpoint
    from ...models.module_io import save_safetensors_atomic
    from ...networks.weights_file import load_weights_file

    parser = argparse.ArgumentParser(prog="python -m sd_scripts.families.lumina.lora_files", description=main.__doc__)
    parser.add_argument("--lora", required=True, help="sd-scripts Lumina LoRA (.safetensors)")
    parser.add_argument("--model", required=True, help="the Lumina 2 model it was trained on")
    parser.add_argument("--out", required=True, help="output .safetensors in diffusers' LoRA layout")
    parser.add_argument("--drop_text_encoder", action="store_true", help="leave Gemma-2 modules out")
    args = parser.parse_args(argv)
    try:
        tensors, metadata = load_weights_file(args.lora)
        if os.path.isdir(args.model):
            from ...models.module_io import read_json

            sub = os.path.join(args.model, "transformer")
            folder = sub if os.path.isdir(sub) else args.model
            config = read_json(os.path.join(folder, "config.json"), args.model, "Lumina 2 diffusers folder")
        else:
            config = layout.infer_transformer_config(layout.strip_prefix(open_checkpoint(args.model).shapes))
        converted = to_diffusers_lora(tensors, transformer_config=config, drop_text_encoder=args.drop_text_encoder)
        save_safetensors_atomic(converted, args.out, metadata)
    except (UserError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.out}: {len(converted)} tensors in diffusers' LoRA layout")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
