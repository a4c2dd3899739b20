"""Anima's denoiser: diffusers' CosmosTransformer3DModel (Cosmos-Predict2's MiniTrainDIT) plus Anima's LLM adapter,
the one part no library has.

The LLM adapter (as sd-scripts 48d368f `library/anima_models.py` describes it) turns Qwen3 hidden states into the
DiT's cross-attention context: the caption's T5-vocabulary token ids are embedded (32,128 rows), pass `num_layers`
blocks of [RMSNorm -> self-attention over the T5 tokens (their padding mask), RMSNorm -> cross-attention to the
Qwen3 states (their padding mask), RMSNorm -> GELU MLP], each attention with per-head RMSNorm on q and k and rotary
position embeddings (theta 10000, half-split rotation; the T5 tokens' positions for q, the attended sequence's for
k); then a linear projection and an RMSNorm. Rows of padding T5 tokens are zeroed in the context.

diffusers' Cosmos transformer matches MiniTrainDIT for Anima's settings (adaLN-LoRA, RoPE with NTK extrapolation
(1, 4, 4) and no fps modulation, the zero padding-mask channel, timestep = sigma in [0, 1], sinusoidal features
[cos, sin] -> RMS-normed embedding and 3x adaLN-LoRA vector), except for the eps of the q/k RMS norms (1e-5 in
diffusers' Attention, 1e-6 in MiniTrainDIT): `AnimaTransformer` sets them to 1e-6, after which the two agree to float
rounding (tests/test_anima_family.py checks a block against an independent MiniTrainDIT formulation).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import CosmosTransformer3DModel
from torch import nn

from .layout import QK_NORM_EPS


class AdapterRMSNorm(nn.Module):
    """RMS norm with a learned scale (T5 style: no mean subtraction, no bias), eps 1e-6."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


