"""Lumina Image 2.0 file layouts (torch-free): what the single files users download hold, the Alpha-VLLM <->
diffusers key table of the denoiser, and the architecture read from tensor shapes.

Files (sd-scripts 48d368f `library/lumina_util.py`, `library/lumina_models.py`):
- the denoiser (NextDiT, e.g. `lumina_2_model_bf16.safetensors`, what sd-scripts' lumina_train saves): Alpha-VLLM
  names, bare (`x_embedder.weight`, `layers.N.attention.qkv.weight`, ...) or under ComfyUI's
  `model.diffusion_model.` (the `lumina_2.safetensors` all-in-one file and Neta Lumina, which also hold the
  autoencoder under `vae.` and Gemma-2 under `text_encoders.gemma2_2b.transformer.model.`);
- Gemma-2 2B (`gemma_2_2b_fp16.safetensors`): transformers Gemma2Model names, bare or under `model.`; ComfyUI's
  files also carry the tokenizer's sentencepiece model as a uint8 tensor `spiece_model`;
- the autoencoder: FLUX.1's 16-channel `ae.safetensors` (LDM names, bare or under `vae.` / `first_stage_model.`).

The denoiser table maps each Alpha-VLLM tensor to diffusers' Lumina2Transformer2DModel: attention `qkv` is split
into `to_q` / `to_k` / `to_v` (sizes from the config: heads x head_dim, then kv_heads x head_dim twice), the rest are
renames (the same correspondence as diffusers' `convert_lumina2_to_diffusers`, which is fixed to the 2B sizes).
`norm_final.weight` (sd-scripts' NextDiT has it, its forward never uses it) has no diffusers tensor: it is written as
ones on save and ignored on load.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

Shapes = Mapping[str, tuple]

COMFY_PREFIX = "model.diffusion_model."
NETA_VAE_PREFIX = "vae."
NETA_GEMMA_PREFIX = "text_encoders.gemma2_2b.transformer.model."
SPIECE_KEY = "spiece_model"  # ComfyUI: the tokenizer's sentencepiece model inside the text-encoder file
UNUSED_NORM = "norm_final.weight"

# diffusers' Lumina2Transformer2DModel config of Lumina-Image-2.0 (2B) and the Gemma-2 2B config sd-scripts builds
LUMINA2_CONFIG = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=None, hidden_size=2304,
                      num_layers=26, num_refiner_layers=2, num_attention_heads=24, num_kv_heads=8, multiple_of=256,
                      ffn_dim_multiplier=None, norm_eps=1e-5, scaling_factor=1.0, axes_dim_rope=(32, 32, 32),
                      axes_lens=(300, 512, 512), cap_feat_dim=2304)
GEMMA2_CONFIG = dict(architectures=["Gemma2Model"], attention_bias=False, attention_dropout=0.0,
                     attn_logit_softcapping=50.0, bos_token_id=2, eos_token_id=1, pad_token_id=0,
                     final_logit_softcapping=30.0, head_dim=256, hidden_activation="gelu_pytorch_tanh",
                     hidden_size=2304, initializer_range=0.02, intermediate_size=9216, max_position_embeddings=8192,
                     model_type="gemma2", num_attention_heads=8, num_hidden_layers=26, num_key_value_heads=4,
                     query_pre_attn_scalar=256, rms_norm_eps=1e-6, rope_theta=10000.0, sliding_window=4096,
                     vocab_size=256000)
# sd-scripts samples with FlowMatchEulerDiscreteScheduler(shift=6.0), no resolution-dependent shift
SCHEDULER_CONFIG = dict(_class_name="FlowMatchEulerDiscreteScheduler", num_train_timesteps=1000, shift=6.0,
                        use_dynamic_shifting=False)
MODELSPEC_ARCHITECTURE = "lumina-2"  # sd-scripts' sai_model_spec ARCH_LUMINA_2
MODELSPEC_IMPLEMENTATION = "https://github.com/Alpha-VLLM/Lumina-Image-2.0"  # IMPL_LUMINA

SPLIT, COPY = "split", "copy"


@dataclass(frozen=True)
class TensorRule:
    """One Alpha-VLLM tensor and the diffusers tensor(s) it becomes (SPLIT: along rows, in `sizes`)."""

    alpha: str
    diffusers: tuple[str, ...]
    kind: str = COPY
    sizes: tuple[int, ...] = ()


def strip_prefix(shapes: Shapes) -> dict[str, tuple]:
    """The denoiser's tensors under bare names (ComfyUI's `model.diffusion_model.` removed; other parts dropped)."""
    if any(k.startswith(COMFY_PREFIX) for k in shapes):
        return {k[len(COMFY_PREFIX):]: v for k, v in shapes.items() if k.startswith(COMFY_PREFIX)}
    return dict(shapes)


_DENOISER_MARKERS = ("cap_embedder.1.weight", "x_embedder.weight", "layers.0.attention.qkv.weight",
                     "noise_refiner.0.attention.qkv.weight", "context_refiner.0.attention.qkv.weight")
_DIFFUSERS_MARKERS = ("time_caption_embed.caption_embedder.1.weight", "layers.0.attn.to_q.weight")


def is_denoiser(shapes: Shapes) -> bool:
    """A Lumina 2 NextDiT in the Alpha-VLLM layout (bare or ComfyUI-prefixed)."""
    bare = strip_prefix(shapes)
    return all(k in bare for k in _DENOISER_MARKERS)


def gemma_prefix(shapes: Shapes) -> str | None:
    """The prefix of Gemma-2's tensors in a file ('', 'model.', Neta's), or None when it holds no Gemma-2."""
    for prefix in ("", "model.", NETA_GEMMA_PREFIX):
        if f"{prefix}layers.0.self_attn.q_proj.weight" in shapes and f"{prefix}embed_tokens.weight" in shapes \
                and f"{prefix}layers.0.pre_feedforward_layernorm.weight" in shapes:
            return prefix
    return None


def ae_prefix(shapes: Shapes) -> str | None:
    """The prefix of a 16-channel autoencoder's tensors in a file, or None."""
    for prefix in ("", NETA_VAE_PREFIX, "first_stage_model."):
        conv = shapes.get(f"{prefix}decoder.conv_in.weight")
        if conv is not None and f"{prefix}encoder.conv_in.weight" in shapes and len(conv) == 4 and conv[1] == 16:
            return prefix
    return None


