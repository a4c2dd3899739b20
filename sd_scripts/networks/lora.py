"""kohya-format LoRA / LoCon network for Stable Diffusion U-Nets and CLIP text encoders.

`networks.lora` in sd-scripts command lines resolves here (see registry.py). The file layout, names and defaults are
in FORMATS.md ('LoRA file'); files made here load in diffusers, AUTOMATIC1111, ComfyUI and sd-scripts, and theirs here.

    network = create_network(unet=unet, text_encoders=[te], family=bundle.family, network_dim=8, network_alpha=4,
                             network_dropout=None, network_args=["conv_dim=4"])
    network.apply_to()
    groups, names = network.prepare_optimizer_params(unet_lr=1e-4, text_encoder_lr=5e-5, default_lr=1e-4)
    ...
    network.save_weights("out/my_lora.safetensors", dtype=torch.float16, metadata={...})
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..errors import NetworkError
from .lora_module import LoRAModule
from .targets import Target, text_encoder_targets, unet_targets
from .weights_file import load_weights_file, save_weights_file

UNET_PREFIX = "lora_unet"


@dataclass
class LoadInfo:
    """What `load_weights` found: file keys the network has no place for, and network keys the file lacks."""

    path: str
    loaded_modules: int
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)


class LoRANetwork(nn.Module):
    """All LoRA modules of one network. Building it changes nothing in the base model; `apply_to()` does."""

    def __init__(self, unet: nn.Module | None, text_encoders: Sequence[nn.Module], *, dim: int = 4,
                 alpha: float | None = 1.0, conv_dim: int | None = None, conv_alpha: float | None = None,
                 dropout: float | None = None, rank_dropout: float | None = None,
                 module_dropout: float | None = None, multiplier: float = 1.0, train_unet: bool = True,
                 train_text_encoder: bool = True, unet_prefix: str = UNET_PREFIX,
                 te_prefixes: Sequence[str] = ("lora_te",), unet_name_map: Callable[[str], str] | None = None,
                 modules_dim: dict[str, int] | None = None, modules_alpha: dict[str, float] | None = None):
        super().__init__()
        if len(te_prefixes) < len(text_encoders):
            raise ValueError(f"{len(text_encoders)} text encoders but only {len(te_prefixes)} prefixes")
        self.multiplier: float | torch.Tensor = float(multiplier)
        self.dim, self.alpha = int(dim), alpha
        self.conv_dim = None if conv_dim is None else int(conv_dim)
        self.conv_alpha = 1.0 if self.conv_dim is not None and conv_alpha is None else conv_alpha
        self._module_options = dict(multiplier=self.multiplier, dropout=dropout, rank_dropout=rank_dropout,
                                    module_dropout=module_dropout)
        self._modules_dim, self._modules_alpha = modules_dim, modules_alpha or {}
        from_file = modules_dim is not None

        te_loras: list[LoRAModule] = []
        if train_text_encoder or from_file:
            for te, prefix in zip(text_encoders, te_prefixes):
                if te is not None:  # a missing encoder keeps the others' prefixes (SDXL te1/te2)
                    te_loras += self._create(text_encoder_targets(te, prefix))
        unet_loras: list[LoRAModule] = []
        if unet is not None and (train_unet or from_file):
            include_conv = from_file or self.conv_dim is not None
            unet_loras = self._create(unet_targets(unet, unet_prefix, include_conv=include_conv,
                                                   name_map=unet_name_map))
        # Registered under their file names, so state_dict() keys are exactly the file's keys.
        self.text_encoder_loras: list[LoRAModule] = te_loras
        self.unet_loras: list[LoRAModule] = unet_loras
        for lora in te_loras + unet_loras:
            self.add_module(lora.lora_name, lora)
        if from_file:
            known = {m.lora_name for m in self.all_loras()}
            unknown = sorted(set(modules_dim) - known)
            if unknown:
                raise NetworkError(f"LoRA weights: {len(unknown)} modules (e.g. {unknown[0]!r}) have no matching layer "
                                   f"in this model: the file was made for another model family or layout")

    def _create(self, targets: list[Target]) -> list[LoRAModule]:
        loras = []
        for target in targets:
            if self._modules_dim is not None:
                if target.lora_name not in self._modules_dim:
                    continue
                rank = self._modules_dim[target.lora_name]
                alpha = self._modules_alpha.get(target.lora_name)
            elif target.is_conv_kxk:
                if self.conv_dim is None:
                    continue
                rank, alpha = self.conv_dim, self.conv_alpha
            else:
                rank, alpha = self.dim, self.alpha
            loras.append(LoRAModule(target.lora_name, target.module, rank=rank, alpha=alpha, **self._module_options))
        return loras

    # ---- structure
    def all_loras(self) -> list[LoRAModule]:
        return list(self.text_encoder_loras) + list(self.unet_loras)

    def apply_to(self) -> None:
        """Route every wrapped layer's forward through its LoRA (the base model is not copied)."""
        for lora in self.all_loras():
            lora.apply()

    def unapply(self) -> None:
        """Restore every wrapped layer's original forward; the LoRA modules stay as they are."""
        for lora in self.all_loras():
            lora.restore()

    @torch.no_grad()
    def merge_into_base(self) -> None:
        """Fold each update into its base weight (W += up@down * multiplier * alpha/rank) and restore forwards."""
        for lora in self.all_loras():
            lora.merge()

    def set_multiplier(self, multiplier: float | Sequence[float] | torch.Tensor) -> None:
        """One strength for all samples, or one per sample of the next batch (a [batch] tensor or list)."""
        if isinstance(multiplier, (int, float)):
            value: float | torch.Tensor = float(multiplier)
        else:
            value = torch.as_tensor(multiplier, dtype=torch.float32).flatten()
        self.multiplier = value
        for lora in self.all_loras():
            lora.multiplier = value

    # ---- optimizer
    def prepare_optimizer_params(self, unet_lr: float | None, text_encoder_lr: float | None,
                                 default_lr: float) -> tuple[list[dict[str, Any]], list[str]]:
        """Parameter groups with their learning rates and names ('unet', 'textencoder'); empty parts are left out."""
        groups: list[dict[str, Any]] = []
        names: list[str] = []
        for loras, lr, name in ((self.unet_loras, unet_lr, "unet"),
                                (self.text_encoder_loras, text_encoder_lr, "textencoder")):
            params = [p for lora in loras for p in lora.parameters()]
            if params:
                groups.append({"params": params, "lr": default_lr if lr is None else lr})
                names.append(name)
        return groups, names

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # type: ignore[override]
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        for lora in self.all_loras():
            lora.sync_alpha()
        return result

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """`<name>.lora_down.weight`, `<name>.lora_up.weight`, `<name>.alpha` for every module (= state_dict())."""
        return {k: v.detach() for k, v in self.state_dict().items()}

    # ---- files
    def save_weights(self, path: str | os.PathLike, dtype: torch.dtype | None = None,
                     metadata: dict[str, str] | None = None) -> None:
        """Atomic write: .safetensors (with metadata and sshs_* hashes when metadata is given), else torch.save."""
        tensors = {k: (v if dtype is None else v.to(dtype)).detach().cpu().contiguous()
                   for k, v in self.lora_state_dict().items()}
        save_weights_file(tensors, path, metadata)

    def load_weights(self, path: str | os.PathLike) -> LoadInfo:
        """Load a LoRA file into this network. Shape mismatches and files sharing no module are NetworkErrors."""
        tensors, metadata = load_weights_file(path)
        own = self.lora_state_dict()
        matched = {}
        for key, value in tensors.items():
            if key not in own:
                continue
            target = own[key]
            if tuple(value.shape) != tuple(target.shape):
                raise NetworkError(f"{path}: {key} has shape {list(value.shape)} but this network needs "
                                   f"{list(target.shape)}: use a file made with the same rank/conv_dim and model "
                                   f"family, or set dim_from_weights")
            matched[key] = value
        unexpected = sorted(set(tensors) - set(own))
        if not matched:
            raise NetworkError(f"{path}: none of its {len(tensors)} tensors is a LoRA module of this network: the "
                               f"file was made for another model family or is not a kohya-format LoRA")
        missing = sorted(k for k in own if k not in matched and not k.endswith(".alpha"))
        with torch.no_grad():
            for lora in self.all_loras():
                for suffix, tensor in (("lora_down.weight", lora.lora_down.weight),
                                       ("lora_up.weight", lora.lora_up.weight), ("alpha", lora.alpha)):
                    value = matched.get(f"{lora.lora_name}.{suffix}")
                    if value is not None:
                        tensor.copy_(value.to(tensor.dtype))
                lora.sync_alpha()
        loaded = len({k.split(".", 1)[0] for k in matched})
        return LoadInfo(str(path), loaded, missing, unexpected, metadata)


