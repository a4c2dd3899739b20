"""Architecture of a checkpoint: family detection and diffusers/transformers configs from tensor shapes.

A single file has no config. Its family comes from its keys, and each component's config is the bundled config of
that family with the sizes read off the tensor shapes (so real checkpoints get exactly the bundled configs and the
tiny test models get theirs). The few facts shapes cannot tell (attention heads, VAE norm groups, sample sizes) follow
the family's rule unless the file's metadata carries them under ARCH_METADATA_KEY, which our own saves write.
"""
from __future__ import annotations

import copy
import json
import os
import re
from typing import Mapping

from ..errors import ModelLoadError
from .detect import CLIP_PREFIX, OPENCLIP_PREFIX, UNET_PREFIX, VAE_PREFIX

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
ARCH_METADATA_KEY = "sd_scripts.architecture"
SUPPORTED_FAMILIES = ("sd1", "sd2")
Shapes = Mapping[str, tuple]


def variant_name(family: str, v_pred: bool) -> str:
    """Bundled config set: 'sd1', 'sd2' (2.1-base, 512, epsilon) or 'sd2-v' (2.1, 768, v-prediction)."""
    if family not in SUPPORTED_FAMILIES:
        raise ModelLoadError(f"model family {family!r} is not supported yet; use an SD 1.x or SD 2.x model")
    return "sd2-v" if family == "sd2" and v_pred else family


def bundled_config(family: str, v_pred: bool, component: str) -> dict:
    """A copy of the bundled JSON config: component is 'unet', 'vae', 'text_encoder' or 'scheduler'."""
    with open(os.path.join(CONFIG_DIR, variant_name(family, v_pred), component + ".json"), encoding="utf-8") as f:
        return json.load(f)


def arch_overrides(metadata: Mapping[str, str]) -> dict:
    """{'unet': {...}, 'vae': {...}, 'text_encoder': {...}} from our metadata key, or {}."""
    raw = metadata.get(ARCH_METADATA_KEY)
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def arch_metadata(unet_config: Mapping, vae_config: Mapping, text_config: Mapping) -> str:
    """The non-inferable facts of the three configs, for ARCH_METADATA_KEY."""
    return json.dumps({
        "unet": {k: unet_config[k] for k in ("attention_head_dim", "sample_size") if k in unet_config},
        "vae": {k: vae_config[k] for k in ("norm_num_groups", "sample_size") if k in vae_config},
        # layers: an SD2 file saved from a diffusers folder has no extra last OpenCLIP layer
        "text_encoder": {k: text_config[k] for k in ("num_attention_heads", "num_hidden_layers")},
    }, sort_keys=True)


def _indices(shapes: Shapes, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in shapes if (m := rx.match(k))})


