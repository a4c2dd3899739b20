"""Tiny random-weight SD3 / SD3.5 models in the files users have, for tests and demo presets.

Real classes at tiny sizes, real structure: an MMDiT (diffusers SD3Transformer2DModel) of 3 joint blocks, width 128
= 2 heads of 64 (SD3's head dimension), the last context block pre-only, 16 latent channels, patch 2, a 16 x 16
positional table (so up to 256 px); SD3.5 medium adds q/k RMS norms and MMDiT-X second attention in blocks 0 and 1,
SD3.5 large q/k norms only. A 4-level 16-channel autoencoder (scaling 1.5305, shift 0.0609, no quant convs), CLIP-L
(width 32, identity projection as in SAI's files), CLIP-G (width 64, with projection) and a T5 v1.1-style encoder
(width 128 = 2 heads of 64, gated GELU); the MMDiT's pooled input is 32 + 64 and its joint attention width the T5
width, as in SD3 (768 + 1280 -> 2048 pooled, 4096 joint). Weights come from per-name seeded generators, so a seed
gives the same tensors every time.

Written under out_dir (layout 'single', 'diffusers' or 'both'):
    tiny-<variant>.safetensors                  model.diffusion_model.* + first_stage_model.* (like sd3.5_large)
    tiny-<variant>-incl-clips-t5.safetensors    the same + text_encoders.{clip_l,clip_g,t5xxl}.transformer.*
    clip_l.safetensors, clip_g.safetensors, t5xxl.safetensors   the separate text-encoder files
    tiny-<variant>/                             a StableDiffusion3Pipeline folder (no T5 tokenizer: tokenizer_3 null)

    python -m sd_scripts.families.sd3.tiny --out DIR [--variant sd3_medium|sd35_medium|sd35_large] [--layout ...]
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

from . import layout

TINY_TRANSFORMER = dict(sample_size=8, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=64,
                        num_attention_heads=2, joint_attention_dim=128, caption_projection_dim=128,
                        pooled_projection_dim=32 + 64, out_channels=16, pos_embed_max_size=16)
TINY_VARIANTS = {"sd3_medium": {}, "sd35_large": {"qk_norm": "rms_norm"},
                 "sd35_medium": {"qk_norm": "rms_norm", "dual_attention_layers": (0, 1)}}
TINY_VAE = dict(block_out_channels=[32, 32, 64, 64], layers_per_block=1, sample_size=64)
TINY_CLIP_L = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=1,
                   projection_dim=32)
TINY_CLIP_G = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
                   projection_dim=64)
TINY_T5 = dict(vocab_size=32128, d_model=128, d_kv=64, d_ff=256, num_layers=2, num_heads=2,
               relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.0,
               layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
               pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


@dataclass
class TinySD3Paths:
    """Where build_tiny_sd3 wrote the files (None for a layout not asked for)."""

    single_file: str | None
    single_file_with_text_encoders: str | None
    clip_l: str | None
    clip_g: str | None
    t5xxl: str | None
    diffusers_dir: str | None


def _seeded(module, seed: int, component: str) -> None:
    """Fill a module with per-name seeded values (sd_scripts.tools.tiny_model.random_tensor)."""
    import torch

    from ...tools.tiny_model import random_tensor

    norm_types = (torch.nn.LayerNorm, torch.nn.GroupNorm)
    norms = set()
    for name, sub in module.named_modules():
        if isinstance(sub, norm_types) or type(sub).__name__ in ("RMSNorm", "T5LayerNorm"):
            norms.add(f"{name}.weight" if name else "weight")
    state = {name: random_tensor(seed, f"{component}:{name}", t.shape, name in norms)
             for name, t in module.state_dict().items()}
    module.load_state_dict(state, strict=False, assign=True)
    module.eval()


def build_tiny_parts(variant: str = "sd3_medium", seed: int = 0) -> dict:
    """The tiny modules: {'transformer', 'vae', 'clip_l', 'clip_g', 't5xxl'} (real diffusers/transformers classes,
    seeded weights, eval mode)."""
    import torch
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from .weights import CLIP_G_CONFIG, CLIP_L_CONFIG

    if variant not in TINY_VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(TINY_VARIANTS)}, not {variant!r}")
    torch.manual_seed(seed)  # module constructors draw initial values; every parameter is overwritten below
    transformer = SD3Transformer2DModel(**TINY_TRANSFORMER, **TINY_VARIANTS[variant])
    vae_cfg = {k: v for k, v in dict(layout.VAE_CONFIG, **TINY_VAE).items() if not k.startswith("_")}
    vae = AutoencoderKL(**vae_cfg)
    clip_l = CLIPTextModelWithProjection(CLIPTextConfig(**dict(CLIP_L_CONFIG, **TINY_CLIP_L)))
    clip_g = CLIPTextModelWithProjection(CLIPTextConfig(**dict(CLIP_G_CONFIG, **TINY_CLIP_G)))
    t5 = T5EncoderModel(T5Config(**TINY_T5))
    for module, name in ((transformer, "transformer"), (vae, "vae"), (clip_l, "clip_l"), (clip_g, "clip_g"),
                         (t5, "t5xxl")):
        _seeded(module, seed, name)
    with torch.no_grad():  # SAI's CLIP-L has no projection: the pooled output is used as is
        clip_l.text_projection.weight.copy_(torch.eye(TINY_CLIP_L["hidden_size"]))
    t5.tie_weights()
    return {"transformer": transformer, "vae": vae, "clip_l": clip_l, "clip_g": clip_g, "t5xxl": t5}


def _clip_file_state(model, with_projection: bool) -> dict:
    """A CLIPTextModelWithProjection's tensors as the separate files name them (`text_model.*`, the projection
    only for CLIP-G)."""
    out = {}
    for name, t in model.state_dict().items():
        if name.startswith("text_projection."):
            if with_projection:
                out[name] = t
            continue
        out[name if name.startswith("text_model.") else "text_model." + name] = t
    return out


def _t5_file_state(model) -> dict:
    """T5 encoder tensors as t5xxl files hold them: `shared.weight` once (the tied encoder.embed_tokens left out)."""
    return {k: v for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}


def _write_diffusers(parts: dict, folder: str) -> str:
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from ...models.tokenizer import load_clip_tokenizer

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=layout.SCHEDULER_CONFIG["shift"])
    pipe = StableDiffusion3Pipeline(transformer=parts["transformer"], scheduler=scheduler, vae=parts["vae"],
                                    text_encoder=parts["clip_l"], tokenizer=load_clip_tokenizer("eos"),
                                    text_encoder_2=parts["clip_g"], tokenizer_2=load_clip_tokenizer("zero"),
                                    text_encoder_3=parts["t5xxl"], tokenizer_3=None)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def build_tiny_sd3(out_dir: str, *, variant: str = "sd3_medium", seed: int = 0,
                   layout: str = "both") -> TinySD3Paths:
    """Write a tiny SD3 model of `variant` under out_dir in the given layout ('single': the two single files and
    the separate text-encoder files; 'diffusers': the pipeline folder; 'both')."""
    from ...models.keymaps import vae_keymap
    from ...models.safetensors_writer import save_safetensors
    from . import layout as sd3_layout
    from .weights import transformer_to_sai

    if layout not in ("single", "diffusers", "both"):
        raise ValueError(f"layout must be single, diffusers or both, not {layout!r}")
    parts = build_tiny_parts(variant, seed)
    os.makedirs(out_dir, exist_ok=True)
    name = f"tiny-{variant}"
    paths = TinySD3Paths(None, None, None, None, None, None)
    if layout in ("single", "both"):
        transformer, vae = parts["transformer"], parts["vae"]
        meta = {"modelspec.sai_model_spec": "1.0.1",
                "modelspec.architecture": sd3_layout.MODELSPEC_ARCHITECTURE[variant],
                "modelspec.implementation": "https://github.com/Stability-AI/SD3.5",
                "modelspec.title": name, "modelspec.resolution": "64x64"}
        tensors = dict(transformer_to_sai(transformer.state_dict(), transformer.config))
        vae_map = vae_keymap(vae.state_dict().keys(), len(vae.config.block_out_channels))
        tensors.update(vae_map.to_ldm(vae.state_dict()))
        clip_l = _clip_file_state(parts["clip_l"], with_projection=False)
        clip_g = _clip_file_state(parts["clip_g"], with_projection=True)
        t5 = _t5_file_state(parts["t5xxl"])
        contiguous = lambda d: {k: v.detach().contiguous() for k, v in d.items()}  # noqa: E731
        paths.single_file = os.path.join(out_dir, name + ".safetensors")
        save_safetensors(contiguous(tensors), paths.single_file, metadata=meta)
        bundled = dict(tensors)
        for prefix, state in ((sd3_layout.CLIP_L_PREFIX, clip_l), (sd3_layout.CLIP_G_PREFIX, clip_g),
                              (sd3_layout.T5_PREFIX, t5)):
            bundled.update({prefix + k: v for k, v in state.items()})
        paths.single_file_with_text_encoders = os.path.join(out_dir, name + "-incl-clips-t5.safetensors")
        save_safetensors(contiguous(bundled), paths.single_file_with_text_encoders, metadata=meta)
        for attr, state in (("clip_l", clip_l), ("clip_g", clip_g), ("t5xxl", t5)):
            setattr(paths, attr, os.path.join(out_dir, attr + ".safetensors"))
            save_safetensors(contiguous(state), getattr(paths, attr))
    if layout in ("diffusers", "both"):
        paths.diffusers_dir = _write_diffusers(parts, os.path.join(out_dir, name))
    return paths


def build_tiny_model(out_dir: str, *, family: str = "sd3", v_prediction: bool = False, layout: str = "both",
                     seed: int = 0, variant: str = "sd3_medium"):
    """The registry's tiny builder (`python -m sd_scripts.tools.tiny_model --family sd3|sd35-medium`): every file
    of `build_tiny_sd3`; the single file it reports is the one with bundled text encoders (it trains alone)."""
    from ...tools.tiny_model import TinyModelPaths

    if v_prediction:
        raise ValueError("SD3 models are flow-matching models; there is no v-prediction variant")
    paths = build_tiny_sd3(out_dir, variant=variant, seed=seed, layout=layout)
    return TinyModelPaths(paths.single_file_with_text_encoders, paths.diffusers_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sd_scripts.families.sd3.tiny",
                                     description="Write a tiny random-weight SD3 / SD3.5 model.")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--variant", choices=tuple(TINY_VARIANTS), default="sd3_medium")
    parser.add_argument("--layout", choices=("single", "diffusers", "both"), default="both")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    paths = build_tiny_sd3(args.out, variant=args.variant, seed=args.seed, layout=args.layout)
    for label, path in vars(paths).items():
        if path:
            print(f"{label}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
