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

import logging
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
                 te_prefixes: Sequence[str] = ("lora_te",), unet_name_map: Callable[[str], Any] | None = None,
                 modules_dim: dict[str, int] | None = None, modules_alpha: dict[str, float] | None = None,
                 unet_block_classes: Sequence[str] | None = None, te_block_classes: Sequence[str] | None = None,
                 te_enabled: Sequence[bool] | None = None, shared_down: bool = True,
                 unet_extra_name_map: Callable[[str], Any] | None = None,
                 module_rank: Callable[[str], int | None] | None = None, verbose: bool = False):
        super().__init__()
        self.shared_down = bool(shared_down) or modules_dim is not None  # a file's fused modules load as shared
        if len(te_prefixes) < len(text_encoders):
            raise ValueError(f"{len(text_encoders)} text encoders but only {len(te_prefixes)} prefixes")
        self.multiplier: float | torch.Tensor = float(multiplier)
        self.dim, self.alpha = int(dim), alpha
        self.conv_dim = None if conv_dim is None else int(conv_dim)
        self.conv_alpha = 1.0 if self.conv_dim is not None and conv_alpha is None else conv_alpha
        self._module_options = dict(multiplier=self.multiplier, dropout=dropout, rank_dropout=rank_dropout,
                                    module_dropout=module_dropout)
        self._modules_dim, self._modules_alpha = modules_dim, modules_alpha or {}
        self._module_rank = module_rank  # file name -> rank (0: leave the layer out) or None (the default rule)
        self.skipped: list[str] = []  # layers a rank of 0 left out
        from_file = modules_dim is not None

        te_loras: list[LoRAModule] = []
        if train_text_encoder or from_file:
            enabled = list(te_enabled) if te_enabled is not None else [True] * len(text_encoders)
            for te, prefix, on in zip(text_encoders, te_prefixes, enabled):
                if te is not None and (on or from_file):  # a missing encoder keeps the others' prefixes
                    te_loras += self._create(text_encoder_targets(te, prefix, te_block_classes))
        unet_loras: list[LoRAModule] = []
        if unet is not None and (train_unet or from_file):
            include_conv = from_file or self.conv_dim is not None
            unet_loras = self._create(unet_targets(unet, unet_prefix, include_conv=include_conv,
                                                   name_map=unet_name_map, block_classes=unet_block_classes,
                                                   extra_name_map=unet_extra_name_map))
        # Registered under their file names, so state_dict() keys are exactly the file's keys (a part of a fused
        # file module under '<name>_part<i>'; lora_state_dict() gives the file's form).
        self.text_encoder_loras: list[LoRAModule] = te_loras
        self.unet_loras: list[LoRAModule] = unet_loras
        self._fused: dict[str, list[LoRAModule]] = {}
        for lora in te_loras + unet_loras:
            part = getattr(lora, "part", None)
            if part is None:
                self.add_module(lora.lora_name, lora)
                continue
            self.add_module(f"{lora.lora_name}_part{part[0]}", lora)
            self._fused.setdefault(lora.lora_name, []).append(lora)
        for name, parts in self._fused.items():
            parts.sort(key=lambda m: m.part[0])
            if [m.part[0] for m in parts] != list(range(parts[0].part[1])):
                raise NetworkError(f"{name}: the fused module's parts are incomplete (only {len(parts)} of "
                                   f"{parts[0].part[1]} layers adapted)")
            if self.shared_down:  # one down projection for all parts (sd-scripts' layout of a fused layer)
                for other in parts[1:]:
                    if other.rank != parts[0].rank or other.lora_down.weight.shape != parts[0].lora_down.weight.shape:
                        raise NetworkError(f"{name}: the parts of a fused module need one rank")
                    other.lora_down = parts[0].lora_down
        if verbose:  # sd-scripts' `verbose` network arg: every module's rank and alpha, then the layers left out
            log = logging.getLogger("sd_scripts.train")
            for lora in te_loras + unet_loras:
                log.info("  %-60s rank %d, alpha %g", lora.lora_name, lora.rank, float(lora.alpha))
            for name in self.skipped:
                log.info("  %-60s left out (rank 0)", name)
        if from_file:
            known = {m.lora_name for m in self.all_loras()}
            unknown = sorted(set(modules_dim) - known)
            if unknown:
                raise NetworkError(f"LoRA weights: {len(unknown)} modules (e.g. {unknown[0]!r}) have no matching layer "
                                   f"in this model: the file was made for another model family or layout")

    def _create(self, targets: list[Target]) -> list[LoRAModule]:
        loras = []
        for target in targets:
            override = None if self._modules_dim is not None or self._module_rank is None else \
                self._module_rank(target.lora_name)
            if self._modules_dim is not None:
                if target.lora_name not in self._modules_dim:
                    continue
                rank = self._modules_dim[target.lora_name]
                alpha = self._modules_alpha.get(target.lora_name)
            elif override is not None:  # the family's per-layer rank (sd-scripts' *_dim / in_dims network_args)
                rank, alpha = int(override), self.alpha
            elif target.is_conv_kxk:
                if self.conv_dim is None:
                    continue
                rank, alpha = self.conv_dim, self.conv_alpha
            else:
                rank, alpha = self.dim, self.alpha
            if rank == 0:
                self.skipped.append(target.lora_name)
                continue
            lora = LoRAModule(target.lora_name, target.module, rank=rank, alpha=alpha, **self._module_options)
            if target.part is not None:
                lora.part = target.part
            lora.swap_halves = target.swap_halves
            loras.append(lora)
        return loras

    # ---- structure
    def all_loras(self) -> list[LoRAModule]:
        return list(self.text_encoder_loras) + list(self.unet_loras)

    def apply_to(self) -> None:
        """Route every wrapped layer's forward through its LoRA (the base model is not copied)."""
        for lora in self.all_loras():
            lora.apply_to()

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
            params = list({id(p): p for lora in loras for p in lora.parameters()}.values())  # shared downs once
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
        """`<name>.lora_down.weight`, `<name>.lora_up.weight`, `<name>.alpha` for every file module (= state_dict()
        when no layer is fused). A fused module (several layers, one file name) is written as one: shared down
        [r, in] with the parts' ups stacked [sum out, r] and the common alpha; or, with a down per part (split),
        the downs stacked [sum r, in], the ups block-diagonal [sum out, sum r] and alpha = sum r x alpha/r, so
        alpha / rank (the scale) is unchanged and any kohya LoRA reader computes the same update."""
        if not self._fused and not any(getattr(m, "swap_halves", False) for m in self.all_loras()):
            return {k: v.detach() for k, v in self.state_dict().items()}
        out: dict[str, torch.Tensor] = {}
        for lora in self.all_loras():
            part = getattr(lora, "part", None)
            if part is None:
                for suffix, tensor in (("lora_down.weight", lora.lora_down.weight),
                                       ("lora_up.weight", _file_rows(lora, lora.lora_up.weight)),
                                       ("alpha", lora.alpha)):
                    out[f"{lora.lora_name}.{suffix}"] = tensor.detach()
            elif part[0] == 0:
                out.update(self._fused_tensors(lora.lora_name, self._fused[lora.lora_name]))
        return out

    def _fused_tensors(self, name: str, parts: list[LoRAModule]) -> dict[str, torch.Tensor]:
        ups = [m.lora_up.weight.detach() for m in parts]
        if parts[0].lora_down is parts[-1].lora_down:  # shared down
            return {f"{name}.lora_down.weight": parts[0].lora_down.weight.detach(),
                    f"{name}.lora_up.weight": torch.cat(ups, dim=0), f"{name}.alpha": parts[0].alpha.detach()}
        downs = [m.lora_down.weight.detach() for m in parts]
        total = sum(m.rank for m in parts)
        return {f"{name}.lora_down.weight": torch.cat(downs, dim=0),
                f"{name}.lora_up.weight": torch.block_diag(*ups),
                f"{name}.alpha": torch.tensor(total * parts[0].scale, dtype=parts[0].alpha.dtype)}

    @torch.no_grad()
    def _load_fused(self, path: str, name: str, parts: list[LoRAModule], down: torch.Tensor | None,
                    up: torch.Tensor | None, alpha: torch.Tensor | None) -> None:
        """Put a file's fused module into the parts: sd-scripts' shared-down form (down [r, in], up [sum out, r])
        or the block-diagonal form this network writes with split downs."""
        outs = [m.lora_up.weight.shape[0] for m in parts]
        if up is not None and up.shape[0] != sum(outs):
            raise NetworkError(f"{path}: {name}.lora_up.weight has {up.shape[0]} rows but the layers it adapts have "
                               f"{sum(outs)}: the file was made for another model")
        rank = down.shape[0] if down is not None else (up.shape[1] if up is not None else None)
        shared = parts[0].lora_down is parts[-1].lora_down
        rows = torch.split(torch.arange(sum(outs)), outs)
        if shared or rank == parts[0].rank:  # every part takes the whole down and its rows of up
            if rank is not None and rank != parts[0].rank:
                raise NetworkError(f"{path}: {name} has rank {rank} but this network needs {parts[0].rank}: use a "
                                   f"file made with the same rank, or set dim_from_weights")
            for i, m in enumerate(parts):
                if down is not None:
                    m.lora_down.weight.copy_(down.to(m.lora_down.weight.dtype))
                if up is not None:
                    m.lora_up.weight.copy_(up[rows[i]].to(m.lora_up.weight.dtype))
                if alpha is not None:
                    m.alpha.copy_(alpha.float())
                m.sync_alpha()
            return
        ranks = [m.rank for m in parts]
        if rank != sum(ranks):
            raise NetworkError(f"{path}: {name} has rank {rank}; this network (split_qkv) needs {sum(ranks)} "
                               f"(block-diagonal) or {ranks[0]} (shared down): use a matching file or "
                               f"dim_from_weights")
        cols = torch.split(torch.arange(rank), ranks)
        if up is not None:
            mask = torch.ones_like(up, dtype=torch.bool)
            for r, c in zip(rows, cols):
                mask[r[0]:r[-1] + 1, c[0]:c[-1] + 1] = False
            if up[mask].abs().max().item() != 0:
                raise NetworkError(f"{path}: {name} is not block-diagonal, so its parts cannot be split: load it "
                                   f"without split_qkv (or with dim_from_weights)")
        scale = float(alpha) / rank if alpha is not None and float(alpha) > 0 else 1.0
        for i, m in enumerate(parts):
            if down is not None:
                m.lora_down.weight.copy_(down[cols[i]].to(m.lora_down.weight.dtype))
            if up is not None:
                m.lora_up.weight.copy_(up[rows[i]][:, cols[i]].to(m.lora_up.weight.dtype))
            m.alpha.fill_(scale * m.rank)
            m.sync_alpha()

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
            if key.rsplit(".", 2)[0].split(".")[0] in self._fused:  # checked by _load_fused (two file forms)
                matched[key] = value
                continue
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
        for name, parts in self._fused.items():
            self._load_fused(str(path), name, parts, *(matched.get(f"{name}.{suffix}") for suffix in
                                                         ("lora_down.weight", "lora_up.weight", "alpha")))
        with torch.no_grad():
            for lora in self.all_loras():
                if getattr(lora, "part", None) is not None:
                    continue
                for suffix, tensor in (("lora_down.weight", lora.lora_down.weight),
                                       ("lora_up.weight", lora.lora_up.weight), ("alpha", lora.alpha)):
                    value = matched.get(f"{lora.lora_name}.{suffix}")
                    if value is not None:
                        tensor.copy_((_file_rows(lora, value) if suffix == "lora_up.weight" else value)
                                     .to(tensor.dtype))
                lora.sync_alpha()
        loaded = len({k.split(".", 1)[0] for k in matched})
        return LoadInfo(str(path), loaded, missing, unexpected, metadata)


