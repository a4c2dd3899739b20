"""`--network_module networks.dylora`: sd-scripts' DyLoRA (dynamic-rank LoRA, arXiv 2210.07558).

The layers, names and file are networks.lora's (a kohya LoRA file at the full rank: `<name>.lora_down.weight`,
`.lora_up.weight`, `.alpha`; it loads in diffusers, A1111, ComfyUI), so any leading block of ranks is a usable LoRA
(`python -m sd_scripts.networks.extract_lora_from_dylora` writes them).

Training as sd-scripts trains it: each rank row of down and up is its own parameter; in every training forward each
module draws b (a multiple of `unit` below the rank), makes only rows b .. b+unit-1 trainable (the others get no
gradient, so the optimizer leaves them alone that step), and scales the whole-rank update by sqrt(rank / (b+unit))
(a forward that gradient checkpointing recomputes during backward keeps its step's draw).
Outside training (sampling, inference) the module is the file's LoRA: full rank, scale alpha / rank
(`DyLoRANetwork.set_rank(r)` evaluates the first r ranks with alpha / r, as the extracted files do).

network_args (sd-scripts' names): unit (rank step, default 1; must divide network_dim), conv_dim (adds the ResNet
layers; sd-scripts requires it to equal network_dim), conv_alpha (default 1), rank_dropout, module_dropout; with
--network_dropout these dropouts act as in networks.lora (sd-scripts' DyLoRA accepts and ignores them).
"""
from __future__ import annotations

import math
import os
import random
from functools import partial
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import NetworkError
from . import lora as _lora
from .lora import LoadInfo, LoRANetwork
from .lora_module import LoRAModule
from .weights_file import load_weights_file

MODULE = "networks.dylora"
VARIANT_ARG_TYPES = {"unit": int}


def _in_backward() -> bool:
    """Is autograd running a backward pass now (torch.utils.checkpoint recomputes forwards inside it)?"""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


