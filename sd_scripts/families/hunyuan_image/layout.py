"""Torch-free facts of the HunyuanImage-2.1 file layouts: what a file is, the architecture its shapes describe, and
the key tables between the files users download and the diffusers / transformers modules.

- DiT, official layout (`hunyuanimage2.1.safetensors` from tencent/HunyuanImage-2.1, what sd-scripts 48d368f
  `library/hunyuan_image_models.py` loads; bare keys or ComfyUI's `model.diffusion_model.` prefix):
  `img_in.proj`, `txt_in.{input_embedder, t_embedder.mlp, c_embedder, individual_token_refiner.blocks.N}`,
  `byt5_in.{layernorm, fc1..fc3}`, `time_in.mlp`, `double_blocks.N.{img,txt}_{mod.linear, attn_qkv, attn_q_norm,
  attn_k_norm, attn_proj, mlp.fc1, mlp.fc2}`, `single_blocks.N.{linear1, linear2, q_norm, k_norm,
  modulation.linear}`, `final_layer.{linear, adaLN_modulation.1}`. Fused tensors: `*_attn_qkv` / `self_attn_qkv`
  are q, k, v stacked on dim 0; `linear1` is q, k, v and the MLP input; the final adaLN Linear stores
  (shift, scale) where diffusers stores (scale, shift).
- DiT, ComfyUI's module names (FLUX-style, as ComfyUI's HunyuanVideo/Image model and sd-scripts'
  `convert_hunyuan_image_lora_to_comfy` name them): `img_attn.qkv`, `img_attn.norm.query_norm.scale`, `img_mlp.0`,
  `img_mod.lin`, `modulation.lin`, `norm.key_norm.scale`, `*.in_layer` / `*.out_layer`; renamed to the official
  names before the table applies.
- VAE (`hunyuan_image_2.1_vae_fp16.safetensors`, the official layout sd-scripts' HunyuanVAE2D loads):
  `encoder.down.L.block.R`, `encoder.down.L.downsample.conv`, `*.mid.block_1/2`, `*.mid.attn_1.{q,k,v,proj_out,
  norm}`, `decoder.up.L.block.R`, `decoder.up.L.upsample.conv`, `nin_shortcut`; diffusers AutoencoderKLHunyuanImage
  numbers the resnets and resamplers of all levels in one list (`down_blocks.I`, `up_blocks.I`).
- Qwen2.5-VL text encoder (`qwen_2.5_vl_7b.safetensors`: `model.layers.N.*`, `model.embed_tokens`, `model.norm`,
  `lm_head`, `visual.*`; or transformers' newer `model.language_model.*`): only the language model is used (text
  prompts), as transformers' Qwen2_5_VLTextModel.
- byT5 (`byt5_small_glyphxl_fp16.safetensors`): transformers T5 encoder keys (`encoder.block.N...`, `shared.weight`
  with the 1,510 rows of ByT5's 384 ids plus the 138 colour and 988 font tokens).
"""
from __future__ import annotations

import re
from typing import Mapping, NamedTuple

Shapes = Mapping[str, tuple]

COMFY_PREFIX = "model.diffusion_model."
PLAIN, SPLIT, SWAP_HALVES = "plain", "split", "swap_halves"

# ---------------------------------------------------------------- facts of the released model
REAL_CONFIG = dict(in_channels=64, out_channels=64, num_attention_heads=28, attention_head_dim=128, num_layers=20,
                   num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=[1, 1],
                   qk_norm="rms_norm", guidance_embeds=False, text_embed_dim=3584, text_embed_2_dim=1472,
                   rope_theta=256.0, rope_axes_dim=[64, 64], use_meanflow=False)