def _file_rows(lora: LoRAModule, up: torch.Tensor) -> torch.Tensor:
    """The up weight's output rows in the other layout's order when the file stores the layer's two output halves
    the other way round (its own inverse); unchanged otherwise."""
    if not getattr(lora, "swap_halves", False):
        return up
    half = up.shape[0] // 2
    return torch.cat([up[half:], up[:half]], dim=0)


# ---- factories (the names sd-scripts' trainers call)
NETWORK_ARG_TYPES: dict[str, Callable[[str], Any]] = {
    "conv_dim": int, "conv_alpha": float, "rank_dropout": float, "module_dropout": float,
}


def parse_network_args(network_args: Sequence[str] | dict[str, Any] | None,
                       extra_types: dict[str, Callable[[str], Any]] | None = None) -> dict[str, Any]:
    """['conv_dim=4', 'conv_alpha=1'] -> {'conv_dim': 4, 'conv_alpha': 1.0}; unknown keys are NetworkErrors.
    `extra_types`: the family's own keys (Family.LORA_NETWORK_ARGS)."""
    types = dict(NETWORK_ARG_TYPES, **(extra_types or {}))
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
        if key not in types:
            raise NetworkError(f"option 'network_args': unknown key {key!r}; supported: "
                               f"{', '.join(types)}")
        if value is None or str(value).strip().lower() in ("", "none"):
            out[key] = None
            continue
        try:
            out[key] = types[key](value)
        except (TypeError, ValueError):
            raise NetworkError(f"option 'network_args': {key}={value!r} is not a "
                               f"{getattr(types[key], '__name__', 'valid value')}") from None
    return out


