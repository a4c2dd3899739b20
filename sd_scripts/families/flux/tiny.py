"""Tiny random-weight FLUX.1-dev / FLUX.1-schnell / Chroma models in the files users have, for tests and demos.

The real architectures at toy widths, built by the real diffusers / transformers classes: a denoiser with 2 double
and 2 single blocks, 2 attention heads of width 16 (RoPE axes 4 + 6 + 6 = 16, FLUX's 16/56/56 scaled), 64-channel
packed latent tokens; a CLIP-L-like encoder 64 wide (one 64-wide head, as CLIP-L's heads are) with the real 49,408-
token vocabulary; a T5-like encoder 48 wide with the real 32,128-row vocabulary (the bundled T5 tokenizer's ids all
fit), gated-GELU feed-forward and relative attention buckets; a 4-level 16-channel autoencoder (8x downsampling,
scale 0.3611, shift 0.1159). Every width differs from the others, so a mixed-up tensor fails loudly.

Written as `flux1-tiny.safetensors` (BFL layout; `chroma-tiny.safetensors` for Chroma), `clip_l.safetensors`,
`t5xxl.safetensors`, `ae.safetensors` and a diffusers pipeline folder `diffusers/`. Weights come from generators
seeded per tensor name (the same seed gives the same bytes), and everything loads in milliseconds.

    python -m sd_scripts.families.flux.tiny --out DIR [--model_type flux_dev|flux_schnell|chroma]
                                            [--layout single|diffusers|both] [--seed N]
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

from . import layout

TINY_HEAD_DIM = 16
TINY_HEADS = 2
TINY_CLIP = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
                 projection_dim=64)
TINY_T5 = dict(d_model=48, d_kv=8, num_heads=4, d_ff=96, num_layers=2, relative_attention_num_buckets=32)
TINY_AE = dict(block_out_channels=[32, 32, 64, 64], layers_per_block=1, norm_num_groups=32, sample_size=64)


@dataclass
class TinyFluxPaths:
    """What build_tiny_flux wrote (None for a layout not asked for)."""

    model_type: str
    transformer: str | None
    clip_l: str | None
    t5xxl: str | None
    ae: str | None
    diffusers_dir: str | None


def tiny_transformer_config(model_type: str, blocks: tuple[int, int] = (2, 2)) -> dict:
    """The tiny denoiser's diffusers config (with '_class_name'); `blocks` = (double, single) block counts."""
    if model_type not in layout.MODEL_TYPES:
        raise ValueError(f"model_type must be one of {layout.MODEL_TYPES}, not {model_type!r}")
    cfg = dict(patch_size=1, in_channels=64, out_channels=None, num_layers=blocks[0], num_single_layers=blocks[1],
               attention_head_dim=TINY_HEAD_DIM, num_attention_heads=TINY_HEADS,
               joint_attention_dim=TINY_T5["d_model"], axes_dims_rope=layout.rope_axes(TINY_HEAD_DIM))
    if model_type == "chroma":
        cfg.update(_class_name="ChromaTransformer2DModel", approximator_num_channels=64, approximator_hidden_dim=40,
                   approximator_layers=2)
    else:
        cfg.update(_class_name="FluxTransformer2DModel", pooled_projection_dim=TINY_CLIP["hidden_size"],
                   guidance_embeds=model_type == "flux_dev")
    return cfg


def _random_state(module, seed: int, component: str, skip: tuple[str, ...] = ()) -> dict:
    """Seeded values per parameter name: 1-D weights (every norm scale in these models) near 1, biases near 0,
    matrices N(0, 1/fan_in)."""
    from ...tools.tiny_model import random_tensor

    return {name: random_tensor(seed, f"{component}:{name}", tuple(param.shape),
                                param.ndim == 1 and name.endswith(".weight"))
            for name, param in module.state_dict().items() if name not in skip}


def _randomise(module, seed: int, component: str) -> None:
    module.load_state_dict(_random_state(module, seed, component), strict=True, assign=True)
    module.eval()