# ---- factories (the names sd-scripts' trainers call)
NETWORK_ARG_TYPES: dict[str, Callable[[str], Any]] = {
    "conv_dim": int, "conv_alpha": float, "rank_dropout": float, "module_dropout": float,
}


def parse_network_args(network_args: Sequence[str] | dict[str, Any] | None) -> dict[str, Any]:
    """['conv_dim=4', 'conv_alpha=1'] -> {'conv_dim': 4, 'conv_alpha': 1.0}; unknown keys are NetworkErrors."""
    items = network_args.items() if isinstance(network_args, dict) else []
    if not isinstance(network_args, dict):
        pairs = []
        for item in network_args or []:
            if "=" not in item:
                raise NetworkError(f"option 'network_args': {item!r} is not key=value (e.g. conv_dim=4)")
            key, value = item.split("=", 1)
            pairs.append((key.strip(), value.strip()))
        items = pairs
    out: dict[str, Any] = {}
    for key, value in items:
        if key not in NETWORK_ARG_TYPES:
            raise NetworkError(f"option 'network_args': unknown key {key!r}; supported: "
                               f"{', '.join(NETWORK_ARG_TYPES)}")
        if value is None or str(value).strip().lower() in ("", "none"):
            out[key] = None
            continue
        try:
            out[key] = NETWORK_ARG_TYPES[key](value)
        except (TypeError, ValueError):
            raise NetworkError(f"option 'network_args': {key}={value!r} is not a "
                               f"{NETWORK_ARG_TYPES[key].__name__}") from None
    return out


