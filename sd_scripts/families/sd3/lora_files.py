"""kohya-format SD3 LoRA files -> the diffusers (PEFT) LoRA layout that `StableDiffusion3Pipeline.load_lora_weights`
reads.

diffusers 0.42's SD3 loader takes only its own key names (`transformer.<module>.lora_A.weight`, `text_encoder.`,
`text_encoder_2.`); it has no converter for kohya / sd-scripts names as it has for FLUX. This writes those names:
`lora_te1_*` -> `text_encoder.*` (CLIP-L), `lora_te2_*` -> `text_encoder_2.*` (CLIP-G), `lora_unet_<SAI path>` ->
`transformer.<diffusers path>` through `layout.transformer_key_table` (a fused SAI `qkv` module becomes q, k and v
with the same down weight and a third of the up weight each; a (shift, scale) adaLN has its up halves swapped).
Each module's alpha / rank is folded into its up weight, so the result equals the kohya LoRA at strength 1.
T5 modules (`lora_te3_*`) have no place in diffusers' SD3 loader and are refused.
"""
from __future__ import annotations

from typing import Mapping

import torch

from ...errors import NetworkError
from . import layout


def _module_names(module: torch.nn.Module | None, prefix: str) -> dict[str, str]:
    """kohya name ('lora_te1_text_model_encoder_layers_0_mlp_fc1') -> module path, for every Linear in `module`."""
    if module is None:
        return {}
    return {f"{prefix}_{path}".replace(".", "_"): path for path, m in module.named_modules()
            if isinstance(m, torch.nn.Linear)}


def to_diffusers_lora(tensors: Mapping[str, torch.Tensor], *, transformer_config: Mapping, clip_l=None,
                      clip_g=None) -> dict[str, torch.Tensor]:
    """The diffusers LoRA state dict of a kohya SD3 LoRA (`tensors`: name -> tensor as in the file). NetworkError
    naming the first module that has no place in the model."""
    unet_rows = {}
    for sai, names, kind in layout.transformer_key_table(transformer_config):
        if sai.endswith(".weight"):
            module = sai[: -len(".weight")]
            unet_rows["lora_unet_" + module.replace(".", "_")] = ([n[: -len(".weight")] for n in names], kind)
    te = {"text_encoder": _module_names(clip_l, "lora_te1"), "text_encoder_2": _module_names(clip_g, "lora_te2")}
    modules = sorted({k.split(".", 1)[0] for k in tensors})
    out: dict[str, torch.Tensor] = {}
    for name in modules:
        down, up = tensors[f"{name}.lora_down.weight"].float(), tensors[f"{name}.lora_up.weight"].float()
        rank = down.shape[0]
        alpha = float(tensors[f"{name}.alpha"]) if f"{name}.alpha" in tensors else float(rank)
        up = up * (alpha / rank)
        if name in unet_rows:
            targets, kind = unet_rows[name]
            if kind == layout.SPLIT:
                ups = up.chunk(len(targets), dim=0)
            elif kind == layout.SWAP:
                first, second = up.chunk(2, dim=0)
                ups = (torch.cat([second, first], dim=0),)
            else:
                ups = (up,)
            for target, part in zip(targets, ups):
                out[f"transformer.{target}.lora_A.weight"] = down
                out[f"transformer.{target}.lora_B.weight"] = part.contiguous()
            continue
        for component, names in te.items():
            if name in names:
                out[f"{component}.{names[name]}.lora_A.weight"] = down
                out[f"{component}.{names[name]}.lora_B.weight"] = up
                break
        else:
            raise NetworkError(f"LoRA module {name!r} has no place in diffusers' SD3 pipeline (T5 LoRAs and "
                               f"unknown modules cannot be converted)")
    return out


def main(argv: list[str] | None = None) -> int:
    """python -m sd_scripts.families.sd3.lora_files --lora IN --model MODEL --out OUT: write the diffusers form of
    a kohya SD3 LoRA (for `StableDiffusion3Pipeline.load_lora_weights`), reading the layer layout from MODEL (an SD3
    single file or diffusers folder; --clip_l/--clip_g/--t5xxl as for training when the file lacks them)."""
    import argparse
    import sys

    from ...errors import UserError
    from ...models.loading import load_model
    from ...models.module_io import save_safetensors_atomic
    from ...networks.weights_file import load_weights_file

    parser = argparse.ArgumentParser(prog="python -m sd_scripts.families.sd3.lora_files", description=main.__doc__)
    parser.add_argument("--lora", required=True, help="kohya-format SD3 LoRA (.safetensors)")
    parser.add_argument("--model", required=True, help="the SD3 model it was trained on")
    parser.add_argument("--clip_l")
    parser.add_argument("--clip_g")
    parser.add_argument("--t5xxl")
    parser.add_argument("--out", required=True, help="output .safetensors in diffusers' LoRA layout")
    args = parser.parse_args(argv)
    try:
        tensors, metadata = load_weights_file(args.lora)
        bundle = load_model(args.model, clip_l=args.clip_l, clip_g=args.clip_g, t5xxl=args.t5xxl)
        clip_l, clip_g = (bundle.text_encoders + [None, None])[:2]
        converted = to_diffusers_lora(tensors, transformer_config=bundle.denoiser.config, clip_l=clip_l,
                                      clip_g=clip_g)
        save_safetensors_atomic(converted, args.out, metadata)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.out}: {len(converted)} tensors in diffusers' LoRA layout")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