class DyLoRAModule(LoRAModule):
    """A LoRA module whose down rows (`lora_A.<i>`, [1, in] or [1, in, kh, kw]) and up columns (`lora_B.<i>`) are
    separate parameters, so one training forward can leave all but `unit` of them without a gradient."""

    def __init__(self, lora_name: str, org_module: nn.Module, *, unit: int = 1, **kwargs):
        super().__init__(lora_name, org_module, **kwargs)
        if unit < 1 or self.rank % unit:
            raise NetworkError(f"option 'network_args': unit={unit} for {MODULE} must be 1 or more and divide the "
                               f"rank ({self.rank} at {lora_name}): choose network_dim a multiple of unit")
        self.unit = int(unit)
        self.truncate_to: int | None = None  # set_rank: evaluate only the first ranks
        self._drawn: int | None = None  # the last training draw (reused when gradient checkpointing recomputes)
        down, up = self.lora_down, self.lora_up
        self._conv = (down.stride, down.padding, down.dilation) if self.is_conv else None
        self._kxk = self.is_conv and tuple(down.kernel_size) != (1, 1)
        self._down_shape = tuple(down.weight.shape[1:])
        # rows as sd-scripts keeps them: linear and 1x1 conv 2-D ([1, in], [out, 1]), kxk conv 4-D
        rows = down.weight.detach().reshape(self.rank, 1, *self._down_shape) if self._kxk else \
            down.weight.detach().reshape(self.rank, 1, -1)
        cols = up.weight.detach().reshape(up.weight.shape[0], self.rank, *((1, 1) if self._kxk else ()))
        del self.lora_down, self.lora_up
        self.lora_A = nn.ParameterList([nn.Parameter(r.clone()) for r in rows])
        self.lora_B = nn.ParameterList([nn.Parameter(cols[:, i:i + 1].clone()) for i in range(self.rank)])

    # ---- the file's tensors
    def down_weight(self, rank: int | None = None) -> torch.Tensor:
        """[rank, in] (conv [rank, in, kh, kw]) from the first `rank` rows (default all)."""
        rows = torch.cat(tuple(self.lora_A[:rank or self.rank]), dim=0)
        return rows.reshape(rows.shape[0], *self._down_shape)

    def up_weight(self, rank: int | None = None) -> torch.Tensor:
        """[out, rank] (conv [out, rank, 1, 1])."""
        cols = torch.cat(tuple(self.lora_B[:rank or self.rank]), dim=1)
        return cols.reshape(cols.shape[0], cols.shape[1], *((1, 1) if self.is_conv else ()))

    @torch.no_grad()
    def load_file_weights(self, down: torch.Tensor | None, up: torch.Tensor | None) -> None:
        if down is not None:
            for i, row in enumerate(down.reshape(self.rank, *self.lora_A[0].shape[1:])):
                self.lora_A[i].copy_(row.unsqueeze(0).to(self.lora_A[i].dtype))
        if up is not None:
            flat = up.reshape(up.shape[0], self.rank)
            for i in range(self.rank):
                self.lora_B[i].copy_(flat[:, i:i + 1].reshape(self.lora_B[i].shape).to(self.lora_B[i].dtype))

    def delta_weight(self) -> torch.Tensor:
        down, up = self.down_weight().detach().float(), self.up_weight().detach().float()
        delta = up.flatten(1) @ down.flatten(1)
        return delta.reshape(up.shape[0], *self._down_shape) * self.scale

    # ---- forward
    def _choose_trained_rows(self) -> int:
        """sd-scripts' draw: b uniform in [0, rank), rounded down to a multiple of unit; rows b..b+unit-1 train."""
        b = random.randint(0, self.rank - 1)
        b -= b % self.unit
        for i, (a, u) in enumerate(zip(self.lora_A, self.lora_B)):
            on = b <= i < b + self.unit
            a.requires_grad_(on)
            u.requires_grad_(on)
        return b

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        org_out = self._org_forward(x, *args, **kwargs)
        if self.module_dropout and self.training and torch.rand(1).item() < self.module_dropout:
            return org_out
        rank = self.rank
        scale = self.scale
        if self.training:
            # a forward recomputed during backward (gradient checkpointing) keeps the draw of the step's forward
            b = self._drawn if _in_backward() and self._drawn is not None else self._choose_trained_rows()
            self._drawn = b
            scale = scale * math.sqrt(self.rank / (b + self.unit))
        elif self.truncate_to is not None:
            rank = min(self.truncate_to, self.rank)
            scale = self._alpha_value / rank
        down, up = self.down_weight(rank), self.up_weight(rank)
        x = x.to(down.dtype)
        lx = F.conv2d(x, down, None, *self._conv) if self.is_conv else F.linear(x, down)
        if self.dropout and self.training:
            lx = F.dropout(lx, p=self.dropout)
        if self.rank_dropout and self.training:
            mask = (torch.rand((lx.size(0), rank), device=lx.device) > self.rank_dropout).to(lx.dtype)
            lx = lx * (mask[:, :, None, None] if self.is_conv else mask[:, None, :] if lx.dim() == 3 else mask)
            scale = scale / (1.0 - self.rank_dropout)
        lx = F.conv2d(lx, up) if self.is_conv else F.linear(lx, up)
        multiplier = self.multiplier
        if isinstance(multiplier, torch.Tensor):
            multiplier = multiplier.to(lx.device, lx.dtype).view(-1, *([1] * (lx.dim() - 1)))
        return org_out + (lx * (multiplier * scale)).to(org_out.dtype)


