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

from ...errors import ModelLoadError
from .detect import CLIP_PREFIX, OPENCLIP_PREFIX, SDXL_TE2_PREFIX, UNET_PREFIX, VAE_PREFIX

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
ARCH_METADATA_KEY = "sd_scripts.architecture"
SUPPORTED_FAMILIES = ("sd1", "sd2", "sdxl")
Shapes = Mapping[str, tuple]


def pad_mode_for(family: str) -> str:
    """CLIP tokenizer padding: 'eos' for SD1 (and SDXL tokenizer 1), 'zero' (id 0, '!') for SD2."""
    return "zero" if family == "sd2" else "eos"


def variant_name(family: str, v_pred: bool) -> str:
    """Bundled config set: 'sd1', 'sd2' (2.1-base, 512, epsilon), 'sd2-v' (2.1, 768, v-prediction) or 'sdxl'
    (base 1.0; a v-prediction SDXL differs only in its prediction type)."""
    if family not in SUPPORTED_FAMILIES:
        raise ModelLoadError(f"model family {family!r} is not supported yet; use an SD 1.x, SD 2.x or SDXL model")
    return "sd2-v" if family == "sd2" and v_pred else family


def bundled_config(family: str, v_pred: bool, component: str) -> dict:
    """A copy of the bundled JSON config: component is 'unet', 'vae', 'text_encoder', 'text_encoder_2' (SDXL) or
    'scheduler'."""
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


def arch_metadata(unet_config: Mapping, vae_config: Mapping, text_config: Mapping,
                  text_config_2: Mapping | None = None) -> str:
    """The non-inferable facts of the configs (three, or four with SDXL's second text encoder), for
    ARCH_METADATA_KEY."""
    unet_keys = ("attention_head_dim", "sample_size")
    if unet_config.get("addition_time_embed_dim") is not None:  # SDXL: size of each time-id embedding
        unet_keys += ("addition_time_embed_dim",)
    facts = {
        "unet": {k: unet_config[k] for k in unet_keys if k in unet_config},
        "vae": {k: vae_config[k] for k in ("norm_num_groups", "sample_size") if k in vae_config},
        # layers: an SD2 file saved from a diffusers folder has no extra last OpenCLIP layer
        "text_encoder": {k: text_config[k] for k in ("num_attention_heads", "num_hidden_layers")},
    }
    if text_config_2 is not None:
        facts["text_encoder_2"] = {k: text_config_2[k] for k in ("num_attention_heads", "num_hidden_layers")}
    return json.dumps(facts, sort_keys=True)


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
    # heads: SD1 uses 8 per block, SD2/SDXL 64 channels per head ('attention_head_dim' is a head count in diffusers)
    cfg["attention_head_dim"] = 8 if family == "sd1" else [max(1, c // 64) for c in out_ch]
    if family == "sdxl":
        cfg.update(_sdxl_unet_facts(shapes, per_down, n_blocks))
    cfg.update(overrides or {})
    return cfg


def _sdxl_unet_facts(shapes: Shapes, per_down: int, n_blocks: int) -> dict:
    """Transformer depth per level and the size-conditioning ('label_emb') dimensions of an SDXL U-Net."""
    p = UNET_PREFIX
    depth = []
    for b in range(n_blocks):
        blocks = _indices(shapes, re.escape(f"{p}input_blocks.{1 + b * per_down}.1.transformer_blocks.") + r"(\d+)\.")
        depth.append(len(blocks) or 1)
    mid = _indices(shapes, re.escape(p + "middle_block.1.transformer_blocks.") + r"(\d+)\.")
    if mid and len(mid) != depth[-1]:
        raise ValueError(f"middle block has {len(mid)} transformer layers, the last level {depth[-1]}")
    facts: dict = {"transformer_layers_per_block": depth}
    label = p + "label_emb.0.0.weight"
    if label in shapes:
        in_dim = shapes[label][1]
        facts["projection_class_embeddings_input_dim"] = in_dim
        # in_dim = 6 time ids x addition_time_embed_dim + the pooled bigG projection
        proj = shapes.get(SDXL_TE2_PREFIX + "text_projection")
        if proj is not None and (in_dim - proj[1]) % 6 == 0 and in_dim > proj[1]:
            facts["addition_time_embed_dim"] = (in_dim - proj[1]) // 6
    return facts


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
    """CLIPTextConfig kwargs of the (first) text encoder in `shapes` (SD1 and SDXL's CLIP-L: transformers layout
    under `clip_prefix`, SD2: OpenCLIP)."""
    cfg = bundled_config(family, v_pred, "text_encoder")
    if family == "sd2":  # diffusers' SD2 text encoder stops before the last OpenCLIP layer
        return infer_openclip_text_config(shapes, OPENCLIP_PREFIX, cfg, drop_last_layer=True, overrides=overrides)
    p = clip_prefix
    vocab, hidden = shapes[p + "embeddings.token_embedding.weight"]
    layers = _indices(shapes, re.escape(p) + r"encoder\.layers\.(\d+)\.")
    cfg.update(
        vocab_size=vocab, hidden_size=hidden,
        max_position_embeddings=shapes[p + "embeddings.position_embedding.weight"][0],
        num_hidden_layers=len(layers),
        intermediate_size=shapes[p + "encoder.layers.0.mlp.fc1.weight"][0],
    )
    cfg["num_attention_heads"] = max(1, cfg["hidden_size"] // 64)  # CLIP-L: 64 channels per head
    cfg.update(overrides or {})
    return cfg


def infer_openclip_text_config(shapes: Shapes, prefix: str, base: Mapping, *, drop_last_layer: bool,
                               overrides: Mapping | None = None) -> dict:
    """CLIPTextConfig kwargs of an OpenCLIP text tower under `prefix` (SD2's ViT-H, SDXL's bigG), on `base`.
    drop_last_layer: SD2's diffusers encoder stops before the last OpenCLIP layer; SDXL's bigG keeps all."""
    cfg = dict(base)
    vocab, hidden = shapes[prefix + "token_embedding.weight"]
    layers = _indices(shapes, re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.")
    cfg.update(
        vocab_size=vocab, hidden_size=hidden, max_position_embeddings=shapes[prefix + "positional_embedding"][0],
        num_hidden_layers=len(layers) - (1 if drop_last_layer else 0),
        intermediate_size=shapes[prefix + "transformer.resblocks.0.mlp.c_fc.weight"][0],
    )
    if prefix + "text_projection" in shapes:
        cfg["projection_dim"] = shapes[prefix + "text_projection"][1]
    cfg["num_attention_heads"] = max(1, hidden // 64)  # OpenCLIP ViT-H and bigG: 64 channels per head
    cfg.update(overrides or {})
    return cfg


def scheduler_training_config(scheduler_config: Mapping, v_pred: bool) -> dict:
    """The DDPM training schedule (kwargs of DDPMScheduler) from a pipeline scheduler config."""
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "clip_sample",
            "steps_offset", "timestep_spacing", "rescale_betas_zero_snr")
    out = {k: copy.deepcopy(scheduler_config[k]) for k in keys if k in scheduler_config}
    out["prediction_type"] = "v_prediction" if v_pred else "epsilon"
    return out
