"""`--network_module networks.oft` / `networks.oft_flux`: sd-scripts' OFT (orthogonal fine-tuning, arXiv 2306.07280).

Each adapted layer's weight is rotated block-wise on its output side: W' = R^T W per block of rows, with
R = (I + Q)(I - Q)^-1 (Cayley) of Q = B - B^T, B the trained `oft_blocks` [num_blocks, size, size] (zero at the start:
R = I), the Frobenius norm of Q clamped to alpha * out_features (`alpha` is the constraint; sd-scripts'
default 1e-3), and the multiplier m giving m (R - I) + I. network_dim is the number of blocks (it must divide each
adapted layer's output size). The bias is kept. The maths is the same as lycoris-lora's Diag-OFT.

File (sd-scripts' keys): `oft_unet_<layer name>.oft_blocks` and `.alpha` (the constraint coefficient); the layer
names follow the model family's LoRA naming (SDXL: SAI paths; FLUX.1: BFL paths). When the family's LoRA layout
fuses layers into one module (FLUX.1's img_attn.qkv = q/k/v, linear1 = q/k/v/mlp), every module holds a list,
`oft_blocks.<i>`, one rotation per fused part (sd-scripts' networks/oft_flux), each clamped at alpha * its size.
Only the denoiser is adapted (sd-scripts' OFT has no text-encoder modules).

Layers: the attention layers inside the family's LoRA target blocks (SD: attn1 / attn2 q, k, v, out; FLUX.1 the
double blocks' img_attn / txt_attn qkv and proj); network_args `enable_all_linear=True` every Linear (and 1x1 conv)
of those blocks, `enable_conv=True` (U-Net families) also the ResNet blocks' and samplers' layers.
"""
from __future__ import annotations

import logging
import os
from collections import defaultdict
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import NetworkError
from .adapter_network import BOOL, AdapterNetwork, parse_typed_args
from .targets import Target, unet_targets
from .weights_file import load_weights_file

MODULE = "networks.oft"
PREFIX = "oft_unet"
DEFAULT_DIM = 4
DEFAULT_ALPHA = 1e-3
NETWORK_ARG_TYPES: dict[str, Any] = {"enable_all_linear": BOOL, "enable_conv": BOOL}

log = logging.getLogger(__name__)


def _out_features(layer: nn.Module) -> int:
    return layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features


