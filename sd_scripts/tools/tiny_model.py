"""Tiny random-weight SD1 / SD2 / SD2-v / SDXL models and a demo dataset, for tests and the demo preset.

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

    python -m sd_scripts.tools.tiny_model --family sd1|sd2|sd2-v|sdxl --out DIR [--layout single|diffusers|both]
                                          [--dataset DIR]
"""
from __future__ import annotations

import argparse
import hashlib
import math
import os
import random
import sys
from dataclasses import dataclass

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


@dataclass
class TinyModelPaths:
    """Where build_tiny_model wrote the model (None for a layout not asked for)."""

    single_file: str | None
    diffusers_dir: str | None


def _seed_for(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


def random_tensor(seed: int, name: str, shape, is_norm_weight: bool = False):
    """A seeded tensor for parameter `name`: N(0, 1/fan_in) for matrices, small values around 1 (norm weights) or 0
    (other vectors), so a mix-up of any two tensors changes the results."""
    import torch

    g = torch.Generator().manual_seed(_seed_for(seed, name))
    values = torch.randn(tuple(shape), generator=g, dtype=torch.float32)
    if len(shape) >= 2:
        return values / math.sqrt(math.prod(shape[1:]))
    return values * 0.1 + (1.0 if is_norm_weight else 0.0)


def _init_module(module, seed: int, component: str) -> None:
    import torch

    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    norm_weights = {f"{n}.weight" if n else "weight" for n, m in module.named_modules() if isinstance(m, norms)}
    state = {}
    for name, param in module.state_dict().items():
        canonical = name if not component.startswith("text") or name.startswith("text_model.") else "text_model." + name
        state[name] = random_tensor(seed, f"{component}:{canonical}", param.shape, name in norm_weights)
    module.load_state_dict(state, strict=True, assign=True)


def tiny_configs(family: str, v_prediction: bool) -> tuple[dict, ...]:
    """(unet, vae, text encoder) configs: the bundled family configs with tiny sizes; SDXL adds text encoder 2."""
    from ..models.arch import bundled_config

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

    from ..models.arch import bundled_config, scheduler_training_config
    from ..models.bundle import ModelBundle, compute_vae_id
    from ..models.detect import SDXL_TE1_PREFIX, SDXL_TE2_PREFIX
    from ..models.loading import build_text_encoder, build_text_encoder_2, build_unet, build_vae
    from ..models.tokenizer import load_clip_tokenizer

    configs = tiny_configs("sdxl", False)
    modules = [build(cfg) for build, cfg in
               zip((build_unet, build_vae, build_text_encoder, build_text_encoder_2), configs)]
    for module, name in zip(modules, ("unet", "vae", "text_encoder", "text_encoder_2")):
        _init_module(module, seed, name)
        module.eval()
    unet, vae, te, te2 = modules
    # like the SAI file: CLIP-L position ids and the bigG logit scale ride along, used by no module
    extra = {SDXL_TE1_PREFIX + "text_model.embeddings.position_ids": torch.arange(77).unsqueeze(0),
             SDXL_TE2_PREFIX + "logit_scale": torch.tensor(math.log(1 / 0.07))}
    sched = scheduler_training_config(bundled_config("sdxl", False, "scheduler"), False)
    return ModelBundle("sdxl", False, unet, vae, te, load_clip_tokenizer("eos"), sched, "<tiny>", extra,
                       compute_vae_id(vae), text_encoder_2=te2, tokenizer_2=load_clip_tokenizer("zero"))


def build_tiny_bundle(family: str = "sd1", v_prediction: bool = False, seed: int = 0):
    """A ModelBundle of random tiny modules (SD2: with the extra OpenCLIP tensors in extra_state; SDXL: with both
    text encoders and tokenizers)."""
    import torch

    from ..models.arch import bundled_config, scheduler_training_config
    from ..models.bundle import ModelBundle, compute_vae_id
    from ..models.keymaps import OPENCLIP_PREFIX
    from ..models.loading import build_text_encoder, build_unet, build_vae
    from ..models.tokenizer import load_clip_tokenizer, pad_mode_for

    if family not in ("sd1", "sd2", "sdxl") or (v_prediction and family != "sd2"):
        raise ValueError(f"tiny models exist for sd1, sd2, sd2 with v-prediction and sdxl, not {family!r} "
                         f"v={v_prediction}")
    if family == "sdxl":
        return _build_tiny_sdxl(seed)
    unet_cfg, vae_cfg, te_cfg = tiny_configs(family, v_prediction)
    unet, vae, te = build_unet(unet_cfg), build_vae(vae_cfg), build_text_encoder(te_cfg)
    for module, name in ((unet, "unet"), (vae, "vae"), (te, "text_encoder")):
        _init_module(module, seed, name)
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
    return ModelBundle(family, v_prediction, unet, vae, te, load_clip_tokenizer(pad_mode_for(family)), sched,
                       "<tiny>", extra, compute_vae_id(vae))


def build_tiny_model(out_dir: str, family: str = "sd1", v_prediction: bool = False, layout: str = "both",
                     seed: int = 0) -> TinyModelPaths:
    """Write a tiny model under out_dir: `tiny-<variant>.safetensors` and/or the diffusers folder `tiny-<variant>/`."""
    from ..models.families import modelspec_architecture
    from ..models.saving import save_diffusers, save_single_file

    if layout not in ("single", "diffusers", "both"):
        raise ValueError(f"layout must be single, diffusers or both, not {layout!r}")
    bundle = build_tiny_bundle(family, v_prediction, seed)
    name = "tiny-" + family + ("-v" if v_prediction else "")
    os.makedirs(out_dir, exist_ok=True)
    single = diffusers_dir = None
    if layout in ("single", "both"):
        meta = {"modelspec.sai_model_spec": "1.0.1",
                "modelspec.architecture": modelspec_architecture(family, v_prediction),
                "modelspec.prediction_type": "v" if v_prediction else "epsilon",
                "modelspec.title": name, "modelspec.resolution": "64x64"}
        single = save_single_file(bundle, os.path.join(out_dir, name + ".safetensors"), metadata=meta)
    if layout in ("diffusers", "both"):
        diffusers_dir = save_diffusers(bundle, os.path.join(out_dir, name))
    return TinyModelPaths(single, diffusers_dir)


# ---------------------------------------------------------------- demo dataset

_DEMO_CONCEPTS = {"10_sks dog": ("sks dog", 7), "5_ohwx cat": ("ohwx cat", 6)}
_SIZES = [(64, 64), (96, 64), (64, 96)]
_COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40),
            "purple": (140, 50, 170), "orange": (240, 140, 30)}


