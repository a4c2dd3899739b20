"""Tiny random-weight HunyuanImage-2.1 models in the files users have, for tests and demos.

The real classes at toy widths: a DiT 64 wide (2 heads of 32, RoPE axes 16 + 16) with 2 double, 2 single and 2
refiner blocks on 64-channel latents; Qwen2.5-VL's language model 64 wide (2 heads of 32, one KV head, 4 layers) with
the real 152,064-row vocabulary (every id of the bundled Qwen tokenizer fits), saved in bfloat16 as the released file
is; a byT5 encoder 32 wide with the 1,510-row vocabulary (ByT5 + colour and font tokens); a 6-level VAE (32x
downsampling, 64 latent channels, widths 32 to 128). Files: `hunyuanimage2.1-tiny.safetensors` (official layout),
`qwen_2.5_vl.safetensors`, `byt5.safetensors`, `vae.safetensors`, and with layout diffusers/both a
HunyuanImagePipeline folder `diffusers/`.

    python -m sd_scripts.families.hunyuan_image.tiny --out DIR [--layout single|diffusers|both] [--seed N]
"""
from __future__ import annotations

import argparse
import os
import sys

from . import layout

TINY_DIT = dict(num_attention_heads=2, attention_head_dim=32, num_layers=2, num_single_layers=2,
                num_refiner_layers=2, rope_axes_dim=[16, 16])
TINY_QWEN = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=2,
                 num_key_value_heads=1, vocab_size=152064)
TINY_BYT5 = dict(d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=2, vocab_size=1510)
TINY_VAE = dict(block_out_channels=[32, 32, 64, 64, 128, 128], layers_per_block=1, sample_size=64)
FILES = {"pretrained_model_name_or_path": "hunyuanimage2.1-tiny.safetensors", "text_encoder": "qwen_2.5_vl.safetensors",
         "byt5": "byt5.safetensors", "vae": "vae.safetensors"}


def _randomise(module, seed: int, component: str, skip=()):
    from ...tools.tiny_model import random_tensor

    state = {name: random_tensor(seed, f"{component}:{name}", tuple(p.shape), p.ndim == 1 and name.endswith(".weight"))
             for name, p in module.state_dict().items() if name not in skip}
    return state


def build_tiny_parts(seed: int = 0, blocks: tuple[int, int] = (2, 2)) -> dict:
    """The tiny modules: transformer, vae, qwen, byt5 (random seeded) and their tokenizers."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLHunyuanImage
    from transformers import T5Config, T5EncoderModel

    from ...models.qwen_tokenizer import load_qwen_tokenizer
    from ...models.t5 import T5_XXL_CONFIG
    from .weights import build_dit, build_qwen, load_byt5_tokenizer, qwen_config

    dit = build_dit(dict(layout.REAL_CONFIG, **dict(TINY_DIT, num_layers=blocks[0], num_single_layers=blocks[1]),
                         text_embed_dim=TINY_QWEN["hidden_size"], text_embed_2_dim=TINY_BYT5["d_model"]))
    dit.load_state_dict(_randomise(dit, seed, "dit"), strict=True, assign=True)
    with init_empty_weights():
        vae = AutoencoderKLHunyuanImage(**dict(layout.VAE_CONFIG, **TINY_VAE))
    vae.load_state_dict(_randomise(vae, seed, "vae"), strict=True, assign=True)
    qwen = build_qwen(qwen_config(TINY_QWEN))
    state = _randomise(qwen, seed, "qwen")
    qwen.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in state.items()}, strict=True, assign=True)
    with init_empty_weights():
        byt5 = T5EncoderModel(T5Config(**dict(T5_XXL_CONFIG, **TINY_BYT5)))
    state = _randomise(byt5, seed, "byt5", skip=("encoder.embed_tokens.weight",))
    state["encoder.embed_tokens.weight"] = state["shared.weight"]
    byt5.load_state_dict(state, strict=True, assign=True)
    byt5.tie_weights()
    for m in (dit, vae, qwen, byt5):
        m.eval()
    return dict(transformer=dit, vae=vae, qwen=qwen, qwen_tokenizer=load_qwen_tokenizer(), byt5=byt5,
                byt5_tokenizer=load_byt5_tokenizer())


def build_tiny_hunyuan(out_dir: str, *, seed: int = 0, layout: str = "single",  # noqa: A002
                       blocks: tuple[int, int] = (2, 2)) -> dict[str, str]:
    """Write the tiny model's files under `out_dir`; returns option -> path (and 'diffusers' -> folder)."""
    import torch

    from .weights import save_byt5, save_dit, save_pipeline_folder, save_qwen, save_vae

    parts = build_tiny_parts(seed, blocks)
    os.makedirs(out_dir, exist_ok=True)
    out: dict[str, str] = {}
    if layout in ("single", "both"):
        path = {k: os.path.join(out_dir, v) for k, v in FILES.items()}
        meta = {"modelspec.title": "hunyuanimage2.1-tiny", "modelspec.resolution": "64x64"}
        save_dit(parts["transformer"], path["pretrained_model_name_or_path"], metadata=meta)
        save_qwen(parts["qwen"], path["text_encoder"], dtype=torch.bfloat16)
        save_byt5(parts["byt5"], path["byt5"])
        save_vae(parts["vae"], path["vae"])
        out.update(path)
    if layout in ("diffusers", "both"):
        out["diffusers"] = save_pipeline_folder(os.path.join(out_dir, "diffusers"), transformer=parts["transformer"],
                                                vae=parts["vae"], qwen=parts["qwen"],
                                                qwen_tokenizer=parts["qwen_tokenizer"], byt5=parts["byt5"],
                                                byt5_tokenizer=parts["byt5_tokenizer"])
    return out


def build_tiny_model(out_dir: str, *, family: str = "", v_prediction: bool = False, layout: str = "both",
                     seed: int = 0, blocks: tuple[int, int] = (2, 2)):  # noqa: A002 - the registry's keyword names
    """The registry's tiny-model builder: `single_file` = the DiT file; the part files lie next to it
    (spec.tiny_files: --text_encoder, --byt5, --vae)."""
    from ...tools.tiny_model import TinyModelPaths

    if v_prediction:
        raise ValueError("HunyuanImage-2.1 has no v-prediction variant")
    paths = build_tiny_hunyuan(out_dir, seed=seed, layout=layout, blocks=tuple(blocks))
    return TinyModelPaths(paths.get("pretrained_model_name_or_path"), paths.get("diffusers"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sd_scripts.families.hunyuan_image.tiny",
                                     description="Write a tiny random-weight HunyuanImage-2.1 model.")
    parser.add_argument("--out", required=True)
    parser.add_argument("--layout", choices=("single", "diffusers", "both"), default="single")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name, path in build_tiny_hunyuan(args.out, seed=args.seed, layout=args.layout).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
