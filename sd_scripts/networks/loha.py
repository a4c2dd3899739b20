"""`--network_module networks.loha`: sd-scripts' native LoHa (low-rank Hadamard product, arXiv 2108.06098).

dW = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / rank on the layers networks.lora adapts (with `conv_dim`, the ResNet
3x3 convs too; `use_tucker=True` gives those a Tucker core). The module maths is lycoris-lora's LohaModule, so the
files are LyCORIS's key format (`<name>.hada_w1_a`, `.hada_w1_b`, `.hada_w2_a`, `.hada_w2_b`, `.hada_t1/t2`,
`.alpha`) and load in lycoris, ComfyUI, A1111 and sd-scripts.

network_args (sd-scripts' names): conv_dim, conv_alpha, use_tucker, rank_dropout, module_dropout, exclude_patterns,
include_patterns.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

from torch import nn

from .adapter_network import BOOL, PATTERNS, AdapterNetwork, network_from_file, network_on_targets, parse_typed_args

MODULE = "networks.loha"
NETWORK_ARG_TYPES: dict[str, Any] = {
    "conv_dim": int, "conv_alpha": float, "use_tucker": BOOL, "rank_dropout": float, "module_dropout": float,
    "exclude_patterns": PATTERNS, "include_patterns": PATTERNS,
}


def create_network(*, unet: nn.Module | None, text_encoders: Sequence[nn.Module], family: str,
                   network_dim: int | None, network_alpha: float | None, network_dropout: float | None = None,
                   network_args: Sequence[str] | dict[str, Any] | None = None, multiplier: float = 1.0,
                   train_unet: bool = True, train_text_encoder: bool = True) -> AdapterNetwork:
    from lycoris.modules.loha import LohaModule

    args = parse_typed_args(network_args, NETWORK_ARG_TYPES, MODULE)
    options = dict(dropout=network_dropout or 0.0, rank_dropout=args.get("rank_dropout") or 0.0,
                   module_dropout=args.get("module_dropout") or 0.0, use_tucker=bool(args.get("use_tucker")))

    def make(name: str, layer: nn.Module, rank: int, alpha: float) -> nn.Module:
        return LohaModule(name, layer, multiplier, rank, alpha, **options)

    return network_on_targets(unet=unet, text_encoders=text_encoders, family=family, network_dim=network_dim,
                              network_alpha=network_alpha, conv_dim=args.get("conv_dim"),
                              conv_alpha=args.get("conv_alpha"), make=make, multiplier=multiplier, module=MODULE,
                              train_unet=train_unet, train_text_encoder=train_text_encoder,
                              exclude_patterns=args.get("exclude_patterns"),
                              include_patterns=args.get("include_patterns"))


def create_network_from_weights(path: str | os.PathLike, *, unet: nn.Module | None,
                                text_encoders: Sequence[nn.Module], family: str, multiplier: float = 1.0,
                                train_unet: bool = True, train_text_encoder: bool = True) -> AdapterNetwork:
    return network_from_file(path, unet=unet, text_encoders=text_encoders, family=family, multiplier=multiplier,
                             module=MODULE, train_unet=train_unet, train_text_encoder=train_text_encoder)
