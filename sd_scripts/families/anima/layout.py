"""Anima's file layouts (torch-free): the DiT single file's tensor names <-> the diffusers CosmosTransformer3DModel
(plus our LLM adapter) names, the architecture read off the shapes, the Qwen-Image / Wan VAE's two layouts
(ComfyUI / original Wan names and diffusers' AutoencoderKLQwenImage names), and what kind of file a header is.

The DiT file (`anima-preview.safetensors`, sd-scripts 48d368f `library/anima_utils.py`) holds NVIDIA's Cosmos-Predict2
"MiniTrainDIT" under `net.` (`net.blocks.N.self_attn.q_proj.weight`, `net.x_embedder.proj.1.weight`,
`net.t_embedder.1.linear_1.weight`, `net.final_layer.adaln_modulation.1.weight`, ...) plus the LLM adapter
(`net.llm_adapter.*`); sd-scripts also reads it without the prefix and writes it with `net.`. Some files carry the
RoPE buffers `net.pos_embedder.{seq,dim_spatial_range,dim_temporal_range}` (computed, never trained): they are
accepted and written back as read.
"""
from __future__ import annotations

import re
from typing import Mapping

DIT_PREFIX = "net."
ADAPTER = "llm_adapter."
ROPE_BUFFERS = ("pos_embedder.seq", "pos_embedder.dim_spatial_range", "pos_embedder.dim_temporal_range")

# Anima-Preview's fixed settings (sd-scripts' load_anima_model): 2048 wide, 16 heads, 28 blocks, 1024-wide
# cross-attention context, adaLN-LoRA 256, 2x2 patches, RoPE with 4x height/width NTK extrapolation, no fps
# modulation, the padding-mask channel concatenated to the 16 latent channels, latents up to 512 x 512.
REAL_CONFIG = dict(in_channels=16, out_channels=16, num_attention_heads=16, attention_head_dim=128, num_layers=28,
                   mlp_ratio=4.0, text_embed_dim=1024, adaln_lora_dim=256, max_size=(128, 512, 512),
                   patch_size=(1, 2, 2), rope_scale=(1.0, 4.0, 4.0), concat_padding_mask=True,
                   extra_pos_embed_type=None)
# the LLM adapter of Anima-Preview: Qwen3-0.6B states (1024) -> T5-vocabulary tokens (32,128 x 1024), 6 blocks
REAL_ADAPTER = dict(source_dim=1024, target_dim=1024, model_dim=1024, num_layers=6, num_heads=16, vocab_size=32128,
                    self_attn=True)
QK_NORM_EPS = 1e-6  # MiniTrainDIT's q/k RMSNorm eps (diffusers' Attention builds them with 1e-5)

# Qwen-Image VAE (sd-scripts' qwen_image_autoencoder_kl.load_vae; diffusers AutoencoderKLQwenImage's config)
VAE_CONFIG = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                  temperal_downsample=[False, True, True], dropout=0.0,
                  latents_mean=[-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134,
                                -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921],
                  latents_std=[2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526,
                               2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.916])

# Qwen3-0.6B (sd-scripts configs/qwen3_06b/config.json); sizes are replaced by the file's shapes
QWEN3_CONFIG = dict(attention_bias=False, attention_dropout=0.0, bos_token_id=151643, eos_token_id=151643,
                    head_dim=128, hidden_act="silu", hidden_size=1024, initializer_range=0.02,
                    intermediate_size=3072, max_position_embeddings=32768, max_window_layers=28,
                    num_attention_heads=16, num_hidden_layers=28, num_key_value_heads=8, rms_norm_eps=1e-6,
                    rope_theta=1000000, tie_word_embeddings=True, use_cache=False, use_sliding_window=False,
                    vocab_size=151936)

