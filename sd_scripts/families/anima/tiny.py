"""Tiny random-weight Anima models in the files users have, for tests and demos.

The real architectures at toy widths, built by the real classes: the DiT (diffusers CosmosTransformer3DModel + our
LLM adapter) 48 wide (2 heads of 24: RoPE axes 8 + 8 + 8), 2 blocks, adaLN-LoRA 16, a 40-wide context; the LLM
adapter 40 wide with 2 blocks and the real 32,128-row T5 vocabulary; a Qwen3 encoder 16 wide (2 heads of 8, one
key/value head, q/k norms) with the real 151,936-token vocabulary; the Qwen-Image VAE (8x down, 16 latent channels)
at base width 8. Weights come from generators seeded per tensor name (the same seed gives the same bytes).

Written as `anima-tiny.safetensors` (the DiT under `net.`, adapter included), `qwen_3_06b_base.safetensors`
(ComfyUI's `model.` layout) and `qwen_image_vae.safetensors` (ComfyUI / Wan layout), the names Anima ships.

    python -m sd_scripts.families.anima.tiny --out DIR [--seed N]
"""
from __future__ import annotations

import argparse
import os
import sys

from . import layout

TINY_DIT = dict(layout.REAL_CONFIG, num_attention_heads=2, attention_head_dim=24, num_layers=2, text_embed_dim=40,
                adaln_lora_dim=16, max_size=(128, 512, 512))
TINY_ADAPTER = dict(source_dim=16, target_dim=40, model_dim=40, num_layers=2, num_heads=2, vocab_size=32128,
                    self_attn=True)
TINY_QWEN3 = dict(hidden_size=16, head_dim=8, num_attention_heads=2, num_key_value_heads=1, intermediate_size=32,
                  num_hidden_layers=2)
TINY_VAE = dict(base_dim=8)
FILES = {"pretrained_model_name_or_path": "anima-tiny.safetensors", "qwen3": "qwen_3_06b_base.safetensors",
         "vae": "qwen_image_vae.safetensors"}


def _randomise(module, seed: int, component: str) -> None:
    from ...tools.tiny_model import random_tensor

    state = {name: random_tensor(seed, f"{component}:{name}", tuple(t.shape),
                                 t.ndim == 1 and name.endswith((".weight", ".gamma")))
             for name, t in module.state_dict().items()}
    module.load_state_dict(state, strict=True, assign=True)
    module.eval()


def build_tiny_parts(seed: int = 0, blocks: int = 2):
    """(transformer, qwen3, vae) tiny random modules."""
    from diffusers import AutoencoderKLQwenImage
    from transformers import Qwen3Config, Qwen3Model

    from .weights import _build, _init_buffers, build_transformer

    transformer = build_transformer(dict(TINY_DIT, num_layers=blocks), TINY_ADAPTER)
    _randomise(transformer, seed, "dit")
    qwen = _build(lambda: Qwen3Model(Qwen3Config(**dict(layout.QWEN3_CONFIG, **TINY_QWEN3))))
    _randomise(qwen, seed, "qwen3")
    _init_buffers(qwen)
    vae = _build(lambda: AutoencoderKLQwenImage(**dict(layout.VAE_CONFIG, **TINY_VAE)))
    _randomise(vae, seed, "vae")
    return transformer, qwen, vae


def build_tiny_anima(out_dir: str, *, seed: int = 0, blocks: int = 2) -> dict[str, str]:
    """Write the three files under `out_dir`; returns {option: path}."""
    from .weights import save_qwen3, save_transformer, save_vae

    transformer, qwen, vae = build_tiny_parts(seed, blocks)
    os.makedirs(out_dir, exist_ok=True)
    paths = {option: os.path.join(out_dir, name) for option, name in FILES.items()}
    meta = {"modelspec.title": "anima-tiny", "modelspec.resolution": "64x64"}
    save_transformer(transformer, paths["pretrained_model_name_or_path"], metadata=meta)
    save_qwen3(qwen, paths["qwen3"])
    save_vae(vae, paths["vae"])
    return paths


def build_tiny_model(out_dir: str, *, family: str = "anima", v_prediction: bool = False, layout: str = "both",
                     seed: int = 0, blocks: int = 2):  # noqa: A002 - the registry's keyword names
    """The registry's tiny-model builder: `single_file` = the DiT file, its part files next to it (--qwen3,
    --vae); there is no diffusers layout (diffusers has no Anima pipeline)."""
    from ...tools.tiny_model import TinyModelPaths

    if v_prediction:
        raise ValueError("Anima has no v-prediction variant")
    if layout == "diffusers":
        raise ValueError("Anima has no diffusers pipeline layout: use --layout single")
    paths = build_tiny_anima(out_dir, seed=seed, blocks=blocks)
    return TinyModelPaths(paths["pretrained_model_name_or_path"], None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sd_scripts.families.anima.tiny",
                                     description="Write a tiny random-weight Anima model.")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for option, path in build_tiny_anima(args.out, seed=args.seed).items():
        print(f"{option}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