BYT5_PROJECTION_WIDTH = 2048  # context_embedder_2 (byt5_in) inner width, fixed in diffusers
VAE_SCALING_FACTOR = 0.75289
VAE_LATENT_CHANNELS = 64
VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=64, block_out_channels=[128, 256, 512, 512, 1024,
                                                                                          1024],
                  layers_per_block=2, spatial_compression_ratio=32, sample_size=384,
                  scaling_factor=VAE_SCALING_FACTOR, downsample_match_channel=True, upsample_match_channel=True)
# Qwen2.5-VL-7B's language model (config.json of Qwen/Qwen2.5-VL-7B-Instruct, text part)
QWEN_HEAD_DIM = 128
QWEN_CONFIG = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                   num_key_value_heads=4, vocab_size=152064, max_position_embeddings=128000, rms_norm_eps=1e-6,
                   rope_theta=1000000.0, rope_scaling={"type": "default", "mrope_section": [16, 24, 24]},
                   hidden_act="silu", attention_dropout=0.0, tie_word_embeddings=False, use_cache=False)
SCHEDULER_CONFIG = dict(_class_name="FlowMatchEulerDiscreteScheduler", num_train_timesteps=1000, shift=5.0,
                        use_dynamic_shifting=False)


# ---------------------------------------------------------------- ComfyUI names -> official names
_COMFY_RENAMES = (
    (r"\.(img|txt)_attn\.qkv\.", r".\1_attn_qkv."), (r"\.(img|txt)_attn\.proj\.", r".\1_attn_proj."),
    (r"\.(img|txt)_attn\.norm\.query_norm\.scale$", r".\1_attn_q_norm.weight"),
    (r"\.(img|txt)_attn\.norm\.key_norm\.scale$", r".\1_attn_k_norm.weight"),
    (r"\.(img|txt)_mlp\.0\.", r".\1_mlp.fc1."), (r"\.(img|txt)_mlp\.2\.", r".\1_mlp.fc2."),
    (r"\.(img|txt)_mod\.lin\.", r".\1_mod.linear."),
    (r"^(single_blocks\.\d+)\.modulation\.lin\.", r"\1.modulation.linear."),
    (r"^(single_blocks\.\d+)\.norm\.query_norm\.scale$", r"\1.q_norm.weight"),
    (r"^(single_blocks\.\d+)\.norm\.key_norm\.scale$", r"\1.k_norm.weight"),
    (r"^(time_in|txt_in\.t_embedder)\.in_layer\.", r"\1.mlp.0."),
    (r"^(time_in|txt_in\.t_embedder)\.out_layer\.", r"\1.mlp.2."),
    (r"^txt_in\.c_embedder\.in_layer\.", "txt_in.c_embedder.linear_1."),
    (r"^txt_in\.c_embedder\.out_layer\.", "txt_in.c_embedder.linear_2."),
    (r"\.self_attn\.qkv\.", ".self_attn_qkv."), (r"\.self_attn\.proj\.", ".self_attn_proj."),
    (r"^(txt_in\.individual_token_refiner\.blocks\.\d+)\.mlp\.0\.", r"\1.mlp.fc1."),
    (r"^(txt_in\.individual_token_refiner\.blocks\.\d+)\.mlp\.2\.", r"\1.mlp.fc2."),
)
_COMFY_RULES = tuple((re.compile(a), b) for a, b in _COMFY_RENAMES)


def official_name(key: str) -> str:
    """A DiT key (prefix already stripped) in the official layout: ComfyUI's FLUX-style names renamed."""
    for rx, repl in _COMFY_RULES:
        key = rx.sub(repl, key)
    return key


def dit_keys(shapes: Shapes) -> dict[str, str]:
    """official DiT key -> the file's key (ComfyUI prefix and names undone). A file with prefixed keys keeps only
    those (all-in-one files carry other parts under other prefixes)."""
    prefixed = any(k.startswith(COMFY_PREFIX) for k in shapes)
    out = {}
    for key in shapes:
        if prefixed and not key.startswith(COMFY_PREFIX):
            continue
        out[official_name(key[len(COMFY_PREFIX):] if prefixed else key)] = key
    return out