# ------------------------------------------------------------------ DiT names
# MiniTrainDIT (file) name part -> diffusers CosmosTransformer3DModel name part, inside a block
_BLOCK_RENAMES = (
    ("self_attn.q_proj", "attn1.to_q"), ("self_attn.k_proj", "attn1.to_k"), ("self_attn.v_proj", "attn1.to_v"),
    ("self_attn.output_proj", "attn1.to_out.0"), ("self_attn.q_norm", "attn1.norm_q"),
    ("self_attn.k_norm", "attn1.norm_k"),
    ("cross_attn.q_proj", "attn2.to_q"), ("cross_attn.k_proj", "attn2.to_k"), ("cross_attn.v_proj", "attn2.to_v"),
    ("cross_attn.output_proj", "attn2.to_out.0"), ("cross_attn.q_norm", "attn2.norm_q"),
    ("cross_attn.k_norm", "attn2.norm_k"),
    ("mlp.layer1", "ff.net.0.proj"), ("mlp.layer2", "ff.net.2"),
    ("adaln_modulation_self_attn.1", "norm1.linear_1"), ("adaln_modulation_self_attn.2", "norm1.linear_2"),
    ("adaln_modulation_cross_attn.1", "norm2.linear_1"), ("adaln_modulation_cross_attn.2", "norm2.linear_2"),
    ("adaln_modulation_mlp.1", "norm3.linear_1"), ("adaln_modulation_mlp.2", "norm3.linear_2"),
)
_TOP_RENAMES = (
    ("x_embedder.proj.1", "patch_embed.proj"), ("t_embedder.1.linear_1", "time_embed.t_embedder.linear_1"),
    ("t_embedder.1.linear_2", "time_embed.t_embedder.linear_2"), ("t_embedding_norm", "time_embed.norm"),
    ("final_layer.adaln_modulation.1", "norm_out.linear_1"), ("final_layer.adaln_modulation.2", "norm_out.linear_2"),
    ("final_layer.linear", "proj_out"),
)
_BLOCK_TO_DIFFUSERS = dict(_BLOCK_RENAMES)
_BLOCK_TO_FILE = {d: f for f, d in _BLOCK_RENAMES}
_TOP_TO_DIFFUSERS = dict(_TOP_RENAMES)
_TOP_TO_FILE = {d: f for f, d in _TOP_RENAMES}


def to_diffusers_path(path: str) -> str | None:
    """A MiniTrainDIT module/tensor path (no `net.`) -> the diffusers path; the adapter's paths are the same;
    None for a path neither model has."""
    if path.startswith(ADAPTER):
        return path
    m = re.match(r"blocks\.(\d+)\.(.+)$", path)
    if m:
        for part, new in _BLOCK_TO_DIFFUSERS.items():
            if m.group(2) == part or m.group(2).startswith(part + "."):
                return f"transformer_blocks.{m.group(1)}.{new}{m.group(2)[len(part):]}"
        return None
    for part, new in _TOP_TO_DIFFUSERS.items():
        if path == part or path.startswith(part + "."):
            return new + path[len(part):]
    return None


def to_file_path(path: str) -> str | None:
    """The inverse of to_diffusers_path: a diffusers (or adapter) path -> the MiniTrainDIT path (no `net.`)."""
    if path.startswith(ADAPTER):
        return path
    m = re.match(r"transformer_blocks\.(\d+)\.(.+)$", path)
    if m:
        for part, new in _BLOCK_TO_FILE.items():
            if m.group(2) == part or m.group(2).startswith(part + "."):
                return f"blocks.{m.group(1)}.{new}{m.group(2)[len(part):]}"
        return None
    for part, new in _TOP_TO_FILE.items():
        if path == part or path.startswith(part + "."):
            return new + path[len(part):]
    return None


def dit_prefix(shapes: Mapping[str, tuple]) -> str | None:
    """'net.' or '' when the file holds an Anima DiT (MiniTrainDIT blocks with an LLM adapter, or the bare DiT of
    a ComfyUI/diffusion-pipe save), else None."""
    for prefix in (DIT_PREFIX, "model.diffusion_model.net.", "model.diffusion_model.", ""):
        if f"{prefix}blocks.0.self_attn.q_proj.weight" in shapes and f"{prefix}x_embedder.proj.1.weight" in shapes \
                and f"{prefix}blocks.0.adaln_modulation_cross_attn.1.weight" in shapes:
            return prefix
    return None


