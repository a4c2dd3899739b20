"""One kohya-format LoRA adapter around one nn.Linear or nn.Conv2d of a frozen base model.

Output = org(x) + up(down(x)) * multiplier * alpha / rank. The wrapped module is not copied: `apply_to()` swaps its
`forward` for ours (keeping the original bound forward), so the base weights stay shared and frozen, and `restore()`
puts the original forward back. `merge()` folds the update into the base weight instead.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LoRAModule(nn.Module):
    """lora_down [r, in] (conv: [r, in, kh, kw], original stride/padding), lora_up [out, r] (conv [out, r, 1, 1]),
    alpha a 0-dim buffer (None or 0 means alpha = rank)."""

    def __init__(self, lora_name: str, org_module: nn.Module, *, rank: int = 4, alpha: float | None = 1.0,
                 multiplier: float = 1.0, dropout: float | None = None, rank_dropout: float | None = None,
                 module_dropout: float | None = None):
        super().__init__()
        if not isinstance(org_module, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"{lora_name}: LoRA wraps nn.Linear or nn.Conv2d, not {type(org_module).__name__}")
        self.lora_name = lora_name
        self.rank = int(rank)
        self.is_conv = isinstance(org_module, nn.Conv2d)
        self._pointwise = self.is_conv and tuple(org_module.kernel_size) == (1, 1) and \
            tuple(org_module.stride) == (1, 1) and tuple(org_module.padding) in ((0, 0), "valid") and \
            org_module.groups == 1
        if self.is_conv:
            in_dim, out_dim = org_module.in_channels, org_module.out_channels
            self.lora_down = nn.Conv2d(in_dim, self.rank, org_module.kernel_size, org_module.stride,
                                       org_module.padding, dilation=org_module.dilation, bias=False)
            self.lora_up = nn.Conv2d(self.rank, out_dim, (1, 1), (1, 1), bias=False)
        else:
            in_dim, out_dim = org_module.in_features, org_module.out_features
            self.lora_down = nn.Linear(in_dim, self.rank, bias=False)
            self.lora_up = nn.Linear(self.rank, out_dim, bias=False)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        alpha = float(self.rank) if alpha is None or float(alpha) == 0 else float(alpha)
        self.register_buffer("alpha", torch.tensor(alpha, dtype=torch.float32))
        self._alpha_value = alpha  # cached: reading the buffer every forward would sync the GPU
        self.multiplier: float | torch.Tensor = float(multiplier)
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        # Not registered as a submodule: the base model owns it, and our state_dict must hold only LoRA tensors.
        self._org: tuple[nn.Module] = (org_module,)
        self._org_forward = None
        self._had_instance_forward = False

    @property
    def org_module(self) -> nn.Module:
        return self._org[0]

    @property
    def scale(self) -> float:
        return self._alpha_value / self.rank

    def sync_alpha(self) -> None:
        """Refresh the cached alpha after the buffer was loaded (0 or negative means alpha = rank)."""
        value = float(self.alpha.detach().float().cpu())
        self._alpha_value = value if value > 0 else float(self.rank)

    @property
    def applied(self) -> bool:
        return self._org_forward is not None

    def apply_to(self) -> None:
        """Route the wrapped module's forward through this adapter (idempotent)."""
        if self.applied:
            return
        org = self.org_module
        self._had_instance_forward = "forward" in org.__dict__
        self._org_forward = org.forward
        org.forward = self.forward

    def restore(self) -> None:
        """Give the wrapped module its original forward back."""
        if not self.applied:
            return
        org = self.org_module
        if self._had_instance_forward:
            org.forward = self._org_forward
        else:
            del org.forward
        self._org_forward = None

    def delta_weight(self) -> torch.Tensor:
        """up @ down * alpha / rank, shaped like the wrapped weight (float32, multiplier not applied)."""
        down = self.lora_down.weight.detach().float()
        up = self.lora_up.weight.detach().float()
        if self.is_conv:
            kh, kw = down.shape[2], down.shape[3]
            delta = (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], down.shape[1], kh, kw)
        else:
            delta = up @ down
        return delta * self.scale

    @torch.no_grad()
    def merge(self) -> None:
        """W += up @ down * multiplier * alpha / rank in the wrapped module, then restore its forward."""
        self.restore()
        if isinstance(self.multiplier, torch.Tensor):
            raise ValueError(f"{self.lora_name}: cannot merge with per-sample multipliers; set one number first")
        weight = self.org_module.weight
        delta = self.delta_weight().to(weight.device) * self.multiplier
        weight.copy_((weight.float() + delta).to(weight.dtype))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        org_out = self._org_forward(x, *args, **kwargs)
        if self.module_dropout and self.training and torch.rand(1).item() < self.module_dropout:
            return org_out
        # Functional calls instead of the sub-modules' __call__: this runs for every adapted layer in every step,
        # and the module-call overhead was a visible share of a small model's step.
        down = self.lora_down
        x = x.to(down.weight.dtype)
        if self._pointwise:  # 1x1 conv as a matrix product: BLAS instead of PyTorch's slow small-channel conv path
            b, c, h, w = x.shape
            lx = torch.matmul(down.weight.view(self.rank, c), x.reshape(b, c, h * w)).view(b, self.rank, h, w)
        elif self.is_conv:
            lx = F.conv2d(x, down.weight, None, down.stride, down.padding, down.dilation)
        else:
            lx = F.linear(x, down.weight)
        if self.dropout and self.training:
            lx = F.dropout(lx, p=self.dropout)
        scale = self.scale
        if self.rank_dropout and self.training:
            # Drop whole ranks per sample; rescale so the expected update is unchanged.
            mask = (torch.rand((lx.size(0), self.rank), device=lx.device) > self.rank_dropout).to(lx.dtype)
            if self.is_conv:
                mask = mask[:, :, None, None]
            elif lx.dim() == 3:
                mask = mask[:, None, :]
            lx = lx * mask
            scale = scale / (1.0 - self.rank_dropout)
        up = self.lora_up.weight
        multiplier = self.multiplier
        if isinstance(multiplier, torch.Tensor):  # one multiplier per sample (dataset network_multiplier)
            lx = F.conv2d(lx, up) if self.is_conv else F.linear(lx, up)
            multiplier = multiplier.to(lx.device, lx.dtype).view(-1, *([1] * (lx.dim() - 1)))
            return org_out + (lx * (multiplier * scale)).to(org_out.dtype)
        # Scale the small [out, rank] up matrix instead of the large activation: one elementwise pass less, forward
        # and backward, in every adapted layer.
        up = up * (multiplier * scale)
        if self.is_conv:
            b, r, h, w = lx.shape
            lx = torch.matmul(up.view(up.shape[0], r), lx.reshape(b, r, h * w)).view(b, up.shape[0], h, w)
        else:
            lx = F.linear(lx, up)
        return org_out + (lx if lx.dtype == org_out.dtype else lx.to(org_out.dtype))
