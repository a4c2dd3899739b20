"""Tiny random-weight SD1 / SD2 / SD2-v / SDXL models for tests and demo presets (see sd_scripts.tools.tiny_model).

The models are built by the real diffusers/transformers classes with tiny sizes (U-Net channels 32/64, one layer
per block, cross-attention 32; CLIP width 32; a 4-level VAE with 8x downsampling) and use the real bundled
tokenizer, so a training step on 64x64 images takes milliseconds. SD2 keeps its structure: linear projections,
per-block head counts, an OpenCLIP text encoder with the extra last layer and text_projection in the single file.
SDXL keeps its: a plain first level then cross-attention with deeper transformer stacks (1, 2; the middle block as
deep as the last level), 'text_time' size conditioning, cross-attention over both encoders' hidden states
(CLIP-L-like width 32 + bigG-like width 64 = 96), a bigG-like second encoder with a projection (32) whose pooled
output joins the 6 time-id embeddings (6 x 8 + 32 = 80 inputs), a VAE scaled by 0.13025, and in the single file the
bigG logit_scale and CLIP position ids that no module uses. The two encoders have different widths, as the real
ones do (diffusers tells them apart by width). Weights come from per-name seeded generators: the same seed gives
identical bytes.
"""
from __future__ import annotations

import math
import os

from ...tools.tiny_model import TinyModelPaths, init_module, random_tensor

TINY_UNET = dict(sample_size=8, block_out_channels=[32, 64], layers_per_block=1,
                 down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                 up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=32)
TINY_VAE = dict(block_out_channels=[16, 16, 32, 32], layers_per_block=1, norm_num_groups=8, sample_size=64)
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32)

# SDXL: te1 width 32 (CLIP-L-like), te2 width 64 with projection 32 (bigG-like); time ids embedded with 8 channels each
TINY_SDXL_TEXT_2 = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        projection_dim=32)
TINY_SDXL_TIME_EMBED_DIM = 8
TINY_SDXL_UNET = dict(sample_size=8, block_out_channels=[32, 64], layers_per_block=1,
                      down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                      up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], transformer_layers_per_block=[1, 2],
                      attention_head_dim=[2, 4],  # 16 channels per head, per level (SDXL: 64)
                      cross_attention_dim=TINY_TEXT["hidden_size"] + TINY_SDXL_TEXT_2["hidden_size"],
                      addition_time_embed_dim=TINY_SDXL_TIME_EMBED_DIM,
                      projection_class_embeddings_input_dim=6 * TINY_SDXL_TIME_EMBED_DIM
                      + TINY_SDXL_TEXT_2["projection_dim"])


def tiny_configs(family: str, v_prediction: bool) -> tuple[dict, ...]:
    """(unet, vae, text encoder) configs: the bundled family configs with tiny sizes; SDXL adds text encoder 2."""
    from .arch import bundled_config

    if family == "sdxl":
        return (dict(bundled_config(family, v_prediction, "unet"), **TINY_SDXL_UNET),
                dict(bundled_config(family, v_prediction, "vae"), **TINY_VAE),
                dict(bundled_config(family, v_prediction, "text_encoder"), **TINY_TEXT),
                dict(bundled_config(family, v_prediction, "text_encoder_2"), **TINY_SDXL_TEXT_2))
    unet = dict(bundled_config(family, v_prediction, "unet"), **TINY_UNET)
    unet["attention_head_dim"] = [2, 4] if family == "sd2" else 8  # SD2: per-block heads (16 channels each)
    vae = dict(bundled_config(family, v_prediction, "vae"), **TINY_VAE)
    text = dict(bundled_config(family, v_prediction, "text_encoder"), **TINY_TEXT)
    return unet, vae, text


def _build_tiny_sdxl(seed: int):
    """The tiny SDXL bundle: four seeded modules, both tokenizers, and the single-file-only tensors."""
    import torch

    from .arch import bundled_config, scheduler_training_config
    from ...models.bundle import ModelBundle, compute_vae_id
    from ...models.ldm_layout import SDXL_TE1_PREFIX, SDXL_TE2_PREFIX
    from .loading import build_text_encoder, build_text_encoder_2, build_unet, build_vae
    from ...models.tokenizer import load_clip_tokenizer

    configs = tiny_configs("sdxl", False)
    modules = [build(cfg) for build, cfg in
               zip((build_unet, build_vae, build_text_encoder, build_text_encoder_2), configs)]
    for module, name in zip(modules, ("unet", "vae", "text_encoder", "text_encoder_2")):
        init_module(module, seed, name)
        module.eval()
    unet, vae, te, te2 = modules
    # like the SAI file: CLIP-L position ids and the bigG logit scale ride along, used by no module
    extra = {SDXL_TE1_PREFIX + "text_model.embeddings.position_ids": torch.arange(77).unsqueeze(0),
             SDXL_TE2_PREFIX + "logit_scale": torch.tensor(math.log(1 / 0.07))}
    sched = scheduler_training_config(bundled_config("sdxl", False, "scheduler"), False)
    return ModelBundle("sdxl", unet, vae, [te, te2], [load_clip_tokenizer("eos"), load_clip_tokenizer("zero")],
                       "<tiny>", False, sched, extra, compute_vae_id(vae))


