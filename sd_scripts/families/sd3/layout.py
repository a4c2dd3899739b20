"""SD3 / SD3.5 file layouts, torch-free: which variant a single file is, the diffusers configs read off its tensor
shapes, and the one SAI <-> diffusers name table of the MMDiT.

Works on {name: shape} mappings (a safetensors header gives them without reading weights), so the GUI and pre-flight
can call it. Facts (Stability AI's single files as sd-scripts 48d368f `library/sd3_utils.py` and diffusers
`loaders/single_file_utils.py` read them):
- The MMDiT lives under `model.diffusion_model.`: `x_embedder.proj` (patch conv), `pos_embed` [1, max^2, width],
  `t_embedder.mlp.{0,2}`, `y_embedder.mlp.{0,2}` (pooled CLIP-L + CLIP-G), `context_embedder` (T5 width -> width),
  `joint_blocks.N.{x_block,context_block}.{attn.qkv, attn.proj, attn.ln_q/ln_k, adaLN_modulation.1, mlp.fc1/fc2}`,
  `final_layer.{linear, adaLN_modulation.1}`. The last joint block's context block is "pre-only": no attn.proj, no
  mlp, and its adaLN gives (shift, scale) only.
- SD3 medium: no q/k norm. SD3.5 large: RMS q/k norms (`attn.ln_q.weight`). SD3.5 medium (MMDiT-X): q/k norms and a
  second self-attention `x_block.attn2` in the first blocks. Head dimension 64 throughout.
- Bundled text encoders (the "incl_clips" files): `text_encoders.clip_l.transformer.text_model.*`,
  `text_encoders.clip_g.transformer.{text_model.*, text_projection.weight}` and `text_encoders.t5xxl.transformer.*`,
  all in the transformers layouts; the autoencoder under `first_stage_model.` in the LDM layout (16 latent channels,
  no quant convs, latents scaled (z - 0.0609) * 1.5305).
- Where diffusers' modules differ: q/k/v are one fused `qkv` tensor in SAI files, and the pre-only context adaLN and
  the final adaLN store (shift, scale) where diffusers' AdaLayerNormContinuous stores (scale, shift).
"""
from __future__ import annotations

import math
import re
from typing import Mapping

Shapes = Mapping[str, tuple]

SAI_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_L_PREFIX = "text_encoders.clip_l.transformer."
CLIP_G_PREFIX = "text_encoders.clip_g.transformer."
T5_PREFIX = "text_encoders.t5xxl.transformer."
HEAD_DIM = 64
VARIANTS = ("sd3_medium", "sd35_medium", "sd35_large")
# modelspec.architecture as sd-scripts writes it ("stable-diffusion-3-" + its model type "medium" / "5-medium" /
# "5-large", library/sai_model_spec.py)
MODELSPEC_ARCHITECTURE = {"sd3_medium": "stable-diffusion-3-medium", "sd35_medium": "stable-diffusion-3-5-medium",
                          "sd35_large": "stable-diffusion-3-5-large"}
VAE_SCALING_FACTOR = 1.5305
VAE_SHIFT_FACTOR = 0.0609

# sd-scripts' --training_shift default is 1.0; the sampling scheduler of every SD3 variant uses shift 3.0
SCHEDULER_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}

# the real autoencoder (diffusers' stabilityai/stable-diffusion-3-medium vae/config.json facts)
VAE_CONFIG = {
    "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 16,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "act_fn": "silu", "norm_num_groups": 32,
    "sample_size": 1024, "scaling_factor": VAE_SCALING_FACTOR, "shift_factor": VAE_SHIFT_FACTOR,
    "force_upcast": True, "use_quant_conv": False, "use_post_quant_conv": False, "mid_block_add_attention": True,
}

# the real transformer defaults shapes cannot tell (sample_size: 1024 px / 8)
TRANSFORMER_DEFAULTS = {"_class_name": "SD3Transformer2DModel", "sample_size": 128, "attention_head_dim": HEAD_DIM}