def is_anima(shapes: Mapping[str, tuple]) -> bool:
    """An Anima DiT: the Cosmos-Predict2 MiniTrainDIT with the LLM adapter in the same file."""
    prefix = dit_prefix(shapes)
    return prefix is not None and f"{prefix}{ADAPTER}out_proj.weight" in shapes


def count_blocks(shapes: Mapping[str, tuple], pattern: str) -> int:
    found = {int(m.group(1)) for k in shapes for m in [re.match(pattern, k)] if m}
    return max(found) + 1 if found else 0


def infer_dit_config(shapes: Mapping[str, tuple], prefix: str = DIT_PREFIX) -> dict:
    """The CosmosTransformer3DModel config of a DiT file from its shapes (the fixed Anima settings otherwise):
    width from the patch embedding, heads from the q norm (head width), blocks counted, context width from the
    cross-attention k projection, adaLN-LoRA width from the modulation's first linear."""
    patch = shapes[f"{prefix}x_embedder.proj.1.weight"]
    width = int(patch[0])
    head_dim = int(shapes[f"{prefix}blocks.0.self_attn.q_norm.weight"][0])
    spatial = REAL_CONFIG["patch_size"][1] * REAL_CONFIG["patch_size"][2]
    in_channels = int(patch[1]) // spatial - 1  # the padding-mask channel
    out = int(shapes[f"{prefix}final_layer.linear.weight"][0]) // spatial
    return dict(REAL_CONFIG, in_channels=in_channels, out_channels=out, num_attention_heads=width // head_dim,
                attention_head_dim=head_dim, num_layers=count_blocks(shapes, rf"{re.escape(prefix)}blocks\.(\d+)\."),
                text_embed_dim=int(shapes[f"{prefix}blocks.0.cross_attn.k_proj.weight"][1]),
                adaln_lora_dim=int(shapes[f"{prefix}blocks.0.adaln_modulation_self_attn.1.weight"][0]),
                mlp_ratio=int(shapes[f"{prefix}blocks.0.mlp.layer1.weight"][0]) / width)


def infer_adapter_config(shapes: Mapping[str, tuple], prefix: str = DIT_PREFIX + ADAPTER) -> dict:
    """The LLM adapter's sizes from its tensors (`prefix` = where its tensors start)."""
    q = shapes[f"{prefix}blocks.0.cross_attn.q_proj.weight"]
    head_dim = int(shapes[f"{prefix}blocks.0.cross_attn.q_norm.weight"][0])
    embed = shapes[f"{prefix}embed.weight"]
    return dict(source_dim=int(shapes[f"{prefix}blocks.0.cross_attn.k_proj.weight"][1]), target_dim=int(embed[1]),
                model_dim=int(q[1]), num_layers=count_blocks(shapes, rf"{re.escape(prefix)}blocks\.(\d+)\."),
                num_heads=int(q[0]) // head_dim, vocab_size=int(embed[0]),
                self_attn=f"{prefix}blocks.0.self_attn.q_proj.weight" in shapes)


# ------------------------------------------------------------------ VAE names
def _vae_res_names(file: str, diffusers: str) -> list[tuple[str, str]]:
    out = [(f"{file}.residual.0", f"{diffusers}.norm1"), (f"{file}.residual.2", f"{diffusers}.conv1"),
           (f"{file}.residual.3", f"{diffusers}.norm2"), (f"{file}.residual.6", f"{diffusers}.conv2"),
           (f"{file}.shortcut", f"{diffusers}.conv_shortcut")]
    return out