def family_naming(family: str, unet: nn.Module | None = None) -> dict[str, Any]:
    """unet_prefix, te_prefixes and unet_name_map of a model family, from the family itself (names follow the block
    layout of `unet` when given)."""
    from ..families import family_class

    try:
        cls = family_class(family)
    except ValueError as e:
        raise NetworkError(f"networks.lora: {e}") from None
    return cls.lora_naming(family, unet)


def create_network(*, unet: nn.Module | None, text_encoders: Sequence[nn.Module], family: str,
                   network_dim: int | None, network_alpha: float | None, network_dropout: float | None = None,
                   network_args: Sequence[str] | dict[str, Any] | None = None, multiplier: float = 1.0,
                   train_unet: bool = True, train_text_encoder: bool = True) -> LoRANetwork:
    """A new network from training options (defaults: rank 4, alpha 1; conv_alpha 1 when conv_dim is set)."""
    extra = parse_network_args(network_args)
    return LoRANetwork(unet, list(text_encoders), dim=4 if network_dim is None else network_dim,
                       alpha=1.0 if network_alpha is None else network_alpha, dropout=network_dropout,
                       multiplier=multiplier, train_unet=train_unet, train_text_encoder=train_text_encoder,
                       **extra, **family_naming(family, unet))


def _dims_from_tensors(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, int], dict[str, float]]:
    dims, alphas = {}, {}
    for key, value in tensors.items():
        name, _, suffix = key.partition(".")
        if suffix == "lora_down.weight":
            dims[name] = int(value.shape[0])
        elif suffix == "alpha":
            alphas[name] = float(value.float())
    for name, dim in dims.items():
        if alphas.get(name, 0) <= 0:
            alphas[name] = float(dim)
    return dims, {n: a for n, a in alphas.items() if n in dims}


def create_network_from_weights(path: str | os.PathLike, *, unet: nn.Module | None,
                                text_encoders: Sequence[nn.Module], family: str, multiplier: float = 1.0,
                                train_unet: bool = True, train_text_encoder: bool = True) -> LoRANetwork:
    """A network shaped like the file (rank and alpha per module), with the file's weights loaded.

    train_unet / train_text_encoder False leave that part's modules out (as network_train_*_only do)."""
    tensors, _ = load_weights_file(path)
    dims, alphas = _dims_from_tensors(tensors)
    if not dims:
        raise NetworkError(f"{path}: no '<name>.lora_down.weight' tensors: not a kohya-format LoRA file")
    naming = family_naming(family, unet)
    keep = [p for p, on in ((naming["unet_prefix"] + "_", train_unet), ("lora_te", train_text_encoder)) if on]
    dims = {n: d for n, d in dims.items() if n.startswith(tuple(keep))}
    if not dims:
        raise NetworkError(f"{path}: has no modules for the part being trained (network_train_unet_only / "
                           f"network_train_text_encoder_only)")
    try:
        network = LoRANetwork(unet, list(text_encoders), multiplier=multiplier, modules_dim=dims,
                              modules_alpha=alphas, **naming)
    except NetworkError as e:
        raise NetworkError(f"{path}: {e}") from None
    network.load_weights(path)
    return network


def read_network_dims(path: str | os.PathLike) -> dict[str, Any]:
    """Summary of a LoRA file: module counts, rank/alpha sets for linear and conv modules, per-module dims."""
    tensors, metadata = load_weights_file(path)
    dims, alphas = _dims_from_tensors(tensors)
    conv_kxk = {n for n in dims if tensors[f"{n}.lora_down.weight"].dim() == 4
                and tuple(tensors[f"{n}.lora_down.weight"].shape[2:]) != (1, 1)}
    return {
        "modules": len(dims),
        "unet_modules": sum(1 for n in dims if n.startswith(UNET_PREFIX + "_")),
        "text_encoder_modules": sum(1 for n in dims if n.startswith("lora_te")),
        "dims": sorted({d for n, d in dims.items() if n not in conv_kxk}),
        "alphas": sorted({a for n, a in alphas.items() if n not in conv_kxk}),
        "conv_dims": sorted({dims[n] for n in conv_kxk}),
        "conv_alphas": sorted({alphas[n] for n in conv_kxk}),
        "module_dims": dims,
        "module_alphas": alphas,
        "metadata": metadata,
    }