# names of the other families' checkpoints, to say what a wrong file is
_OTHER_FAMILIES = (("double_blocks.0.img_attn.qkv.weight", "a FLUX.1 model (use flux_train_network / flux_train)"),
                   ("model.diffusion_model.double_blocks.0.img_attn.qkv.weight",
                    "a FLUX.1 model (use flux_train_network / flux_train)"),
                   ("model.diffusion_model.input_blocks.0.0.weight",
                    "an SD 1.x/2.x/XL model (use train_network / sdxl_train_network)"),
                   ("transformer_blocks.0.attn.to_q.weight", "a diffusers-layout transformer (pass the pipeline "
                                                             "folder, not one weights file)"))


def _indices(shapes: Shapes, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in shapes if (m := rx.match(k))})


def mmdit_prefix(shapes: Shapes) -> str | None:
    """'model.diffusion_model.' for SAI single files, '' for a bare MMDiT state dict, None when there is none."""
    for prefix in (SAI_PREFIX, ""):
        if prefix + "x_embedder.proj.weight" in shapes and prefix + "joint_blocks.0.x_block.attn.qkv.weight" in shapes:
            return prefix
    return None


def classify(shapes: Shapes) -> str | None:
    """'sd3_medium', 'sd35_medium' (MMDiT-X: `x_block.attn2`) or 'sd35_large' (q/k norms, no attn2) for an SAI
    single file (prefix `model.diffusion_model.`, or none), with or without bundled text encoders and VAE, at any
    size; None when the shapes hold no SD3 MMDiT. Same rule as sd-scripts' `analyze_state_dict_state`."""
    prefix = mmdit_prefix(shapes)
    if prefix is None:
        return None
    if _indices(shapes, re.escape(prefix) + r"joint_blocks\.(\d+)\.x_block\.attn2\."):
        return "sd35_medium"
    if any(k.startswith(prefix + "joint_blocks.") and ".attn.ln_q." in k for k in shapes):
        return "sd35_large"
    return "sd3_medium"


def what_else(shapes: Shapes) -> str | None:
    """A short description of another family's checkpoint ('a FLUX.1 model (use ...)'), or None."""
    return next((label for key, label in _OTHER_FAMILIES if key in shapes), None)


def bundled_parts(shapes: Shapes) -> dict[str, bool]:
    """Which parts besides the MMDiT a single file carries: {'vae', 'clip_l', 'clip_g', 't5xxl'} -> bool."""
    return {"vae": VAE_PREFIX + "decoder.conv_in.weight" in shapes,
            "clip_l": CLIP_L_PREFIX + "text_model.embeddings.token_embedding.weight" in shapes,
            "clip_g": CLIP_G_PREFIX + "text_model.embeddings.token_embedding.weight" in shapes,
            "t5xxl": any(k.startswith(T5_PREFIX) for k in shapes)}


def infer_transformer_config(shapes: Shapes) -> dict:
    """SD3Transformer2DModel config of the MMDiT in `shapes` (with or without the SAI prefix): depth from the joint
    blocks, head dimension 64 and heads = width / 64, patch size and channels from the patch conv, pos_embed_max_size
    = sqrt of the positional table, joint/pooled/caption dimensions from the embedders, dual_attention_layers from
    `attn2`, qk_norm 'rms_norm' when `ln_q` weights exist. KeyError/ValueError when the shapes are not an MMDiT."""
    p = mmdit_prefix(shapes)
    if p is None:
        raise KeyError("x_embedder.proj.weight / joint_blocks.0.x_block.attn.qkv.weight")
    width, in_channels, patch, _ = shapes[p + "x_embedder.proj.weight"]
    if width % HEAD_DIM:
        raise ValueError(f"MMDiT width {width} is not a multiple of the head dimension {HEAD_DIM}")
    positions = shapes[p + "pos_embed"][1]
    side = round(math.sqrt(positions))
    if side * side != positions:
        raise ValueError(f"pos_embed has {positions} positions, not a square grid")
    blocks = _indices(shapes, re.escape(p) + r"joint_blocks\.(\d+)\.")
    if blocks != list(range(len(blocks))):
        raise ValueError(f"joint blocks are not numbered 0..{len(blocks) - 1}")
    caption_dim, joint_dim = shapes[p + "context_embedder.weight"]
    final_out = shapes[p + "final_layer.linear.weight"][0]
    dual = _indices(shapes, re.escape(p) + r"joint_blocks\.(\d+)\.x_block\.attn2\.")
    has_qk_norm = p + "joint_blocks.0.x_block.attn.ln_q.weight" in shapes
    return dict(TRANSFORMER_DEFAULTS, patch_size=patch, in_channels=in_channels, num_layers=len(blocks),
                num_attention_heads=width // HEAD_DIM, joint_attention_dim=joint_dim,
                caption_projection_dim=caption_dim, pooled_projection_dim=shapes[p + "y_embedder.mlp.0.weight"][1],
                out_channels=final_out // (patch * patch), pos_embed_max_size=side,
                dual_attention_layers=dual, qk_norm="rms_norm" if has_qk_norm else None)


