"""Torch-free facts of the FLUX.1 / Chroma file layouts: what a file is, the architecture its shapes describe, and
the one key table between the Black Forest Labs (BFL) single-file layout and the diffusers module layout.

Everything here works on a mapping of tensor names to shapes (a safetensors header gives it without reading weights),
so the GUI and pre-flight checks can tell a FLUX.1-dev, FLUX.1-schnell or Chroma checkpoint, a CLIP-L, T5-XXL or
autoencoder file apart without importing torch, and the loaders in `weights.py` build their modules from it.

BFL layout (what `flux1-dev.safetensors` / `flux1-schnell.safetensors` hold, optionally under ComfyUI's
`model.diffusion_model.` prefix): `img_in`, `txt_in`, `time_in`, `vector_in`, `guidance_in` (dev only),
`double_blocks.N.{img,txt}_{mod,attn,mlp}`, `single_blocks.N.{linear1,linear2,modulation,norm}`, `final_layer`.
Chroma drops `time_in`, `vector_in`, `guidance_in` and every modulation Linear, and adds
`distilled_guidance_layer.*` (an MLP that produces all modulations).
The fused tensors: a double block's `qkv` is q, k, v stacked on dim 0; a single block's `linear1` is q, k, v and the
MLP input stacked; the final layer's adaLN Linear stores (shift, scale) where diffusers stores (scale, shift).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

Shapes = Mapping[str, tuple]

COMFY_PREFIX = "model.diffusion_model."
MODEL_TYPES = ("flux_dev", "flux_schnell", "chroma")

# ---------------------------------------------------------------- facts of the released models

REAL_HEAD_DIM = 128
REAL_AXES_DIMS_ROPE = (16, 56, 56)
TIMESTEP_CHANNELS = 256  # sinusoidal embedding width fed to time_in / guidance_in
FLUX_DEV_CONFIG = dict(patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38,
                       attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                       pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=[16, 56, 56])
FLUX_SCHNELL_CONFIG = dict(FLUX_DEV_CONFIG, guidance_embeds=False)
CHROMA_CONFIG = dict(patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38,
                     attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                     axes_dims_rope=[16, 56, 56], approximator_num_channels=64, approximator_hidden_dim=5120,
                     approximator_layers=5)

AE_SCALING_FACTOR = 0.3611
AE_SHIFT_FACTOR = 0.1159
AE_LATENT_CHANNELS = 16
# diffusers AutoencoderKL config of the FLUX.1 autoencoder (the BFL ae.safetensors has no quant convs)
AE_CONFIG = dict(_class_name="AutoencoderKL", act_fn="silu", block_out_channels=[128, 256, 512, 512],
                 down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                 force_upcast=True, in_channels=3, out_channels=3, latent_channels=16, latents_mean=None,
                 latents_std=None, layers_per_block=2, mid_block_add_attention=True, norm_num_groups=32,
                 sample_size=1024, scaling_factor=AE_SCALING_FACTOR, shift_factor=AE_SHIFT_FACTOR,
                 use_post_quant_conv=False, use_quant_conv=False)

# FlowMatchEulerDiscreteScheduler configs of the released pipelines (schnell: no resolution-dependent shift)
SCHEDULER_DEV = dict(_class_name="FlowMatchEulerDiscreteScheduler", base_image_seq_len=256, base_shift=0.5,
                     max_image_seq_len=4096, max_shift=1.15, num_train_timesteps=1000, shift=3.0,
                     use_dynamic_shifting=True)
SCHEDULER_SCHNELL = dict(_class_name="FlowMatchEulerDiscreteScheduler", base_image_seq_len=256, base_shift=0.5,
                         max_image_seq_len=4096, max_shift=1.15, num_train_timesteps=1000, shift=1.0,
                         use_dynamic_shifting=False)


def scheduler_config(model_type: str) -> dict:
    """The pipeline scheduler config of a model type (a copy)."""
    return dict(SCHEDULER_SCHNELL if model_type == "flux_schnell" else SCHEDULER_DEV)


# ---------------------------------------------------------------- recognising files


def strip_prefix(shapes: Shapes) -> dict[str, tuple]:
    """The denoiser tensors without ComfyUI's 'model.diffusion_model.' prefix. A file that has prefixed keys keeps only
    those (ComfyUI all-in-one files also carry text encoders and the autoencoder under other prefixes)."""
    if any(k.startswith(COMFY_PREFIX) for k in shapes):
        return {k[len(COMFY_PREFIX):]: tuple(v) for k, v in shapes.items() if k.startswith(COMFY_PREFIX)}
    return {k: tuple(v) for k, v in shapes.items()}


def classify_denoiser(shapes: Shapes) -> str | None:
    """'flux_dev' (has guidance_in), 'flux_schnell' (no guidance_in), 'chroma' (distilled_guidance_layer, no
    vector_in) or None when the keys are not a FLUX-family denoiser in the BFL layout (bare or ComfyUI-prefixed)."""
    keys = strip_prefix(shapes)
    if "img_in.weight" not in keys or not any(k.startswith("double_blocks.") for k in keys):
        return None
    if any(k.startswith("distilled_guidance_layer.") for k in keys):
        return "chroma"
    if "vector_in.in_layer.weight" not in keys:
        return "chroma" if "double_blocks.0.img_mod.lin.weight" not in keys else None
    return "flux_dev" if "guidance_in.in_layer.weight" in keys else "flux_schnell"


def _clip_prefix(shapes: Shapes) -> str | None:
    for prefix in ("text_model.", ""):
        if prefix + "embeddings.token_embedding.weight" in shapes and \
                prefix + "encoder.layers.0.self_attn.q_proj.weight" in shapes:
            return prefix
    return None


def file_kind(shapes: Shapes) -> str | None:
    """What a single file holds, from its keys: 'flux' (FLUX.1 dev/schnell denoiser), 'chroma', 'clip_l', 'clip_g'
    (a CLIP text model 1280 wide, SD3's second encoder), 't5xxl', 'ae' (16-channel autoencoder), 'sd_vae' (an SD
    4-channel VAE), 'flux_diffusers' (a FLUX transformer in the diffusers layout), 'sd3', 'sd' (an SD 1.x/2.x/XL
    checkpoint) or None."""
    denoiser = classify_denoiser(shapes)
    if denoiser is not None:
        return "chroma" if denoiser == "chroma" else "flux"
    keys = shapes
    if "transformer_blocks.0.attn.add_k_proj.weight" in keys and "x_embedder.weight" in keys:
        return "flux_diffusers"
    if any(".joint_blocks." in k or k.startswith("joint_blocks.") for k in keys):
        return "sd3"
    if any(k.startswith(COMFY_PREFIX + "input_blocks.") for k in keys):
        return "sd"
    prefix = _clip_prefix(keys)
    if prefix is not None:
        width = keys[prefix + "embeddings.token_embedding.weight"][1]
        return "clip_g" if width == 1280 else "clip_l"
    if any(re.match(r"(encoder\.)?block\.0\.layer\.0\.SelfAttention\.q\.weight$", k) for k in keys):
        return "t5xxl"
    vae_prefix = next((p for p in ("", "first_stage_model.", "vae.") if p + "encoder.conv_in.weight" in keys and
                       p + "decoder.conv_in.weight" in keys), None)
    if vae_prefix is not None:
        latent = keys[vae_prefix + "decoder.conv_in.weight"][1]
        return "ae" if latent == AE_LATENT_CHANNELS else "sd_vae"
    return None


KIND_LABELS = {"flux": "a FLUX.1 denoiser", "chroma": "a Chroma denoiser", "clip_l": "a CLIP-L text encoder",
               "clip_g": "a CLIP-G text encoder", "t5xxl": "a T5-XXL text encoder", "ae": "a FLUX autoencoder",
               "sd_vae": "a Stable Diffusion VAE (4 latent channels)",
               "flux_diffusers": "a FLUX transformer in the diffusers layout", "sd3": "an SD3 model",
               "sd": "a Stable Diffusion 1.x/2.x/XL checkpoint"}


def describe_kind(kind: str | None) -> str:
    """'a CLIP-L text encoder' etc.; 'not a model file this trainer knows' for None."""
    return KIND_LABELS.get(kind or "", "not a model file this trainer knows")


# ---------------------------------------------------------------- architecture from shapes


def _indices(keys, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})


def rope_axes(head_dim: int) -> list[int]:
    """RoPE axis widths summing to `head_dim`: FLUX's (16, 56, 56) for 128, scaled for other head widths, each even
    (a rotary axis pairs channels); any rounding remainder goes to the first (index) axis."""
    if head_dim % 2:
        raise ValueError(f"attention head width {head_dim} is odd; rotary embeddings need an even width")
    axes = [max(2, (a * head_dim // REAL_HEAD_DIM) // 2 * 2) for a in REAL_AXES_DIMS_ROPE]
    axes[0] += head_dim - sum(axes)
    if axes[0] < 2:
        raise ValueError(f"attention head width {head_dim} is too small for three rotary axes")
    return axes


def infer_transformer_config(shapes: Shapes) -> dict:
    """The diffusers FluxTransformer2DModel (or ChromaTransformer2DModel) config of the BFL denoiser in `shapes`,
    sizes read from the shapes (so real and tiny models both load). '_class_name' names the diffusers class.
    KeyError / ValueError when the keys are incomplete."""
    model_type = classify_denoiser(shapes)
    if model_type is None:
        raise ValueError("not a FLUX.1 / Chroma denoiser in the BFL layout")
    keys = strip_prefix(shapes)
    hidden, in_channels = keys["img_in.weight"]
    norm = keys.get("double_blocks.0.img_attn.norm.query_norm.scale")
    head_dim = norm[0] if norm else (REAL_HEAD_DIM if hidden % REAL_HEAD_DIM == 0 else hidden)
    if hidden % head_dim:
        raise ValueError(f"width {hidden} is not a multiple of the attention head width {head_dim}")
    out = keys["final_layer.linear.weight"][0]
    cfg = dict(patch_size=1, in_channels=in_channels, out_channels=None if out == in_channels else out,
               num_layers=len(_indices(keys, r"double_blocks\.(\d+)\.")),
               num_single_layers=len(_indices(keys, r"single_blocks\.(\d+)\.")),
               attention_head_dim=head_dim, num_attention_heads=hidden // head_dim,
               joint_attention_dim=keys["txt_in.weight"][1], axes_dims_rope=rope_axes(head_dim))
    if model_type == "chroma":
        approx_hidden, approx_in = keys["distilled_guidance_layer.in_proj.weight"]
        cfg.update(_class_name="ChromaTransformer2DModel", approximator_num_channels=approx_in,
                   approximator_hidden_dim=approx_hidden,
                   approximator_layers=len(_indices(keys, r"distilled_guidance_layer\.layers\.(\d+)\.")))
    else:
        cfg.update(_class_name="FluxTransformer2DModel", pooled_projection_dim=keys["vector_in.in_layer.weight"][1],
                   guidance_embeds=model_type == "flux_dev")
    return cfg


def infer_ae_config(shapes: Shapes, prefix: str = "") -> dict:
    """diffusers AutoencoderKL config of a BFL / LDM-layout autoencoder under `prefix` (FLUX's ae.safetensors: no
    prefix, no quant convs); sizes from the shapes, the rest (scale 0.3611, shift 0.1159) from the FLUX.1 AE."""
    p = prefix
    levels = _indices(shapes, re.escape(p) + r"encoder\.down\.(\d+)\.")
    layers = _indices(shapes, re.escape(p) + r"encoder\.down\.0\.block\.(\d+)\.")
    channels = [shapes[f"{p}encoder.down.{i}.block.0.conv1.weight"][0] for i in levels]
    cfg = dict(AE_CONFIG)
    cfg.update(in_channels=shapes[p + "encoder.conv_in.weight"][1],
               out_channels=shapes[p + "decoder.conv_out.weight"][0], block_out_channels=channels, layers_per_block=len(layers),
               latent_channels=shapes[p + "decoder.conv_in.weight"][1],
               down_block_types=["DownEncoderBlock2D"] * len(levels), up_block_types=["UpDecoderBlock2D"] * len(levels),
               use_quant_conv=p + "quant_conv.weight" in shapes,
               use_post_quant_conv=p + "post_quant_conv.weight" in shapes,
               mid_block_add_attention=p + "encoder.mid.attn_1.q.weight" in shapes)
    # GroupNorm groups: 32 as in every released autoencoder, fewer when a tiny model's widths do not allow it
    cfg["norm_num_groups"] = 32 if all(c % 32 == 0 for c in channels) else _common_groups(channels)
    return cfg


def _common_groups(channels: list[int]) -> int:
    for groups in (16, 8, 4, 2):
        if all(c % groups == 0 for c in channels):
            return groups
    return 1


# ---------------------------------------------------------------- the BFL <-> diffusers key table

COPY, SPLIT, SWAP_HALVES = "copy", "split", "swap_halves"


@dataclass(frozen=True)
class TensorRule:
    """One BFL tensor and the diffusers tensor(s) it is.

    kind 'copy': the same tensor; 'split': the BFL tensor is the diffusers tensors stacked on dim 0, with
    `sizes` rows each; 'swap_halves': the two halves of dim 0 in the other order (shift/scale vs scale/shift).
    """

    bfl: str
    diffusers: tuple[str, ...]
    kind: str = COPY
    sizes: tuple[int, ...] = ()


_MLP_EMBEDDERS = {"time_in": "time_text_embed.timestep_embedder", "vector_in": "time_text_embed.text_embedder",
                  "guidance_in": "time_text_embed.guidance_embedder"}
_DOUBLE_COPIES = {
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight", "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
    "img_attn.proj.weight": "attn.to_out.0.weight", "img_attn.proj.bias": "attn.to_out.0.bias",
    "txt_attn.proj.weight": "attn.to_add_out.weight", "txt_attn.proj.bias": "attn.to_add_out.bias",
    "img_mlp.0.weight": "ff.net.0.proj.weight", "img_mlp.0.bias": "ff.net.0.proj.bias",
    "img_mlp.2.weight": "ff.net.2.weight", "img_mlp.2.bias": "ff.net.2.bias",
    "txt_mlp.0.weight": "ff_context.net.0.proj.weight", "txt_mlp.0.bias": "ff_context.net.0.proj.bias",
    "txt_mlp.2.weight": "ff_context.net.2.weight", "txt_mlp.2.bias": "ff_context.net.2.bias",
}
_DOUBLE_MODULATION = {"img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear"}
_SINGLE_COPIES = {"norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight",
                  "linear2.weight": "proj_out.weight", "linear2.bias": "proj_out.bias"}
MLP_RATIO = 4  # FLUX blocks: MLP width = 4 x hidden width


def transformer_key_table(config: Mapping) -> list[TensorRule]:
    """Every tensor of the BFL denoiser described by a diffusers transformer `config` (as from
    infer_transformer_config), in BFL names without prefix, with the diffusers tensors it is. The same table
    converts in both directions."""
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    mlp = hidden * MLP_RATIO
    chroma = config.get("_class_name") == "ChromaTransformer2DModel" or "approximator_layers" in config
    rules: list[TensorRule] = []
    for param in ("weight", "bias"):
        rules += [TensorRule(f"img_in.{param}", (f"x_embedder.{param}",)),
                  TensorRule(f"txt_in.{param}", (f"context_embedder.{param}",)),
                  TensorRule(f"final_layer.linear.{param}", (f"proj_out.{param}",))]
    if chroma:
        g = "distilled_guidance_layer"
        for param in ("weight", "bias"):
            rules += [TensorRule(f"{g}.in_proj.{param}", (f"{g}.in_proj.{param}",)),
                      TensorRule(f"{g}.out_proj.{param}", (f"{g}.out_proj.{param}",))]
        for i in range(config["approximator_layers"]):
            rules.append(TensorRule(f"{g}.norms.{i}.scale", (f"{g}.norms.{i}.weight",)))
            for param in ("weight", "bias"):
                rules += [TensorRule(f"{g}.layers.{i}.in_layer.{param}", (f"{g}.layers.{i}.linear_1.{param}",)),
                          TensorRule(f"{g}.layers.{i}.out_layer.{param}", (f"{g}.layers.{i}.linear_2.{param}",))]
    else:
        embedders = ["time_in", "vector_in"] + (["guidance_in"] if config.get("guidance_embeds") else [])
        for bfl in embedders:
            for param in ("weight", "bias"):
                rules += [TensorRule(f"{bfl}.in_layer.{param}", (f"{_MLP_EMBEDDERS[bfl]}.linear_1.{param}",)),
                          TensorRule(f"{bfl}.out_layer.{param}", (f"{_MLP_EMBEDDERS[bfl]}.linear_2.{param}",))]
        for param in ("weight", "bias"):
            rules.append(TensorRule(f"final_layer.adaLN_modulation.1.{param}", (f"norm_out.linear.{param}",),
                                    SWAP_HALVES))
    for i in range(config["num_layers"]):
        b, d = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        rules += [TensorRule(b + k, (d + v,)) for k, v in _DOUBLE_COPIES.items()]
        for param in ("weight", "bias"):
            rules.append(TensorRule(f"{b}img_attn.qkv.{param}",
                                    tuple(f"{d}attn.to_{x}.{param}" for x in "qkv"), SPLIT, (hidden,) * 3))
            rules.append(TensorRule(f"{b}txt_attn.qkv.{param}",
                                    tuple(f"{d}attn.add_{x}_proj.{param}" for x in "qkv"), SPLIT, (hidden,) * 3))
            if not chroma:
                rules += [TensorRule(f"{b}{k}.{param}", (f"{d}{v}.{param}",)) for k, v in _DOUBLE_MODULATION.items()]
    for i in range(config["num_single_layers"]):
        b, d = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        rules += [TensorRule(b + k, (d + v,)) for k, v in _SINGLE_COPIES.items()]
        for param in ("weight", "bias"):
            rules.append(TensorRule(f"{b}linear1.{param}", tuple(f"{d}attn.to_{x}.{param}" for x in "qkv")
                                    + (f"{d}proj_mlp.{param}",), SPLIT, (hidden,) * 3 + (mlp,)))
            if not chroma:
                rules.append(TensorRule(f"{b}modulation.lin.{param}", (f"{d}norm.linear.{param}",)))
    return rules
