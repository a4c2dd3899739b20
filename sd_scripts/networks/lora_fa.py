"""`--network_module networks.lora_fa`: sd-scripts' LoRA-FA (LoRA with a frozen down projection, arXiv 2308.03303).

networks.lora's layers, names and file (a kohya LoRA file, loads in diffusers, A1111, ComfyUI): only the init and the
trained weights differ. lora_down starts from N(0, 2 / (in + rank)) (the paper's; `in` = input channels) and stays
frozen; lora_up starts at zero and is the only trained weight, so the optimizer holds half the parameters and no
state for the down projections. The frozen down is saved in the file (inference needs it).

network_args: networks.lora's (conv_dim, conv_alpha, rank_dropout, module_dropout, and the family's own keys).
"""
from __future__ import annotations

import math
import os
from typing import Any, Sequence

from torch import nn

from . import lora as _lora
from .lora import LoRANetwork
from .lora_module import LoRAModule

MODULE = "networks.lora_fa"


class LoRAFAModule(LoRAModule):
    """A LoRA module whose lora_down is a frozen random projection."""

    def __init__(self, lora_name: str, org_module: nn.Module, **kwargs):
        super().__init__(lora_name, org_module, **kwargs)
        in_dim = self.lora_down.weight.shape[1]
        nn.init.normal_(self.lora_down.weight, std=math.sqrt(2.0 / (in_dim + self.rank)))
        self.lora_down.weight.requires_grad_(False)

    def requires_grad_(self, requires_grad: bool = True) -> "LoRAFAModule":
        self.lora_up.requires_grad_(requires_grad)
        self.lora_down.requires_grad_(False)
        return self


class LoRAFANetwork(LoRANetwork):
    """networks.lora's layers with LoRA-FA modules: only the up projections are trained."""

    module_class = LoRAFAModule

    def requires_grad_(self, requires_grad: bool = True) -> "LoRAFANetwork":
        for lora in self.all_loras():
            lora.requires_grad_(requires_grad)
        return self

    def prepare_optimizer_params(self, unet_lr, text_encoder_lr, default_lr):
        groups, names = super().prepare_optimizer_params(unet_lr, text_encoder_lr, default_lr)
        ups = {id(lora.lora_up.weight) for lora in self.all_loras()}
        for group in groups:
            group["params"] = [p for p in group["params"] if id(p) in ups]
        return groups, names


def create_network(*, unet: nn.Module | None, text_encoders: Sequence[nn.Module], family: str,
                   network_dim: int | None, network_alpha: float | None, network_dropout: float | None = None,
                   network_args: Sequence[str] | dict[str, Any] | None = None, multiplier: float = 1.0,
                   train_unet: bool = True, train_text_encoder: bool = True) -> LoRAFANetwork:
    return _lora.create_network(unet=unet, text_encoders=text_encoders, family=family, network_dim=network_dim,
                                network_alpha=network_alpha, network_dropout=network_dropout,
                                network_args=network_args, multiplier=multiplier, train_unet=train_unet,
                                train_text_encoder=train_text_encoder, network_class=LoRAFANetwork)


def create_network_from_weights(path: str | os.PathLike, *, unet: nn.Module | None,
                                text_encoders: Sequence[nn.Module], family: str, multiplier: float = 1.0,
                                train_unet: bool = True, train_text_encoder: bool = True) -> LoRAFANetwork:
    return _lora.create_network_from_weights(path, unet=unet, text_encoders=text_encoders, family=family,
                                             multiplier=multiplier, train_unet=train_unet,
                                             train_text_encoder=train_text_encoder, network_class=LoRAFANetwork)