def infer_vae_config(shapes: Shapes, prefix: str = VAE_PREFIX) -> dict:
    """AutoencoderKL config of an SD3 autoencoder in the LDM layout under `prefix` ('first_stage_model.' in a full
    file, '' in a VAE-only file): the real config with the sizes read off the shapes (norm groups stay 32)."""
    p = prefix
    levels = _indices(shapes, re.escape(p) + r"encoder\.down\.(\d+)\.")
    layers = _indices(shapes, re.escape(p) + r"encoder\.down\.0\.block\.(\d+)\.")
    return dict(VAE_CONFIG, in_channels=shapes[p + "encoder.conv_in.weight"][1],
                out_channels=shapes[p + "decoder.conv_out.weight"][0],
                latent_channels=shapes[p + "decoder.conv_in.weight"][1],
                block_out_channels=[shapes[f"{p}encoder.down.{i}.block.0.conv1.weight"][0] for i in levels],
                layers_per_block=len(layers), down_block_types=["DownEncoderBlock2D"] * len(levels),
                up_block_types=["UpDecoderBlock2D"] * len(levels),
                use_quant_conv=p + "quant_conv.weight" in shapes,
                use_post_quant_conv=p + "post_quant_conv.weight" in shapes)


def clip_prefix(shapes: Shapes) -> str | None:
    """The prefix before `text_model.` of a CLIP text model in `shapes` ('' for a separate clip_l/clip_g file,
    'text_encoders.clip_l.transformer.' etc. in a bundled file), None when there is no CLIP text model."""
    suffix = "text_model.embeddings.token_embedding.weight"
    found = sorted(k[: -len(suffix)] for k in shapes if k.endswith(suffix))
    return found[0] if len(found) == 1 else ("" if suffix in shapes else None)