# ---------------------------------------------------------------- recognising files
def is_dit(shapes: Shapes) -> bool:
    keys = dit_keys(shapes)
    return "img_in.proj.weight" in keys and "byt5_in.fc1.weight" in keys and \
        any(k.startswith("double_blocks.") for k in keys) and "txt_in.input_embedder.weight" in keys


def is_dit_diffusers(shapes: Shapes) -> bool:
    return "x_embedder.proj.weight" in shapes and "context_embedder.proj_in.weight" in shapes and \
        "time_guidance_embed.timestep_embedder.linear_1.weight" in shapes


def is_vae(shapes: Shapes) -> bool:
    return "encoder.down.0.block.0.conv1.weight" in shapes and "decoder.conv_in.weight" in shapes and \
        shapes["decoder.conv_in.weight"][1] == shapes["encoder.conv_out.weight"][0] // 2


def qwen_prefix(shapes: Shapes) -> str | None:
    """Prefix of the Qwen2.5-VL language model's keys ('model.' or 'model.language_model.' or ''), None when the
    file is not a Qwen2 / Qwen2.5-VL language model."""
    for prefix in ("model.language_model.", "model.", ""):
        if prefix + "embed_tokens.weight" in shapes and prefix + "layers.0.self_attn.q_proj.bias" in shapes:
            return prefix
    return None


def is_byt5(shapes: Shapes) -> bool:
    return "encoder.block.0.layer.0.SelfAttention.q.weight" in shapes and \
        any(k in shapes for k in ("shared.weight", "encoder.embed_tokens.weight"))


def file_kind(shapes: Shapes) -> str | None:
    """'dit', 'dit_diffusers', 'vae', 'qwen', 'byt5' or None."""
    if is_dit(shapes):
        return "dit"
    if is_dit_diffusers(shapes):
        return "dit_diffusers"
    if is_vae(shapes):
        return "vae"
    if qwen_prefix(shapes) is not None:
        return "qwen"
    if is_byt5(shapes):
        return "byt5"
    return None


KIND_LABELS = {"dit": "a HunyuanImage-2.1 DiT", "dit_diffusers": "a HunyuanImage-2.1 DiT in the diffusers layout",
               "vae": "a HunyuanImage-2.1 VAE", "qwen": "a Qwen2.5-VL text encoder", "byt5": "a byT5 text encoder"}


def describe_kind(kind: str | None) -> str:
    return KIND_LABELS.get(kind or "", "not a HunyuanImage-2.1 part")


# ---------------------------------------------------------------- DiT architecture from shapes
def _indices(keys, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})


def infer_dit_config(shapes: Shapes) -> dict:
    """The diffusers HunyuanImageTransformer2DModel config of the official-layout DiT in `shapes` (sizes read from
    the shapes, so tiny test models load through the same code). KeyError when a needed tensor is missing."""
    names = dit_keys(shapes)
    keys = {k: tuple(shapes[v]) for k, v in names.items()}
    hidden, in_channels = keys["img_in.proj.weight"][:2]
    head_dim = keys["double_blocks.0.img_attn_q_norm.weight"][0]
    if hidden % head_dim:
        raise ValueError(f"width {hidden} is not a multiple of the attention head width {head_dim}")
    mlp = keys["double_blocks.0.img_mlp.fc1.weight"][0]
    half = head_dim // 2
    return dict(REAL_CONFIG, in_channels=in_channels, out_channels=keys["final_layer.linear.weight"][0],
                num_attention_heads=hidden // head_dim, attention_head_dim=head_dim,
                num_layers=len(_indices(keys, r"double_blocks\.(\d+)\.")),
                num_single_layers=len(_indices(keys, r"single_blocks\.(\d+)\.")),
                num_refiner_layers=len(_indices(keys, r"txt_in\.individual_token_refiner\.blocks\.(\d+)\.")),
                mlp_ratio=mlp / hidden, text_embed_dim=keys["txt_in.input_embedder.weight"][1],
                text_embed_2_dim=keys["byt5_in.fc1.weight"][1], rope_axes_dim=[half, half],
                guidance_embeds="guidance_in.mlp.0.weight" in keys, use_meanflow="time_r_in.mlp.0.weight" in keys)