def build_tiny_parts(model_type: str = "flux_dev", seed: int = 0, blocks: tuple[int, int] = (2, 2)):
    """The tiny model as FluxModelParts (random seeded modules, bundled tokenizers); `blocks` = (double, single)."""
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from ..sd.arch import bundled_config
    from ..sd.loading import build_vae
    from ...models.t5 import T5_XXL_CONFIG, load_t5_tokenizer
    from ...models.tokenizer import load_clip_tokenizer
    from .weights import FluxModelParts, build_transformer

    transformer = build_transformer(tiny_transformer_config(model_type, blocks))
    _randomise(transformer, seed, "transformer")
    ae = build_vae(dict(layout.AE_CONFIG, **TINY_AE))
    _randomise(ae, seed, "ae")
    with init_empty_weights():
        t5 = T5EncoderModel(T5Config(**dict(T5_XXL_CONFIG, **TINY_T5)))
    state = _random_state(t5, seed, "t5", skip=("encoder.embed_tokens.weight",))
    state["encoder.embed_tokens.weight"] = state["shared.weight"]  # the tied input embedding: one tensor
    t5.load_state_dict(state, strict=True, assign=True)
    t5.tie_weights()
    t5.eval()
    parts = FluxModelParts(model_type, transformer, t5, load_t5_tokenizer(), ae, layout.scheduler_config(model_type))
    if model_type != "chroma":
        clip_cfg = dict(bundled_config("sd1", False, "text_encoder"), **TINY_CLIP)
        with init_empty_weights():
            clip = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in clip_cfg.items() if not k.startswith("_")}))
        _randomise(clip, seed, "clip_l")
        parts.clip_l, parts.clip_tokenizer = clip, load_clip_tokenizer("eos")
    return parts


def build_tiny_flux(out_dir: str, *, model_type: str = "flux_dev", seed: int = 0, layout: str = "both",
                    blocks: tuple[int, int] = (2, 2)) -> TinyFluxPaths:  # noqa: A002 - tiny_model's option name
    """Write the tiny model under `out_dir`: the single files (layout 'single' or 'both') and the diffusers folder
    `out_dir/diffusers` ('diffusers' or 'both'). `blocks`: (double, single) block counts (block-swap tests need
    more than the default 2 + 2)."""
    from .weights import save_ae, save_clip_l, save_diffusers_folder, save_t5xxl, save_transformer

    which = layout
    if which not in ("single", "diffusers", "both"):
        raise ValueError(f"layout must be single, diffusers or both, not {which!r}")
    parts = build_tiny_parts(model_type, seed, blocks)
    os.makedirs(out_dir, exist_ok=True)
    paths = TinyFluxPaths(model_type, None, None, None, None, None)
    if which in ("single", "both"):
        name = "chroma-tiny.safetensors" if model_type == "chroma" else "flux1-tiny.safetensors"
        meta = {"modelspec.title": name[:-len(".safetensors")], "modelspec.resolution": "64x64"}
        paths.transformer = save_transformer(parts.transformer, os.path.join(out_dir, name), metadata=meta)
        paths.t5xxl = save_t5xxl(parts.t5, os.path.join(out_dir, "t5xxl.safetensors"))
        paths.ae = save_ae(parts.ae, os.path.join(out_dir, "ae.safetensors"))
        if parts.clip_l is not None:
            paths.clip_l = save_clip_l(parts.clip_l, os.path.join(out_dir, "clip_l.safetensors"))
    if which in ("diffusers", "both"):
        paths.diffusers_dir = save_diffusers_folder(parts, os.path.join(out_dir, "diffusers"))
    return paths


def build_tiny_model(out_dir: str, *, family: str = "flux", v_prediction: bool = False, layout: str = "both",
                     seed: int = 0, model_type: str | None = None):  # noqa: A002 - the registry's keyword names
    """The registry's tiny-model builder (sd_scripts.tools.tiny_model): writes `build_tiny_flux` under `out_dir` and
    returns TinyModelPaths with `single_file` = the denoiser file; its part files lie next to it in `out_dir`
    (`clip_l.safetensors` (not for Chroma), `t5xxl.safetensors`, `ae.safetensors`), for --clip_l / --t5xxl / --ae.
    `diffusers_dir` = `out_dir/diffusers`. `model_type`: flux_dev (default for FLUX.1), flux_schnell or chroma."""
    from ...tools.tiny_model import TinyModelPaths

    if v_prediction:
        raise ValueError("FLUX.1 / Chroma models have no v-prediction variant")
    kind = model_type or ("chroma" if family == "chroma" else "flux_dev")
    paths = build_tiny_flux(out_dir, model_type=kind, seed=seed, layout=layout)
    return TinyModelPaths(paths.transformer, paths.diffusers_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sd_scripts.families.flux.tiny",
                                     description="Write a tiny random-weight FLUX.1 / Chroma model.")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--model_type", choices=layout.MODEL_TYPES, default="flux_dev")
    parser.add_argument("--layout", choices=("single", "diffusers", "both"), default="both")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    paths = build_tiny_flux(args.out, model_type=args.model_type, seed=args.seed, layout=args.layout)
    for label in ("transformer", "clip_l", "t5xxl", "ae", "diffusers_dir"):
        if getattr(paths, label):
            print(f"{label}: {getattr(paths, label)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