def vae_module_table(config: Mapping = VAE_CONFIG) -> list[tuple[str, str]]:
    """(ComfyUI / Wan module path, diffusers AutoencoderKLQwenImage module path) of every module with weights, for
    the VAE `config` (dim_mult, num_res_blocks, temperal_downsample): the encoder's and decoder's flat lists of
    residual blocks and resamplers keep their indices (the decoder's are grouped into up blocks of
    num_res_blocks + 1 residual blocks and one upsampler)."""
    levels, per = len(config["dim_mult"]), int(config["num_res_blocks"])
    table = [("conv1", "quant_conv"), ("conv2", "post_quant_conv"), ("encoder.conv1", "encoder.conv_in"),
             ("decoder.conv1", "decoder.conv_in"), ("encoder.head.0", "encoder.norm_out"),
             ("encoder.head.2", "encoder.conv_out"), ("decoder.head.0", "decoder.norm_out"),
             ("decoder.head.2", "decoder.conv_out")]
    for side in ("encoder", "decoder"):
        table += _vae_res_names(f"{side}.middle.0", f"{side}.mid_block.resnets.0")
        table += _vae_res_names(f"{side}.middle.2", f"{side}.mid_block.resnets.1")
        table += [(f"{side}.middle.1.{n}", f"{side}.mid_block.attentions.0.{n}") for n in ("norm", "to_qkv", "proj")]
    index = 0
    for level in range(levels):
        for _ in range(per):
            table += _vae_res_names(f"encoder.downsamples.{index}", f"encoder.down_blocks.{index}")
            index += 1
        if level != levels - 1:
            for n in ("resample.1", "time_conv"):
                table.append((f"encoder.downsamples.{index}.{n}", f"encoder.down_blocks.{index}.{n}"))
            index += 1
    index = 0
    for level in range(levels):
        for r in range(per + 1):
            table += _vae_res_names(f"decoder.upsamples.{index}", f"decoder.up_blocks.{level}.resnets.{r}")
            index += 1
        if level != levels - 1:
            for n in ("resample.1", "time_conv"):
                table.append((f"decoder.upsamples.{index}.{n}", f"decoder.up_blocks.{level}.upsamplers.0.{n}"))
            index += 1
    return table


def is_comfy_vae(shapes: Mapping[str, tuple]) -> bool:
    return "conv1.bias" in shapes and any(k.startswith("encoder.downsamples.") for k in shapes)


def is_diffusers_vae(shapes: Mapping[str, tuple]) -> bool:
    return "quant_conv.bias" in shapes and any(k.startswith("encoder.down_blocks.") for k in shapes) \
        and any(k.endswith(".gamma") for k in shapes)


def infer_vae_config(shapes: Mapping[str, tuple]) -> dict:
    """The VAE config with the widths read off a ComfyUI-layout file (base width, latent channels)."""
    base = int(shapes["encoder.conv1.weight"][0])
    z_dim = int(shapes["conv2.weight"][0])
    return dict(VAE_CONFIG, base_dim=base, z_dim=z_dim)


def is_qwen3(shapes: Mapping[str, tuple]) -> str | None:
    """The prefix ('model.' or '') of a Qwen3 text encoder's tensors (q/k RMS norms per head tell Qwen3 from
    Qwen2), else None."""
    for prefix in ("model.", ""):
        if f"{prefix}layers.0.self_attn.q_norm.weight" in shapes and f"{prefix}embed_tokens.weight" in shapes:
            return prefix
    return None


def describe(shapes: Mapping[str, tuple]) -> str:
    """What a file is, in words, for 'wrong file' errors."""
    if is_anima(shapes):
        return "an Anima DiT"
    if dit_prefix(shapes) is not None:
        return "a Cosmos-Predict2 DiT without Anima's LLM adapter"
    if is_qwen3(shapes) is not None:
        return "a Qwen3 text encoder"
    if is_comfy_vae(shapes) or is_diffusers_vae(shapes):
        return "a Qwen-Image / Wan VAE"
    if any(k.endswith("encoder.block.0.layer.0.SelfAttention.q.weight") for k in shapes):
        return "a T5 text encoder"
    if any(k.startswith(("lora_unet_", "lora_te")) for k in shapes):
        return "a LoRA file"
    return "not an Anima part file"