def rotary(positions: int, head_dim: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [positions, head_dim] of rotary embeddings with theta 10000, frequencies repeated for both halves."""
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(positions, device=device, dtype=torch.float32), inv)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


class AdapterAttention(nn.Module):
    """Multi-head attention with per-head RMS-normed q and k and rotary positions (no biases)."""

    def __init__(self, query_dim: int, context_dim: int, heads: int, head_dim: int):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.q_proj = nn.Linear(query_dim, inner, bias=False)
        self.q_norm = AdapterRMSNorm(head_dim)
        self.k_proj = nn.Linear(context_dim, inner, bias=False)
        self.k_norm = AdapterRMSNorm(head_dim)
        self.v_proj = nn.Linear(context_dim, inner, bias=False)
        self.o_proj = nn.Linear(inner, query_dim, bias=False)

    def forward(self, x, context, mask, rope_q, rope_k):
        b, lq, _ = x.shape
        lk = context.shape[1]
        q = self.q_norm(self.q_proj(x).view(b, lq, self.heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(context).view(b, lk, self.heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(context).view(b, lk, self.heads, self.head_dim).transpose(1, 2)
        q, k = _rotate(q, *rope_q), _rotate(k, *rope_k)
        out = F.scaled_dot_product_attention(q, k, v.to(q.dtype), attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, lq, -1))


class AdapterBlock(nn.Module):
    """[self-attention,] cross-attention to the source states, MLP; pre-norm residuals."""

    def __init__(self, source_dim: int, model_dim: int, heads: int, self_attn: bool, mlp_ratio: float = 4.0):
        super().__init__()
        head_dim = model_dim // heads
        self.has_self_attn = self_attn
        if self_attn:
            self.norm_self_attn = AdapterRMSNorm(model_dim)
            self.self_attn = AdapterAttention(model_dim, model_dim, heads, head_dim)
        self.norm_cross_attn = AdapterRMSNorm(model_dim)
        self.cross_attn = AdapterAttention(model_dim, source_dim, heads, head_dim)
        self.norm_mlp = AdapterRMSNorm(model_dim)
        hidden = int(model_dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(model_dim, hidden), nn.GELU(), nn.Linear(hidden, model_dim))

    def forward(self, x, source, target_mask, source_mask, rope_target, rope_source):
        if self.has_self_attn:
            normed = self.norm_self_attn(x)
            x = x + self.self_attn(normed, normed, target_mask, rope_target, rope_target)
        x = x + self.cross_attn(self.norm_cross_attn(x), source, source_mask, rope_target, rope_source)
        return x + self.mlp(self.norm_mlp(x))


class LLMAdapter(nn.Module):
    """Qwen3 hidden states + T5 token ids -> the DiT's cross-attention context [B, L_t5, target_dim]."""

    def __init__(self, source_dim: int = 1024, target_dim: int = 1024, model_dim: int = 1024, num_layers: int = 6,
                 num_heads: int = 16, vocab_size: int = 32128, self_attn: bool = True):
        super().__init__()
        self.config = dict(source_dim=source_dim, target_dim=target_dim, model_dim=model_dim, num_layers=num_layers,
                           num_heads=num_heads, vocab_size=vocab_size, self_attn=self_attn)
        self.head_dim = model_dim // num_heads
        self.embed = nn.Embedding(vocab_size, target_dim)
        self.in_proj = nn.Linear(target_dim, model_dim) if model_dim != target_dim else nn.Identity()
        self.blocks = nn.ModuleList(AdapterBlock(source_dim, model_dim, num_heads, self_attn)
                                    for _ in range(num_layers))
        self.out_proj = nn.Linear(model_dim, target_dim)
        self.norm = AdapterRMSNorm(target_dim)

    @staticmethod
    def _key_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
        return None if mask is None else mask.to(torch.bool)[:, None, None, :]

    def forward(self, source: torch.Tensor, target_ids: torch.Tensor, target_mask: torch.Tensor | None = None,
                source_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.in_proj(self.embed(target_ids))
        source = source.to(x.dtype) if not torch.is_autocast_enabled() else source
        rope_t = rotary(x.shape[1], self.head_dim, x.device, x.dtype)
        rope_s = rotary(source.shape[1], self.head_dim, x.device, x.dtype)
        t_mask, s_mask = self._key_mask(target_mask), self._key_mask(source_mask)
        for block in self.blocks:
            x = block(x, source, t_mask, s_mask, rope_t, rope_s)
        return self.norm(self.out_proj(x))


class AnimaTransformer(CosmosTransformer3DModel):
    """CosmosTransformer3DModel with Anima's LLM adapter (`llm_adapter`) and MiniTrainDIT's q/k norm eps.

    forward(hidden_states [B, C, H, W] or [B, C, 1, H, W], timestep = sigma [B], encoder_hidden_states = Qwen3
    states [B, Lq, Dq], qwen_mask [B, Lq], t5_ids [B, Lt], t5_mask [B, Lt]) -> the velocity in the input's shape.
    With t5_ids None, encoder_hidden_states is taken as the context itself (a model without an adapter)."""

    _skip_layerwise_casting_patterns = ["patch_embed", "final_layer", "norm", "llm_adapter.embed"]
    _keep_in_fp32_modules = []  # (no learnable positional embedding: Anima's extra_pos_embed_type is None)

    def __init__(self, *, adapter: dict | None = None, **cosmos_config):
        # MiniTrainDIT concatenates an all-zero padding-mask channel to the latents. diffusers does that with a
        # torchvision resize of the mask; the same channel goes in here as a zero `condition_mask` (appended last,
        # as the padding mask is), so the patch embedding takes in_channels + 1 and torchvision is not needed.
        self.padding_channel = bool(cosmos_config.pop("concat_padding_mask", True))
        if self.padding_channel:
            cosmos_config["in_channels"] = cosmos_config.get("in_channels", 16) + 1
        super().__init__(concat_padding_mask=False, **cosmos_config)
        self.llm_adapter = LLMAdapter(**adapter) if adapter else None
        for module in self.modules():
            if type(module).__name__ == "RMSNorm" and module.__class__.__module__.startswith("diffusers") \
                    and getattr(module, "eps", None) == 1e-5:
                module.eps = QK_NORM_EPS

    @property
    def adapter_config(self) -> dict | None:
        return None if self.llm_adapter is None else dict(self.llm_adapter.config)

    def context(self, qwen: torch.Tensor, qwen_mask: torch.Tensor | None, t5_ids: torch.Tensor | None,
                t5_mask: torch.Tensor | None) -> torch.Tensor:
        """The cross-attention context: the adapter's output with padding T5 rows zeroed."""
        if t5_ids is None or self.llm_adapter is None:
            return qwen
        ctx = self.llm_adapter(qwen, t5_ids, t5_mask, qwen_mask)
        if t5_mask is not None:
            ctx = ctx * t5_mask.to(ctx.dtype)[..., None]
        return ctx

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                qwen_mask: torch.Tensor | None = None, t5_ids: torch.Tensor | None = None,
                t5_mask: torch.Tensor | None = None, context: torch.Tensor | None = None, return_dict: bool = False,
                **kwargs):
        four_d = hidden_states.ndim == 4
        x = hidden_states.unsqueeze(2) if four_d else hidden_states
        if context is None:
            context = self.context(encoder_hidden_states, qwen_mask, t5_ids, t5_mask)
        padding = torch.zeros(x.shape[0], 1, *x.shape[2:], device=x.device, dtype=x.dtype) \
            if self.padding_channel else None
        out = super().forward(hidden_states=x, timestep=timestep, encoder_hidden_states=context,
                              condition_mask=padding, return_dict=False, **kwargs)[0]
        out = out.squeeze(2) if four_d else out
        return out if not return_dict else (out,)