def _family_class(family: str):
    from ..families import family_class

    try:
        return family_class(family)
    except ValueError as e:
        raise NetworkError(f"networks.lora: {e}") from None


def family_naming(family: str, unet: nn.Module | None = None,
                  family_args: dict[str, Any] | None = None) -> dict[str, Any]:
    """unet_prefix, te_prefixes and unet_name_map of a model family (and the optional keys of Family.lora_naming),
    from the family itself (names follow the block layout of `unet` when given; `family_args` are the family's own
    network_args)."""
    cls = _family_class(family)
    if cls.LORA_NETWORK_ARGS:
        return cls.lora_naming(family, unet, network_args=family_args or {})
    return cls.lora_naming(family, unet)


def create_network(*, unet: nn.Module | None, text_encoders: Sequence[nn.Module], family: str,
                   network_dim: int | None, network_alpha: float | None, network_dropout: float | None = None,
                   network_args: Sequence[str] | dict[str, Any] | None = None, multiplier: float = 1.0,
                   train_unet: bool = True, train_text_encoder: bool = True) -> LoRANetwork:
    """A new network from training options (defaults: rank 4, alpha 1; conv_alpha 1 when conv_dim is set)."""
    own_keys = _family_class(family).LORA_NETWORK_ARGS
    extra = parse_network_args(network_args, own_keys)
    family_args = {k: extra.pop(k) for k in list(extra) if k in own_keys}
    naming = family_naming(family, unet, family_args)
    naming.pop("unet_file_name_map", None)  # for loading files only
    return LoRANetwork(unet, list(text_encoders), dim=4 if network_dim is None else network_dim,
                       alpha=1.0 if network_alpha is None else network_alpha, dropout=network_dropout,
                       multiplier=multiplier, train_unet=train_unet, train_text_encoder=train_text_encoder,
                       **extra, **naming)


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
    naming.pop("te_enabled", None)  # the file says which text encoders have modules
    naming.pop("shared_down", None)  # a fused file module loads as one shared-down module (exact for both forms)
    naming.pop("module_rank", None)  # the file says each module's rank
    naming["unet_extra_name_map"] = naming.pop("unet_file_name_map", None) or naming.get("unet_extra_name_map")
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