class Rule(NamedTuple):
    official: str
    diffusers: tuple[str, ...]
    kind: str = PLAIN
    sizes: tuple[int, ...] = ()


def _linear(rules: list, official: str, diffusers: str, bias: bool = True) -> None:
    rules.append(Rule(official + ".weight", (diffusers + ".weight",)))
    if bias:
        rules.append(Rule(official + ".bias", (diffusers + ".bias",)))


def _split(rules: list, official: str, diffusers: tuple[str, ...], sizes: tuple[int, ...]) -> None:
    for suffix in (".weight", ".bias"):
        rules.append(Rule(official + suffix, tuple(d + suffix for d in diffusers), SPLIT, sizes))


def transformer_key_table(config: Mapping) -> list[Rule]:
    """Every DiT tensor: official name -> diffusers name(s), how (plain, split into parts of `sizes` rows, or halves
    exchanged)."""
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    mlp = int(hidden * config["mlp_ratio"])
    rules: list[Rule] = []
    _linear(rules, "img_in.proj", "x_embedder.proj")
    _linear(rules, "txt_in.input_embedder", "context_embedder.proj_in")
    for i, j in ((0, 1), (2, 2)):
        _linear(rules, f"txt_in.t_embedder.mlp.{i}", f"context_embedder.time_text_embed.timestep_embedder.linear_{j}")
        _linear(rules, f"time_in.mlp.{i}", f"time_guidance_embed.timestep_embedder.linear_{j}")
        if config.get("guidance_embeds"):
            _linear(rules, f"guidance_in.mlp.{i}", f"time_guidance_embed.guidance_embedder.linear_{j}")
        if config.get("use_meanflow"):
            _linear(rules, f"time_r_in.mlp.{i}", f"time_guidance_embed.timestep_embedder_r.linear_{j}")
    for j in (1, 2):
        _linear(rules, f"txt_in.c_embedder.linear_{j}", f"context_embedder.time_text_embed.text_embedder.linear_{j}")
    for b in range(config["num_refiner_layers"]):
        o, d = f"txt_in.individual_token_refiner.blocks.{b}.", f"context_embedder.token_refiner.refiner_blocks.{b}."
        _linear(rules, o + "norm1", d + "norm1")
        _linear(rules, o + "norm2", d + "norm2")
        _split(rules, o + "self_attn_qkv", tuple(d + f"attn.to_{x}" for x in "qkv"), (hidden,) * 3)
        _linear(rules, o + "self_attn_proj", d + "attn.to_out.0")
        _linear(rules, o + "mlp.fc1", d + "ff.net.0.proj")
        _linear(rules, o + "mlp.fc2", d + "ff.net.2")
        _linear(rules, o + "adaLN_modulation.1", d + "norm_out.linear")
    if config.get("text_embed_2_dim"):
        _linear(rules, "byt5_in.layernorm", "context_embedder_2.norm")
        for j in (1, 2, 3):
            _linear(rules, f"byt5_in.fc{j}", f"context_embedder_2.linear_{j}")
    for b in range(config["num_layers"]):
        o, d = f"double_blocks.{b}.", f"transformer_blocks.{b}."
        for stream, mod, qkv, norm, proj, ff in (("img", "norm1", ("to_q", "to_k", "to_v"), ("norm_q", "norm_k"),
                                                  "to_out.0", "ff"),
                                                 ("txt", "norm1_context", ("add_q_proj", "add_k_proj", "add_v_proj"),
                                                  ("norm_added_q", "norm_added_k"), "to_add_out", "ff_context")):
            _linear(rules, o + f"{stream}_mod.linear", d + f"{mod}.linear")
            _split(rules, o + f"{stream}_attn_qkv", tuple(d + "attn." + x for x in qkv), (hidden,) * 3)
            _linear(rules, o + f"{stream}_attn_q_norm", d + "attn." + norm[0], bias=False)
            _linear(rules, o + f"{stream}_attn_k_norm", d + "attn." + norm[1], bias=False)
            _linear(rules, o + f"{stream}_attn_proj", d + "attn." + proj)
            _linear(rules, o + f"{stream}_mlp.fc1", d + f"{ff}.net.0.proj")
            _linear(rules, o + f"{stream}_mlp.fc2", d + f"{ff}.net.2")
    for b in range(config["num_single_layers"]):
        o, d = f"single_blocks.{b}.", f"single_transformer_blocks.{b}."
        _split(rules, o + "linear1", (d + "attn.to_q", d + "attn.to_k", d + "attn.to_v", d + "proj_mlp"),
               (hidden, hidden, hidden, mlp))
        _linear(rules, o + "linear2", d + "proj_out")
        _linear(rules, o + "q_norm", d + "attn.norm_q", bias=False)
        _linear(rules, o + "k_norm", d + "attn.norm_k", bias=False)
        _linear(rules, o + "modulation.linear", d + "norm.linear")
    _linear(rules, "final_layer.linear", "proj_out")
    for suffix in (".weight", ".bias"):
        rules.append(Rule("final_layer.adaLN_modulation.1" + suffix, ("norm_out.linear" + suffix,), SWAP_HALVES))
    return rules