def infer_clip_config(shapes: Shapes, prefix: str, base: Mapping) -> dict:
    """CLIPTextConfig kwargs of the CLIP text model under `prefix` on `base` (the real CLIP-L or CLIP-G config):
    width, depth, MLP size, vocabulary and positions from shapes, 64 channels per head, projection size from
    `text_projection.weight` when present (CLIP-L files usually have none: the projection is then the identity)."""
    p = prefix + "text_model."
    vocab, hidden = shapes[p + "embeddings.token_embedding.weight"]
    cfg = dict(base)
    cfg.update(vocab_size=vocab, hidden_size=hidden, num_attention_heads=max(1, hidden // HEAD_DIM),
               max_position_embeddings=shapes[p + "embeddings.position_embedding.weight"][0],
               num_hidden_layers=len(_indices(shapes, re.escape(p) + r"encoder\.layers\.(\d+)\.")),
               intermediate_size=shapes[p + "encoder.layers.0.mlp.fc1.weight"][0])
    proj = shapes.get(prefix + "text_projection.weight")
    cfg["projection_dim"] = proj[0] if proj is not None else hidden
    return cfg


def is_t5_encoder(shapes: Shapes, prefix: str = "") -> bool:
    """True for a T5 encoder state dict (transformers layout) under `prefix`."""
    return prefix + "encoder.block.0.layer.0.SelfAttention.q.weight" in shapes


# ---------------------------------------------------------------- the SAI <-> diffusers MMDiT name table

COPY, SPLIT, SWAP = "copy", "split", "swap"

_TOP = (("pos_embed", ("pos_embed.pos_embed",), COPY),
        ("x_embedder.proj.weight", ("pos_embed.proj.weight",), COPY),
        ("x_embedder.proj.bias", ("pos_embed.proj.bias",), COPY),
        ("context_embedder.weight", ("context_embedder.weight",), COPY),
        ("context_embedder.bias", ("context_embedder.bias",), COPY),
        ("final_layer.linear.weight", ("proj_out.weight",), COPY),
        ("final_layer.linear.bias", ("proj_out.bias",), COPY),
        ("final_layer.adaLN_modulation.1.weight", ("norm_out.linear.weight",), SWAP),
        ("final_layer.adaLN_modulation.1.bias", ("norm_out.linear.bias",), SWAP))
_EMBEDDERS = (("t_embedder", "time_text_embed.timestep_embedder"), ("y_embedder", "time_text_embed.text_embedder"))


def transformer_key_table(config: Mapping) -> list[tuple[str, tuple[str, ...], str]]:
    """[(SAI name without prefix, diffusers names, kind)] for an SD3Transformer2DModel config; kind 'copy' (same
    tensor), 'split' (the SAI tensor is the diffusers tensors concatenated along dim 0: q, k, v) or 'swap' (the two
    halves along dim 0 exchanged: (shift, scale) <-> (scale, shift)). Serves both directions."""
    table = list(_TOP)
    for sai, diff in _EMBEDDERS:
        for i, j in (("0", "1"), ("2", "2")):
            for param in ("weight", "bias"):
                table.append((f"{sai}.mlp.{i}.{param}", (f"{diff}.linear_{j}.{param}",), COPY))
    last = config["num_layers"] - 1
    dual = set(config.get("dual_attention_layers") or ())
    qk_norm = bool(config.get("qk_norm"))
    for n in range(config["num_layers"]):
        x, c, d = f"joint_blocks.{n}.x_block.", f"joint_blocks.{n}.context_block.", f"transformer_blocks.{n}."
        rows = []
        for param in ("weight", "bias"):
            rows += [(f"{x}attn.qkv.{param}", tuple(f"{d}attn.to_{q}.{param}" for q in "qkv"), SPLIT),
                     (f"{c}attn.qkv.{param}", tuple(f"{d}attn.add_{q}_proj.{param}" for q in "qkv"), SPLIT),
                     (f"{x}attn.proj.{param}", (f"{d}attn.to_out.0.{param}",), COPY),
                     (f"{x}adaLN_modulation.1.{param}", (f"{d}norm1.linear.{param}",), COPY),
                     (f"{c}adaLN_modulation.1.{param}", (f"{d}norm1_context.linear.{param}",),
                      SWAP if n == last else COPY),
                     (f"{x}mlp.fc1.{param}", (f"{d}ff.net.0.proj.{param}",), COPY),
                     (f"{x}mlp.fc2.{param}", (f"{d}ff.net.2.{param}",), COPY)]
            if n != last:  # the last context block is pre-only
                rows += [(f"{c}attn.proj.{param}", (f"{d}attn.to_add_out.{param}",), COPY),
                         (f"{c}mlp.fc1.{param}", (f"{d}ff_context.net.0.proj.{param}",), COPY),
                         (f"{c}mlp.fc2.{param}", (f"{d}ff_context.net.2.{param}",), COPY)]
            if n in dual:
                rows += [(f"{x}attn2.qkv.{param}", tuple(f"{d}attn2.to_{q}.{param}" for q in "qkv"), SPLIT),
                         (f"{x}attn2.proj.{param}", (f"{d}attn2.to_out.0.{param}",), COPY)]
        if qk_norm:
            rows += [(f"{x}attn.ln_q.weight", (f"{d}attn.norm_q.weight",), COPY),
                     (f"{x}attn.ln_k.weight", (f"{d}attn.norm_k.weight",), COPY),
                     (f"{c}attn.ln_q.weight", (f"{d}attn.norm_added_q.weight",), COPY),
                     (f"{c}attn.ln_k.weight", (f"{d}attn.norm_added_k.weight",), COPY)]
            if n in dual:
                rows += [(f"{x}attn2.ln_q.weight", (f"{d}attn2.norm_q.weight",), COPY),
                         (f"{x}attn2.ln_k.weight", (f"{d}attn2.norm_k.weight",), COPY)]
        table += rows
    return table