def file_kind(shapes: Shapes) -> str | None:
    """'lumina' (a denoiser, maybe with the other parts), 'lumina_diffusers', 'gemma2', 'ae', 'sd_vae' (4 latent
    channels), 't5' or None."""
    if is_denoiser(shapes):
        return "lumina"
    if all(k in shapes for k in _DIFFUSERS_MARKERS):
        return "lumina_diffusers"
    if gemma_prefix(shapes) is not None:
        return "gemma2"
    if ae_prefix(shapes) is not None:
        return "ae"
    if any(k.endswith("decoder.conv_in.weight") for k in shapes):
        return "sd_vae"
    if any(k.endswith("encoder.block.0.layer.0.SelfAttention.q.weight") for k in shapes):
        return "t5"
    return None


KIND_LABELS = {"lumina": "a Lumina 2 denoiser", "lumina_diffusers": "a Lumina 2 transformer in the diffusers layout",
               "gemma2": "a Gemma-2 text encoder", "ae": "a 16-channel autoencoder",
               "sd_vae": "a 4-channel Stable Diffusion VAE", "t5": "a T5 text encoder"}


def describe_kind(kind: str | None) -> str:
    return KIND_LABELS.get(kind or "", "not a Lumina 2 model part")


def _indices(keys, head: str) -> list[int]:
    found = set()
    for k in keys:
        if k.startswith(head):
            rest = k[len(head):].split(".", 1)[0]
            if rest.isdigit():
                found.add(int(rest))
    return sorted(found)


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """RoPE widths (caption position, row, column) summing to `head_dim`, each even: equal thirds when they are
    (Lumina 2: 96 = 32 + 32 + 32), else the row/column widths the largest even third and the rest first."""
    third = head_dim // 3
    third -= third % 2
    return head_dim - 2 * third, third, third