def infer_unet_config(shapes: Shapes, family: str, v_pred: bool, overrides: Mapping | None = None) -> dict:
    """UNet2DConditionModel config of the LDM U-Net in `shapes`."""
    p = UNET_PREFIX
    cfg = bundled_config(family, v_pred, "unet")
    inputs = _indices(shapes, re.escape(p) + r"input_blocks\.(\d+)\.")
    ops = _indices(shapes, re.escape(p) + r"input_blocks\.(\d+)\.0\.op\.weight")
    per_down = ops[0] if ops else len(inputs)
    n_blocks = len(inputs) // per_down
    out_ch = [shapes[f"{p}input_blocks.{1 + b * per_down}.0.out_layers.3.weight"][0] for b in range(n_blocks)]
    down_attn = [f"{p}input_blocks.{1 + b * per_down}.1.proj_in.weight" in shapes for b in range(n_blocks)]
    up_attn = [f"{p}output_blocks.{b * per_down}.1.proj_in.weight" in shapes for b in range(n_blocks)]
    proj_in = next(k for k in shapes if k.startswith(p) and k.endswith("proj_in.weight"))
    to_k = next(k for k in shapes if k.startswith(p) and k.endswith("attn2.to_k.weight"))
    cfg.update(
        in_channels=shapes[p + "input_blocks.0.0.weight"][1],
        out_channels=shapes[p + "out.2.weight"][0],
        block_out_channels=out_ch,
        layers_per_block=per_down - 1,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in down_attn],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attn],
        cross_attention_dim=shapes[to_k][1],
        use_linear_projection=len(shapes[proj_in]) == 2,
    )
    # heads: SD1 uses 8 per block, SD2 64 channels per head ('attention_head_dim' is a head count in diffusers)
    cfg["attention_head_dim"] = 8 if family == "sd1" else [max(1, c // 64) for c in out_ch]
    cfg.update(overrides or {})
    return cfg


def infer_vae_config(shapes: Shapes, family: str, v_pred: bool, prefix: str = VAE_PREFIX,
                     overrides: Mapping | None = None) -> dict:
    """AutoencoderKL config of the LDM VAE in `shapes` (keys under `prefix`)."""
    p = prefix
    cfg = bundled_config(family, v_pred, "vae")
    levels = _indices(shapes, re.escape(p) + r"encoder\.down\.(\d+)\.")
    layers = _indices(shapes, re.escape(p) + r"encoder\.down\.0\.block\.(\d+)\.")
    cfg.update(
        in_channels=shapes[p + "encoder.conv_in.weight"][1],
        out_channels=shapes[p + "decoder.conv_out.weight"][0],
        block_out_channels=[shapes[f"{p}encoder.down.{i}.block.0.conv1.weight"][0] for i in levels],
        layers_per_block=len(layers),
        latent_channels=shapes[p + "post_quant_conv.weight"][0],
        down_block_types=["DownEncoderBlock2D"] * len(levels),
        up_block_types=["UpDecoderBlock2D"] * len(levels),
    )
    cfg.update(overrides or {})
    return cfg


def infer_text_config(shapes: Shapes, family: str, v_pred: bool, clip_prefix: str = CLIP_PREFIX + "text_model.",
                      overrides: Mapping | None = None) -> dict:
    """CLIPTextConfig kwargs of the text encoder in `shapes` (SD1: transformers layout, SD2: OpenCLIP)."""
    cfg = bundled_config(family, v_pred, "text_encoder")
    if family == "sd2":
        p = OPENCLIP_PREFIX
        vocab, hidden = shapes[p + "token_embedding.weight"]
        layers = _indices(shapes, re.escape(p) + r"transformer\.resblocks\.(\d+)\.")
        cfg.update(
            vocab_size=vocab, hidden_size=hidden, max_position_embeddings=shapes[p + "positional_embedding"][0],
            num_hidden_layers=len(layers) - 1,  # diffusers' SD2 text encoder stops before the last OpenCLIP layer
            intermediate_size=shapes[p + "transformer.resblocks.0.mlp.c_fc.weight"][0],
        )
        if p + "text_projection" in shapes:
            cfg["projection_dim"] = shapes[p + "text_projection"][1]
    else:
        p = clip_prefix
        vocab, hidden = shapes[p + "embeddings.token_embedding.weight"]
        layers = _indices(shapes, re.escape(p) + r"encoder\.layers\.(\d+)\.")
        cfg.update(
            vocab_size=vocab, hidden_size=hidden,
            max_position_embeddings=shapes[p + "embeddings.position_embedding.weight"][0],
            num_hidden_layers=len(layers),
            intermediate_size=shapes[p + "encoder.layers.0.mlp.fc1.weight"][0],
        )
    cfg["num_attention_heads"] = max(1, cfg["hidden_size"] // 64)  # CLIP-L and OpenCLIP-H: 64 channels per head
    cfg.update(overrides or {})
    return cfg


def scheduler_training_config(scheduler_config: Mapping, v_pred: bool) -> dict:
    """The DDPM training schedule (kwargs of DDPMScheduler) from a pipeline scheduler config."""
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "clip_sample",
            "steps_offset", "timestep_spacing", "rescale_betas_zero_snr")
    out = {k: copy.deepcopy(scheduler_config[k]) for k in keys if k in scheduler_config}
    out["prediction_type"] = "v_prediction" if v_pred else "epsilon"
    return out
