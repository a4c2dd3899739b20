"""`--network_module networks.lokr`: sd-scripts' native LoKr (low-rank Kronecker product, arXiv 2309.14859).

dW = kron(w1, w2) * alpha / rank, w1 a small full matrix and w2 = w2_a @ w2_b of rank `network_dim` (a full matrix
when the rank is at least half its side; then alpha = rank), with the layer's sides split into two factors
(`factor`: the smaller one, -1 = as balanced as possible). With `conv_dim`, the ResNet 3x3 convs too; `use_tucker=True`
gives them a Tucker core. The maths is lycoris-lora's LokrModule: files are LyCORIS's key format (`<name>.lokr_w1`,
`.lokr_w2` or `.lokr_w2_a` / `.lokr_w2_b` (+ `.lokr_t2`), `.alpha`).

network_args (sd-scripts' names): conv_dim, conv_alpha, factor, use_tucker, rank_dropout, module_dropout,
exclude_patterns, include_patterns.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

from torch import nn

from .adapter_network import BOOL, PATTERNS, AdapterNetwork, network_from_file, network_on_targets, parse_typed_args

MODULE = "networks.lokr"
NETWORK_ARG_TYPES: dict[str, Any] = {
    "conv_dim": int, "conv_alpha": float, "factor": int, "use_tucker": BOOL, "rank_dropout": float,
    "module_dropout": float, "exclude_patterns": PATTERNS, "include_patterns": PATTERNS,
}


def create_network(*, unet: nn.Module | None, text_encoders: Sequence[nn.Module], family: str,
                   network_dim: int | None, network_alpha: float | None, network_dropout: float | None = None,
                   network_args: Sequence[str] | dict[str, Any] | None = None, multiplier: float = 1.0,
                   train_unet: bool = True, train_text_encoder: bool = True) -> AdapterNetwork:
    from lycoris.modules.lokr import LokrModule

    from ..errors import NetworkError

    args = parse_typed_args(network_args, NETWORK_ARG_TYPES, MODULE)
    factor = -1 if args.get("factor") is None else args["factor"]
    if factor == 0 or factor < -1:
        raise NetworkError(f"option 'network_args': factor={factor} for {MODULE} must be -1 (balanced) or a "
                           f"positive divisor of the layers' sides")
    options = dict(dropout=network_dropout or 0.0, rank_dropout=args.get("rank_dropout") or 0.0,
                   module_dropout=args.get("module_dropout") or 0.0, use_tucker=bool(args.get("use_tucker")),
                   factor=factor)

    def make(name: str, layer: nn.Module, rank: int, alpha: float) -> nn.Module:
        return LokrModule(name, layer, multiplier, rank, alpha, **options)

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