def infer_transformer_config(shapes: Shapes) -> dict:
    """diffusers Lumina2Transformer2DModel config from the Alpha-VLLM tensor shapes (bare names). Patch size 2 (every
    Lumina 2 model); heads from the q/k norm width, kv heads from the fused qkv rows. KeyError for a missing tensor,
    ValueError for shapes no config explains."""
    hidden, patch_in = shapes["x_embedder.weight"]
    patch = 2
    if patch_in % (patch * patch):
        raise ValueError(f"x_embedder takes {patch_in} inputs, not a multiple of {patch * patch}")
    head_dim = shapes["layers.0.attention.q_norm.weight"][0]
    if hidden % head_dim:
        raise ValueError(f"width {hidden} is not a multiple of the head width {head_dim}")
    qkv_rows = shapes["layers.0.attention.qkv.weight"][0]
    kv_rows = qkv_rows - hidden
    if kv_rows <= 0 or kv_rows % (2 * head_dim):
        raise ValueError(f"qkv has {qkv_rows} rows, which no head layout of width {hidden} explains")
    ffn = shapes["layers.0.feed_forward.w1.weight"][0]
    multiple_of, multiplier = 256, None
    if multiple_of * -(-4 * hidden // multiple_of) != ffn:
        multiple_of, multiplier = ffn, (None if ffn >= 4 * hidden else ffn / (4 * hidden))
    keys = list(shapes)
    layers = _indices(keys, "layers.")
    refiners = _indices(keys, "noise_refiner.")
    if layers != list(range(len(layers))) or refiners != list(range(len(refiners))):
        raise ValueError("the block numbers have gaps")
    out = shapes["final_layer.linear.weight"][0]
    return dict(LUMINA2_CONFIG, patch_size=patch, in_channels=patch_in // (patch * patch),
                out_channels=None if out == patch_in else out // (patch * patch), hidden_size=hidden,
                num_layers=len(layers), num_refiner_layers=len(refiners), num_attention_heads=hidden // head_dim,
                num_kv_heads=kv_rows // (2 * head_dim), multiple_of=multiple_of, ffn_dim_multiplier=multiplier,
                axes_dim_rope=rope_axes(head_dim), cap_feat_dim=shapes["cap_embedder.1.weight"][1])


_TOP = {"x_embedder": "x_embedder", "t_embedder.mlp.0": "time_caption_embed.timestep_embedder.linear_1",
        "t_embedder.mlp.2": "time_caption_embed.timestep_embedder.linear_2",
        "cap_embedder.1": "time_caption_embed.caption_embedder.1",
        "final_layer.adaLN_modulation.1": "norm_out.linear_1", "final_layer.linear": "norm_out.linear_2"}
_BLOCK = {"attention.out": "attn.to_out.0", "feed_forward.w1": "feed_forward.linear_1",
          "feed_forward.w2": "feed_forward.linear_2", "feed_forward.w3": "feed_forward.linear_3",
          "adaLN_modulation.1": "norm1.linear"}  # Linear layers; adaLN only in modulated blocks
_BLOCK_NORMS = {"attention.q_norm": "attn.norm_q", "attention.k_norm": "attn.norm_k", "attention_norm2": "norm2",
                "ffn_norm1": "ffn_norm1", "ffn_norm2": "ffn_norm2"}
_BIASED = {"x_embedder", "t_embedder.mlp.0", "t_embedder.mlp.2", "cap_embedder.1", "final_layer.adaLN_modulation.1",
           "final_layer.linear", "adaLN_modulation.1"}


def blocks(config: Mapping) -> list[tuple[str, bool]]:
    """(Alpha-VLLM block path, modulated) of every transformer block, in file order."""
    n_ref, n_layers = int(config.get("num_refiner_layers", 2)), int(config["num_layers"])
    return ([(f"context_refiner.{i}", False) for i in range(n_ref)] + [(f"noise_refiner.{i}", True)
                                                                       for i in range(n_ref)]
            + [(f"layers.{i}", True) for i in range(n_layers)])


def qkv_sizes(config: Mapping) -> tuple[int, int, int]:
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    head_dim = hidden // heads
    kv = int(config.get("num_kv_heads") or heads) * head_dim
    return hidden, kv, kv


def linear_table(config: Mapping) -> dict[str, str | tuple[str, int, int]]:
    """diffusers module path -> Alpha-VLLM module path of every Linear layer: a str, or (path, part, parts) for
    to_q / to_k / to_v, which the file fuses into `attention.qkv`."""
    table: dict[str, str | tuple[str, int, int]] = {d: a for a, d in _TOP.items()}
    for block, modulated in blocks(config):
        for i, part in enumerate(("to_q", "to_k", "to_v")):
            table[f"{block}.attn.{part}"] = (f"{block}.attention.qkv", i, 3)
        for alpha, diff in _BLOCK.items():
            if modulated or alpha != "adaLN_modulation.1":
                table[f"{block}.{diff}"] = f"{block}.{alpha}"
    return table


def transformer_key_table(config: Mapping) -> list[TensorRule]:
    """Every tensor of the Alpha-VLLM denoiser (except the unused norm_final) and its diffusers tensor(s)."""
    rules = [TensorRule("cap_embedder.0.weight", ("time_caption_embed.caption_embedder.0.weight",))]
    for alpha, diff in _TOP.items():
        rules.append(TensorRule(f"{alpha}.weight", (f"{diff}.weight",)))
        rules.append(TensorRule(f"{alpha}.bias", (f"{diff}.bias",)))
    sizes = qkv_sizes(config)
    for block, modulated in blocks(config):
        rules.append(TensorRule(f"{block}.attention.qkv.weight",
                                tuple(f"{block}.attn.{p}.weight" for p in ("to_q", "to_k", "to_v")), SPLIT, sizes))
        for alpha, diff in _BLOCK.items():
            if modulated or alpha != "adaLN_modulation.1":
                rules.append(TensorRule(f"{block}.{alpha}.weight", (f"{block}.{diff}.weight",)))
                if alpha in _BIASED:
                    rules.append(TensorRule(f"{block}.{alpha}.bias", (f"{block}.{diff}.bias",)))
        norm1 = "norm1.norm" if modulated else "norm1"
        rules.append(TensorRule(f"{block}.attention_norm1.weight", (f"{block}.{norm1}.weight",)))
        for alpha, diff in _BLOCK_NORMS.items():
            rules.append(TensorRule(f"{block}.{alpha}.weight", (f"{block}.{diff}.weight",)))
    return rules