class DyLoRANetwork(LoRANetwork):
    """networks.lora's layers with DyLoRA modules; `unit` is the rank step."""

    def __init__(self, *args, unit: int | None = None, **kwargs):
        unit = 1 if unit is None else int(unit)
        dim, conv_dim = kwargs.get("dim", 4), kwargs.get("conv_dim")
        if kwargs.get("modules_dim") is None:
            if unit < 1 or int(dim) % unit:
                raise NetworkError(f"option 'network_args': unit={unit} for {MODULE} must be 1 or more and divide "
                                   f"network_dim ({dim})")
            if conv_dim is not None and int(conv_dim) != int(dim):
                raise NetworkError(f"option 'network_args': conv_dim={conv_dim} for {MODULE} must equal network_dim "
                                   f"({dim}): DyLoRA trains one rank for every layer (as in sd-scripts)")
        object.__setattr__(self, "unit", unit)  # read by module_class while the base class builds the modules
        super().__init__(*args, **kwargs)

    @property
    def module_class(self):  # type: ignore[override]
        return partial(DyLoRAModule, unit=self.unit)

    def _create(self, targets, unet: bool = False):
        loras = super()._create(targets, unet=unet)
        for lora in loras:
            if getattr(lora, "part", None) is not None or getattr(lora, "swap_halves", False):
                raise NetworkError(f"{MODULE}: this model family's LoRA file layout fuses or reorders layers "
                                   f"({lora.lora_name}), which sd-scripts' DyLoRA does not train: use networks.lora")
        return loras

    def set_rank(self, rank: int | None) -> None:
        """Outside training, evaluate only the first `rank` ranks at scale alpha / rank (None: the full rank)."""
        for lora in self.all_loras():
            lora.truncate_to = rank

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for lora in self.all_loras():
            out[f"{lora.lora_name}.lora_down.weight"] = lora.down_weight().detach()
            out[f"{lora.lora_name}.lora_up.weight"] = lora.up_weight().detach()
            out[f"{lora.lora_name}.alpha"] = lora.alpha.detach()
        return out

    def load_weights(self, path: str | os.PathLike) -> LoadInfo:
        tensors, metadata = load_weights_file(path)
        own = self.lora_state_dict()
        for key, value in tensors.items():
            if key in own and tuple(value.shape) != tuple(own[key].shape):
                raise NetworkError(f"{path}: {key} has shape {list(value.shape)} but this network needs "
                                   f"{list(own[key].shape)}: use a file made with the same network_dim (and "
                                   f"conv_dim) and model family, or set dim_from_weights")
        matched = [k for k in tensors if k in own]
        if not matched:
            raise NetworkError(f"{path}: none of its {len(tensors)} tensors is a LoRA module of this network: the "
                               f"file was made for another model family or is not a kohya-format LoRA")
        with torch.no_grad():
            for lora in self.all_loras():
                name = lora.lora_name
                lora.load_file_weights(tensors.get(f"{name}.lora_down.weight"), tensors.get(f"{name}.lora_up.weight"))
                if f"{name}.alpha" in tensors:
                    lora.alpha.copy_(tensors[f"{name}.alpha"].float())
                lora.sync_alpha()
        missing = sorted(k for k in own if k not in tensors and not k.endswith(".alpha"))
        return LoadInfo(str(path), len({k.split(".", 1)[0] for k in matched}), missing,
                        sorted(set(tensors) - set(own)), metadata)


def create_network(*, unet: nn.Module | None, text_encoders: Sequence[nn.Module], family: str,
                   network_dim: int | None, network_alpha: float | None, network_dropout: float | None = None,
                   network_args: Sequence[str] | dict[str, Any] | None = None, multiplier: float = 1.0,
                   train_unet: bool = True, train_text_encoder: bool = True) -> DyLoRANetwork:
    return _lora.create_network(unet=unet, text_encoders=text_encoders, family=family, network_dim=network_dim,
                                network_alpha=network_alpha, network_dropout=network_dropout,
                                network_args=network_args, multiplier=multiplier, train_unet=train_unet,
                                train_text_encoder=train_text_encoder, network_class=DyLoRANetwork,
                                variant_arg_types=VARIANT_ARG_TYPES)


def create_network_from_weights(path: str | os.PathLike, *, unet: nn.Module | None,
                                text_encoders: Sequence[nn.Module], family: str, multiplier: float = 1.0,
                                train_unet: bool = True, train_text_encoder: bool = True) -> DyLoRANetwork:
    """A DyLoRA network shaped like a LoRA file (unit 1, as sd-scripts rebuilds one), weights loaded."""
    return _lora.create_network_from_weights(path, unet=unet, text_encoders=text_encoders, family=family,
                                             multiplier=multiplier, train_unet=train_unet,
                                             train_text_encoder=train_text_encoder, network_class=DyLoRANetwork)