class OFTModule(nn.Module):
    """The OFT of one file module: one layer, or the layers the family's file fuses into one (one rotation each)."""

    def __init__(self, lora_name: str, layers: Sequence[nn.Module], *, num_blocks: int, alpha: float,
                 multiplier: float = 1.0, list_form: bool = False):
        super().__init__()
        self.lora_name = lora_name
        self.num_blocks = int(num_blocks)
        self.layers = tuple(layers)
        self.org_module = [self.layers[0]]  # (AdapterNetwork's naming helpers read the first wrapped layer)
        self.outs = [_out_features(layer) for layer in self.layers]
        for out in self.outs:
            if self.num_blocks < 1 or out % self.num_blocks:
                raise NetworkError(f"option 'network_dim': {num_blocks} (the number of OFT blocks) must divide the "
                                   f"output size of every adapted layer; {lora_name} has {out}: choose a divisor "
                                   f"such as 4 or 8")
        blocks = [nn.Parameter(torch.zeros(self.num_blocks, out // self.num_blocks, out // self.num_blocks))
                  for out in self.outs]
        self.list_form = list_form or len(blocks) > 1
        if self.list_form:
            self.oft_blocks = nn.ParameterList(blocks)
        else:
            self.oft_blocks = blocks[0]
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self._alpha_value = float(alpha)  # cached: reading the buffer every forward would sync the GPU
        self.multiplier = float(multiplier)
        self._org_forwards: list | None = None

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._alpha_value = float(self.alpha.detach().float().cpu())

    def blocks(self, part: int) -> torch.Tensor:
        return self.oft_blocks[part] if self.list_form else self.oft_blocks

    def rotation(self, part: int) -> torch.Tensor:
        """m (R - I) + I for one part, float32 [num_blocks, size, size]."""
        b = self.blocks(part).float()
        q = b - b.transpose(1, 2)
        norm = torch.norm(q.flatten())
        limit = self._alpha_value * self.outs[part]
        q = q * ((torch.clamp(norm, max=limit) + 1e-8) / (norm + 1e-8))
        eye = torch.eye(q.shape[1], device=q.device, dtype=q.dtype).expand_as(q)
        r = torch.matmul(eye + q, torch.linalg.inv(eye - q))
        return self.multiplier * (r - eye) + eye

    def rotated_weight(self, part: int) -> torch.Tensor:
        """R^T W per block of output rows (float32, shaped like the layer's weight)."""
        weight = self.layers[part].weight
        w = weight.float().reshape(self.num_blocks, weight.shape[0] // self.num_blocks, *weight.shape[1:])
        return torch.einsum("k n m, k n ... -> k m ...", self.rotation(part), w).reshape(weight.shape)

    def _forward(self, part: int, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.multiplier == 0.0:
            return self._org_forwards[part](x, *args, **kwargs)
        layer = self.layers[part]
        weight = self.rotated_weight(part).to(x.dtype)
        if isinstance(layer, nn.Conv2d):
            return F.conv2d(x, weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)
        return F.linear(x, weight, layer.bias)

    def apply_to(self) -> None:
        if self._org_forwards is not None:
            return
        self._org_forwards = []
        for part, layer in enumerate(self.layers):
            self._org_forwards.append(layer.forward)
            layer.forward = (lambda p: lambda x, *a, **k: self._forward(p, x, *a, **k))(part)

    def restore(self) -> None:
        if self._org_forwards is None:
            return
        for layer in self.layers:
            if "forward" in layer.__dict__:
                del layer.forward
        self._org_forwards = None

    @torch.no_grad()
    def merge(self) -> None:
        """Write the rotated weights into the layers and restore their forwards."""
        self.restore()
        for part, layer in enumerate(self.layers):
            layer.weight.copy_(self.rotated_weight(part).to(layer.weight.dtype))


# ---- layers and their file names
def _file_modules(unet: nn.Module, family: str, *, include_conv: bool) -> tuple[dict[str, list[Target]], bool]:
    """file name -> its layers (fused parts in order), and whether the family's layout fuses any layer."""
    from .lora import family_naming

    naming = family_naming(family, unet)
    targets = unet_targets(unet, PREFIX, include_conv=include_conv, name_map=naming.get("unet_name_map"),
                           block_classes=naming.get("unet_block_classes"))
    grouped: dict[str, list[Target]] = defaultdict(list)
    for target in targets:
        grouped[target.lora_name].append(target)
    fuses = False
    for name, parts in grouped.items():
        if any(t.swap_halves for t in parts):
            raise NetworkError(f"{MODULE}: {name}: this model family's file layout stores the layer's output halves "
                               f"swapped, which OFT's row blocks cannot follow: use networks.lora")
        if parts[0].part is not None:
            fuses = True
            parts.sort(key=lambda t: t.part[0])
            if [t.part[0] for t in parts] != list(range(parts[0].part[1])):
                raise NetworkError(f"{MODULE}: {name}: only some of the layers the file fuses into it were found")
    return dict(grouped), fuses


def _in_attention(root: nn.Module, path: str) -> bool:
    """Is the layer at `path` inside an attention module (diffusers' Attention, FluxAttention, ...)?"""
    words = path.split(".")
    for i in range(1, len(words)):
        if type(root.get_submodule(".".join(words[:i]))).__name__.endswith("Attention"):
            return True
    return False


def _build(groups: dict[str, list[Target]], *, dim: int, alpha: float, multiplier: float,
           list_form: bool) -> list[OFTModule]:
    return [OFTModule(name, [t.module for t in parts], num_blocks=dim, alpha=alpha, multiplier=multiplier,
                      list_form=list_form) for name, parts in groups.items()]


def create_network(*, unet: nn.Module | None, text_encoders: Sequence[nn.Module], family: str,
                   network_dim: int | None, network_alpha: float | None, network_dropout: float | None = None,
                   network_args: Sequence[str] | dict[str, Any] | None = None, multiplier: float = 1.0,
                   train_unet: bool = True, train_text_encoder: bool = True) -> AdapterNetwork:
    """A new OFT network (defaults: 4 blocks, alpha 1e-3; attention layers only)."""
    args = parse_typed_args(network_args, NETWORK_ARG_TYPES, MODULE)
    if unet is None or not train_unet:
        raise NetworkError(f"{MODULE} adapts the denoiser only (sd-scripts' OFT has no text-encoder modules): "
                           f"remove network_train_text_encoder_only")
    dim = DEFAULT_DIM if network_dim is None else int(network_dim)
    if network_alpha is None:
        log.info("%s: network_alpha (the OFT constraint) is not set: using %g", MODULE, DEFAULT_ALPHA)
        alpha = DEFAULT_ALPHA
    else:
        alpha = float(network_alpha)
        if alpha >= 1:
            log.warning("%s: network_alpha %g is the OFT constraint and usually small (e.g. 1e-3)", MODULE, alpha)
    if network_dropout:
        log.warning("%s: OFT has no dropout; network_dropout %g is not used (as in sd-scripts)", MODULE,
                    network_dropout)
    all_linear, conv = bool(args.get("enable_all_linear")), bool(args.get("enable_conv"))
    groups, fuses = _file_modules(unet, family, include_conv=conv)
    if conv:
        plain, _ = _file_modules(unet, family, include_conv=False)
        if set(plain) == set(groups):
            raise NetworkError(f"option 'network_args': enable_conv for {MODULE}: this model's denoiser has no "
                               f"convolution blocks to adapt; remove it")
    else:
        plain = groups
    chosen = {name: parts for name, parts in groups.items()
              if name not in plain or all_linear or all(_in_attention(unet, t.module_path) for t in parts)}
    modules = _build(chosen, dim=dim, alpha=alpha, multiplier=multiplier, list_form=fuses)
    if train_text_encoder and text_encoders:
        log.info("%s: the text encoders are not adapted (OFT trains the denoiser only)", MODULE)
    return AdapterNetwork([], modules, multiplier=multiplier, module=MODULE)


def create_network_from_weights(path: str | os.PathLike, *, unet: nn.Module | None,
                                text_encoders: Sequence[nn.Module], family: str, multiplier: float = 1.0,
                                train_unet: bool = True, train_text_encoder: bool = True) -> AdapterNetwork:
    """An OFT network shaped like the file (its layers, number of blocks and constraint), weights loaded."""
    if unet is None or not train_unet:
        raise NetworkError(f"{path}: an OFT file adapts the denoiser only: remove network_train_text_encoder_only")
    tensors, _ = load_weights_file(path)
    names = sorted({k.split(".", 1)[0] for k in tensors if ".oft_blocks" in k})
    if not names:
        raise NetworkError(f"{path}: no '<name>.oft_blocks' tensors: not an sd-scripts OFT file")
    groups, fuses = _file_modules(unet, family, include_conv=True)
    unknown = [n for n in names if n not in groups]
    if unknown:
        raise NetworkError(f"{path}: {len(unknown)} modules (e.g. {unknown[0]!r}) have no matching layer in this "
                           f"model: the file was made for another model family or layout")
    list_form = any(k.endswith(".oft_blocks.0") for k in tensors)
    modules = []
    for name in names:
        blocks = tensors.get(f"{name}.oft_blocks", tensors.get(f"{name}.oft_blocks.0"))
        alpha = tensors.get(f"{name}.alpha")
        modules.append(OFTModule(name, [t.module for t in groups[name]], num_blocks=int(blocks.shape[0]),
                                 alpha=DEFAULT_ALPHA if alpha is None else float(alpha.float()),
                                 multiplier=multiplier, list_form=list_form or fuses))
    network = AdapterNetwork([], modules, multiplier=multiplier, module=MODULE)
    network.load_weights(path)
    return network