def make_demo_dataset(out_dir: str, seed: int = 0) -> str:
    """A kohya-convention dataset under out_dir/train: '10_sks dog' and '5_ohwx cat' with mixed-aspect PNGs and
    .txt captions; the last image of each folder has no caption (class-token fallback). Returns the train folder."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    train = os.path.join(out_dir, "train")
    for folder, (token, count) in _DEMO_CONCEPTS.items():
        path = os.path.join(train, folder)
        os.makedirs(path, exist_ok=True)
        for i in range(count):
            w, h = _SIZES[i % len(_SIZES)]
            colour_name, colour = rng.choice(sorted(_COLOURS.items()))
            background = tuple(rng.randrange(256) for _ in range(3))
            image = Image.new("RGB", (w, h), background)
            draw = ImageDraw.Draw(image)
            x0, y0 = rng.randrange(w // 3), rng.randrange(h // 3)
            shape = "circle" if i % 2 == 0 else "square"
            box = (x0, y0, x0 + w // 2, y0 + h // 2)
            (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=colour)
            stem = os.path.join(path, f"{i:02d}")
            image.save(stem + ".png")
            if i < count - 1:
                with open(stem + ".txt", "w", encoding="utf-8") as f:
                    f.write(f"a photo of {token}, {colour_name} {shape}\n")
    return train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sd_scripts.tools.tiny_model",
                                     description="Write a tiny random-weight SD model (and a demo dataset).")
    parser.add_argument("--family", choices=("sd1", "sd2", "sd2-v", "sdxl"), default="sd1")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--layout", choices=("single", "diffusers", "both"), default="both")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dataset", help="also write the demo dataset into this folder")
    args = parser.parse_args(argv)
    family, v = ("sd2", True) if args.family == "sd2-v" else (args.family, False)
    paths = build_tiny_model(args.out, family, v, args.layout, args.seed)
    for label, path in (("single file", paths.single_file), ("diffusers folder", paths.diffusers_dir)):
        if path:
            print(f"{label}: {path}")
    if args.dataset:
        print(f"dataset: {make_demo_dataset(args.dataset, args.seed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