def build_tiny_bundle(family: str = "sd1", v_prediction: bool = False, seed: int = 0):
    """A ModelBundle of random tiny modules (SD2: with the extra OpenCLIP tensors in extra_state; SDXL: with both
    text encoders and tokenizers)."""
    import torch

    from .arch import bundled_config, scheduler_training_config
    from ...models.bundle import ModelBundle, compute_vae_id
    from ...models.ldm_layout import OPENCLIP_PREFIX
    from .loading import build_text_encoder, build_unet, build_vae
    from ...models.tokenizer import load_clip_tokenizer
    from .arch import pad_mode_for

    if family not in ("sd1", "sd2", "sdxl") or (v_prediction and family != "sd2"):
        raise ValueError(f"tiny models exist for sd1, sd2, sd2 with v-prediction and sdxl, not {family!r} "
                         f"v={v_prediction}")
    if family == "sdxl":
        return _build_tiny_sdxl(seed)
    unet_cfg, vae_cfg, te_cfg = tiny_configs(family, v_prediction)
    unet, vae, te = build_unet(unet_cfg), build_vae(vae_cfg), build_text_encoder(te_cfg)
    for module, name in ((unet, "unet"), (vae, "vae"), (te, "text_encoder")):
        init_module(module, seed, name)
        module.eval()
    extra: dict[str, torch.Tensor] = {}
    width = te_cfg["hidden_size"]
    if family == "sd2":
        last = f"{OPENCLIP_PREFIX}transformer.resblocks.{te_cfg['num_hidden_layers']}."
        hidden = te_cfg["intermediate_size"]
        shapes = {"ln_1.weight": (width,), "ln_1.bias": (width,), "attn.in_proj_weight": (3 * width, width),
                  "attn.in_proj_bias": (3 * width,), "attn.out_proj.weight": (width, width),
                  "attn.out_proj.bias": (width,), "ln_2.weight": (width,), "ln_2.bias": (width,),
                  "mlp.c_fc.weight": (hidden, width), "mlp.c_fc.bias": (hidden,),
                  "mlp.c_proj.weight": (width, hidden), "mlp.c_proj.bias": (width,)}
        for name, shape in shapes.items():
            extra[last + name] = random_tensor(seed, "openclip:" + name, shape, name.startswith("ln_") and
                                               name.endswith("weight"))
        extra[OPENCLIP_PREFIX + "text_projection"] = random_tensor(seed, "openclip:text_projection",
                                                                   (width, te_cfg["projection_dim"]))
        extra[OPENCLIP_PREFIX + "logit_scale"] = torch.tensor(math.log(1 / 0.07))
    else:  # like real SD1 files: the position_ids buffer (int64) rides along
        extra["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    extra["alphas_cumprod"] = torch.cumprod(1 - betas, 0).to(torch.float32)
    sched = scheduler_training_config(bundled_config(family, v_prediction, "scheduler"), v_prediction)
    return ModelBundle(family, unet, vae, [te], [load_clip_tokenizer(pad_mode_for(family))], "<tiny>", v_prediction,
                       sched, extra, compute_vae_id(vae))


def build_tiny_model(out_dir: str, *, family: str = "sd1", v_prediction: bool = False, layout: str = "both",
                     seed: int = 0) -> TinyModelPaths:
    """Write a tiny model under out_dir: `tiny-<variant>.safetensors` and/or the diffusers folder `tiny-<variant>/`."""
    from .. import family_spec
    from .saving import save_diffusers, save_single_file

    bundle = build_tiny_bundle(family, v_prediction, seed)
    name = "tiny-" + family + ("-v" if v_prediction else "")
    os.makedirs(out_dir, exist_ok=True)
    single = diffusers_dir = None
    if layout in ("single", "both"):
        meta = {"modelspec.sai_model_spec": "1.0.1",
                "modelspec.architecture": family_spec(family).architecture_for(v_prediction),
                "modelspec.prediction_type": "v" if v_prediction else "epsilon",
                "modelspec.title": name, "modelspec.resolution": "64x64"}
        single = save_single_file(bundle, os.path.join(out_dir, name + ".safetensors"), metadata=meta)
    if layout in ("diffusers", "both"):
        diffusers_dir = save_diffusers(bundle, os.path.join(out_dir, name))
    return TinyModelPaths(single, diffusers_dir)