# ---------------------------------------------------------------- VAE official <-> diffusers names
_VAE_RESNET_RENAMES = (("nin_shortcut", "conv_shortcut"),)
_VAE_MID = (("mid.block_1.", "mid_block.resnets.0."), ("mid.block_2.", "mid_block.resnets.1."),
            ("mid.attn_1.q.", "mid_block.attentions.0.to_q."), ("mid.attn_1.k.", "mid_block.attentions.0.to_k."),
            ("mid.attn_1.v.", "mid_block.attentions.0.to_v."), ("mid.attn_1.proj_out.", "mid_block.attentions.0.proj."),
            ("mid.attn_1.norm.", "mid_block.attentions.0.norm."))


def vae_key_map(keys) -> dict[str, str]:
    """official VAE key -> diffusers AutoencoderKLHunyuanImage key, for the keys of one file (the flat numbering of
    resnets and resamplers follows the file's levels)."""
    keys = list(keys)
    out: dict[str, str] = {}
    for part, level_word, sampler, flat_word in (("encoder", "down", "downsample", "down_blocks"),
                                                  ("decoder", "up", "upsample", "up_blocks")):
        rx = re.compile(rf"{part}\.{level_word}\.(\d+)\.(block\.(\d+)|{sampler})\.(.+)$")
        found: dict[int, dict] = {}
        for key in keys:
            m = rx.match(key)
            if m:
                level = found.setdefault(int(m.group(1)), {"blocks": set(), "sampler": False})
                if m.group(3) is not None:
                    level["blocks"].add(int(m.group(3)))
                else:
                    level["sampler"] = True
        flat, index = 0, {}
        for level in sorted(found):
            for block in sorted(found[level]["blocks"]):
                index[(level, f"block.{block}")] = flat
                flat += 1
            if found[level]["sampler"]:
                index[(level, sampler)] = flat
                flat += 1
        for key in keys:
            m = rx.match(key)
            if m:
                rest = m.group(4)
                for a, b in _VAE_RESNET_RENAMES:
                    rest = rest.replace(a, b)
                what = m.group(2) if m.group(3) is not None else sampler
                out[key] = f"{part}.{flat_word}.{index[(int(m.group(1)), what)]}.{rest}"
    for key in keys:
        if key in out:
            continue
        new = key
        for a, b in _VAE_MID:
            new = new.replace("." + a, "." + b)
        out[key] = new
    return out
