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
from . import block_weights
from .block_weights import BlockRanks, UNetBlocks
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
    """All LoRA modules of one network. Building it changes nothing in the base model; `apply_to()` does.
    Variants (networks.dylora, networks.lora_fa) set `module_class`: the LoRAModule subclass made per layer."""

    module_class: Callable[..., LoRAModule] = LoRAModule

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
                 module_rank: Callable[[str], int | None] | None = None, verbose: bool = False,
                 unet_blocks: UNetBlocks | None = None, block_ranks: BlockRanks | None = None,
                 module_lr: Callable[[str], float | None] | None = None):
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
        self._module_lr = module_lr  # file name -> the U-Net module's own learning rate, or None (network_reg_lrs)
        # sd-scripts' block-wise network_args: the family's U-Net block numbering, ranks per block, lr weights
        self.unet_blocks, self._block_ranks = unet_blocks, block_ranks
        if block_ranks is not None and unet_blocks is None:
            raise ValueError("block_ranks need unet_blocks (the family's block numbering)")
        self.block_lr_weight: list[float] | None = None
        self.loraplus_lr_ratio = self.loraplus_unet_lr_ratio = self.loraplus_text_encoder_lr_ratio = None
        self.skipped: list[str] = []  # layers a rank of 0 left out
        from_file = modules_dim is not None

        te_loras: list[LoRAModule] = []
        if train_text_encoder or from_file:
            enabled = list(te_enabled) if te_enabled is not None else [True] * len(text_encoders)
            for index, (te, prefix, on) in enumerate(zip(text_encoders, te_prefixes, enabled)):
                if te is not None and (on or from_file):  # a missing encoder keeps the others' prefixes
                    created = self._create(text_encoder_targets(te, prefix, te_block_classes))
                    for lora in created:
                        lora.te_index = index  # which text_encoder_lr applies (one per encoder)
                    te_loras += created
        unet_loras: list[LoRAModule] = []
        if unet is not None and (train_unet or from_file):
            include_conv = from_file or self.conv_dim is not None or \
                (block_ranks is not None and block_ranks.conv_dims is not None)
            unet_loras = self._create(unet_targets(unet, unet_prefix, include_conv=include_conv,
                                                   name_map=unet_name_map, block_classes=unet_block_classes,
                                                   extra_name_map=unet_extra_name_map), unet=True)
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

    def _create(self, targets: list[Target], unet: bool = False) -> list[LoRAModule]:
        loras = []
        for target in targets:
            per_block = None
            if unet and self._block_ranks is not None and self._modules_dim is None:
                block = self.unet_blocks.index(target.lora_name)
                if not 0 <= block < self.unet_blocks.count:
                    raise NetworkError(f"network_args block_dims: {target.lora_name} is in none of the model's "
                                       f"{self.unet_blocks.count} U-Net blocks")
                per_block = self._block_ranks.rank_and_alpha(block, target.is_conv_kxk)
                if per_block is None:  # a 3x3 conv without conv ranks: not adapted
                    continue
            override = None if self._modules_dim is not None or self._module_rank is None else \
                self._module_rank(target.lora_name)
            if self._modules_dim is not None:
                if target.lora_name not in self._modules_dim:
                    continue
                rank = self._modules_dim[target.lora_name]
                alpha = self._modules_alpha.get(target.lora_name)
            elif per_block is not None:  # block_dims / block_alphas / conv_block_dims / conv_block_alphas
                rank, alpha = per_block
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
            lora = self.module_class(target.lora_name, target.module, rank=rank, alpha=alpha, **self._module_options)
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
    def set_block_lr_weight(self, weights: Sequence[float] | None) -> None:
        """Learning-rate weight per U-Net block (sd-scripts' down/mid/up_lr_weight, see block_weights.py)."""
        if weights is not None and (self.unet_blocks is None or len(weights) != self.unet_blocks.count):
            raise ValueError("block lr weights need the family's U-Net block numbering and one weight per block")
        self.block_lr_weight = None if weights is None else [float(w) for w in weights]

    def set_loraplus_lr_ratio(self, ratio: float | None, unet_ratio: float | None = None,
                              text_encoder_ratio: float | None = None) -> None:
        """LoRA+: the up weights learn `ratio` times faster (a part's own ratio wins over the shared one)."""
        self.loraplus_lr_ratio, self.loraplus_unet_lr_ratio = ratio, unet_ratio
        self.loraplus_text_encoder_lr_ratio = text_encoder_ratio

    def prepare_optimizer_params(self, unet_lr: float | None, text_encoder_lr: float | Sequence[float] | None,
                                 default_lr: float) -> tuple[list[dict[str, Any]], list[str]]:
        """Parameter groups with their learning rates and names, as sd-scripts makes them: 'unet', 'textencoder';
        with block lr weights one U-Net group per block ('unet_block<N>', lr x the block's weight); with LoRA+ the
        up weights in their own group ('<name> plus', lr x ratio); `text_encoder_lr` may list one rate per text
        encoder ('textencoder1', ... when they differ). Empty groups and groups whose rate is 0 are left out (their
        parameters are not trained)."""
        groups: list[dict[str, Any]] = []
        names: list[str] = []

        def add(loras: list[LoRAModule], lr: float, name: str, ratio: float | None) -> None:
            plain: dict[int, torch.nn.Parameter] = {}
            plus: dict[int, torch.nn.Parameter] = {}
            for lora in loras:  # a shared down (fused module) once; frozen ones (LoRA-FA's down) not at all
                for part, param in lora.named_parameters():
                    if param.requires_grad:
                        up = part.startswith(("lora_up", "lora_B"))  # (DyLoRA keeps its up rows as lora_B)
                        (plus if ratio is not None and up else plain)[id(param)] = param
            for params, group_lr, group_name in ((plain, lr, name),
                                                 (plus, lr * (ratio or 1.0), name + " plus")):
                if not params:
                    continue
                if group_lr == 0:
                    for p in params.values():
                        p.requires_grad_(False)
                    continue
                groups.append({"params": list(params.values()), "lr": group_lr})
                names.append(group_name)

        unet_loras = self.unet_loras
        if unet_loras and self._module_lr is not None:  # modules with their own rate: a group per rate
            ratio = self.loraplus_unet_lr_ratio or self.loraplus_lr_ratio
            by_rate: dict[float, list[LoRAModule]] = {}
            for lora in unet_loras:
                rate = self._module_lr(lora.lora_name)
                if rate is not None:
                    by_rate.setdefault(float(rate), []).append(lora)
            for i, (rate, loras) in enumerate(by_rate.items()):
                add(loras, rate, f"unet_reg_lr{i}", ratio)
            chosen = {id(lora) for loras in by_rate.values() for lora in loras}
            unet_loras = [lora for lora in unet_loras if id(lora) not in chosen]
        if unet_loras:
            lr = default_lr if unet_lr is None else unet_lr
            ratio = self.loraplus_unet_lr_ratio or self.loraplus_lr_ratio
            if self.block_lr_weight is None:
                add(unet_loras, lr, "unet", ratio)
            else:
                by_block: dict[int, list[LoRAModule]] = {}
                for lora in unet_loras:
                    by_block.setdefault(self.unet_blocks.index(lora.lora_name), []).append(lora)
                for block in sorted(by_block):
                    inside = 0 <= block < len(self.block_lr_weight)
                    add(by_block[block], lr * (self.block_lr_weight[block] if inside else 1.0),
                        f"unet_block{block}" if inside else "unet", ratio)
        if self.text_encoder_loras:  # one rate per text encoder (the last repeating), as sd-scripts' lists
            rates = list(text_encoder_lr) if isinstance(text_encoder_lr, (list, tuple)) else [text_encoder_lr]
            rates = [default_lr if r is None else r for r in rates] or [default_lr]
            ratio = self.loraplus_text_encoder_lr_ratio or self.loraplus_lr_ratio
            by_encoder: dict[int, list[LoRAModule]] = {}
            for lora in self.text_encoder_loras:
                by_encoder.setdefault(getattr(lora, "te_index", 0), []).append(lora)
            rate_of = {i: rates[min(i, len(rates) - 1)] for i in by_encoder}
            if len(set(rate_of.values())) == 1:
                add(self.text_encoder_loras, next(iter(rate_of.values())), "textencoder", ratio)
            else:  # encoders with different rates: 'textencoder1', 'textencoder2', ...
                for i in sorted(by_encoder):
                    add(by_encoder[i], rate_of[i], f"textencoder{i + 1}", ratio)
        return groups, names

    # ---- max-norm regularisation (scale_weight_norms)
    def file_modules(self) -> list[list[LoRAModule]]:
        """The network's modules as the file has them: one list per file module (the parts of a fused one)."""
        out: list[list[LoRAModule]] = []
        for lora in self.all_loras():
            part = getattr(lora, "part", None)
            if part is None:
                out.append([lora])
            elif part[0] == 0:
                out.append(self._fused[lora.lora_name])
        return out

    @torch.no_grad()
    def apply_max_norm_regularization(self, max_norm: float) -> tuple[int, float, float]:
        """Caps the Frobenius norm of each file module's update (up @ down x alpha / rank) at `max_norm` by scaling
        its up and down weights by sqrt(max_norm / norm) each (sd-scripts' scale_weight_norms; norms below half of
        max_norm count as max_norm / 2, so small updates are never scaled). Returns (modules scaled, mean and max
        norm after scaling); reads the device once."""
        modules = self.file_modules()
        if not modules:
            return 0, 0.0, 0.0
        device = modules[0][0].lora_down.weight.device
        norms = torch.stack([torch.sqrt(sum(_update_norm_sq(m) for m in parts).clamp(min=0)).to(device)
                             for parts in modules])
        floor = norms.clamp(min=max_norm / 2)
        ratios = floor.clamp(max=max_norm) / floor
        factors = ratios.sqrt()
        for parts, factor in zip(modules, factors):
            for weight in {id(w): w for m in parts for w in (m.lora_down.weight, m.lora_up.weight)}.values():
                weight.mul_(factor.to(weight.device, weight.dtype))
        after = norms * ratios
        scaled, mean, top = torch.stack([(ratios != 1).sum().float(), after.mean(), after.max()]).tolist()
        return int(scaled), mean, top

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


def _update_norm_sq(lora: LoRAModule) -> torch.Tensor:
    """||up @ down x alpha / rank||_F squared, from the two small [rank, rank] Gram matrices (never the full update):
    ||U D||^2 = sum((U^T U) * (D D^T)); a conv's down is flattened to [rank, in x kh x kw]."""
    down = lora.lora_down.weight.detach().float().flatten(1)
    up = lora.lora_up.weight.detach().float().flatten(1)
    return ((up.T @ up) * (down @ down.T)).sum() * lora.scale ** 2


def _file_rows(lora: LoRAModule, up: torch.Tensor) -> torch.Tensor:
    """The up weight's output rows in the other layout's order when the file stores the layer's two output halves
    the other way round (its own inverse); unchanged otherwise."""
    if not getattr(lora, "swap_halves", False):
        return up
    half = up.shape[0] // 2
    return torch.cat([up[half:], up[:half]], dim=0)


# ---- factories (the names sd-scripts' trainers call)
LORAPLUS_KEYS = ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")
NETWORK_ARG_TYPES: dict[str, Callable[[str], Any]] = {
    "conv_dim": int, "conv_alpha": float, "rank_dropout": float, "module_dropout": float,
    **{key: float for key in LORAPLUS_KEYS}, **block_weights.NETWORK_ARG_TYPES,
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
                   train_unet: bool = True, train_text_encoder: bool = True,
                   network_class: type[LoRANetwork] | None = None,
                   variant_arg_types: dict[str, Callable[[str], Any]] | None = None) -> LoRANetwork:
    """A new network from training options (defaults: rank 4, alpha 1; conv_alpha 1 when conv_dim is set).
    `network_class` / `variant_arg_types`: a LoRA variant's network and its own network_args (given to it)."""
    cls = _family_class(family)
    own_keys = cls.LORA_NETWORK_ARGS
    extra = parse_network_args(network_args, {**own_keys, **(variant_arg_types or {})})
    family_args = {k: extra.pop(k) for k in list(extra) if k in own_keys}
    ratios = _pop_loraplus(extra)
    blockwise = {k: extra.pop(k) for k in list(extra) if k in block_weights.NETWORK_ARG_TYPES}
    blocks = cls.lora_blocks(family)
    block_weights.check_supported(blockwise, blocks)
    dim = 4 if network_dim is None else network_dim
    alpha = 1.0 if network_alpha is None else network_alpha
    lr_weights = block_ranks = None
    if blocks is not None:
        lr_weights = block_weights.block_lr_weights(blockwise, blocks)
        block_ranks = block_weights.block_ranks(blockwise, blocks, dim=dim, alpha=alpha,
                                                conv_dim=extra.get("conv_dim"), conv_alpha=extra.get("conv_alpha"),
                                                lr_weights=lr_weights)
    naming = family_naming(family, unet, family_args)
    naming.pop("unet_file_name_map", None)  # for loading files only
    network = (network_class or LoRANetwork)(
        unet, list(text_encoders), dim=dim, alpha=alpha, dropout=network_dropout, multiplier=multiplier,
        train_unet=train_unet, train_text_encoder=train_text_encoder,
        unet_blocks=blocks if block_ranks is not None else None, block_ranks=block_ranks, **extra, **naming)
    network.set_block_lr_weight(lr_weights)
    network.set_loraplus_lr_ratio(*ratios)
    return network


def _pop_loraplus(args: dict[str, Any]) -> tuple[float | None, float | None, float | None]:
    """(loraplus_lr_ratio, loraplus_unet_lr_ratio, loraplus_text_encoder_lr_ratio), taken out of `args`."""
    ratios = tuple(args.pop(key, None) for key in LORAPLUS_KEYS)
    for key, value in zip(LORAPLUS_KEYS, ratios):
        if value is not None and value <= 0:
            raise NetworkError(f"option 'network_args': {key}={value} must be greater than 0 (16 is the LoRA+ "
                               f"paper's suggestion)")
    return ratios  # type: ignore[return-value]


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
                                train_unet: bool = True, train_text_encoder: bool = True,
                                network_args: Sequence[str] | dict[str, Any] | None = None,
                                network_class: type[LoRANetwork] | None = None) -> LoRANetwork:
    """A network shaped like the file (rank and alpha per module), with the file's weights loaded.

    train_unet / train_text_encoder False leave that part's modules out (as network_train_*_only do).
    `network_args` (dim_from_weights): the learning-rate ones apply (*_lr_weight, loraplus_*); those that shape
    the network (block_dims, conv_dim, ...) cannot, the file does, and are an error."""
    cls = _family_class(family)
    extra = parse_network_args(network_args, cls.LORA_NETWORK_ARGS)
    ratios = _pop_loraplus(extra)
    lr_args = {k: extra.pop(k) for k in block_weights.LR_WEIGHT_KEYS if k in extra}
    shaping = sorted(k for k, v in extra.items() if v is not None and k not in cls.LORA_NETWORK_ARGS)
    if shaping:
        raise NetworkError(f"option 'network_args': {', '.join(shaping)} cannot be used with dim_from_weights (the "
                           f"file gives every module's rank and alpha): remove them or dim_from_weights")
    blocks = cls.lora_blocks(family)
    block_weights.check_supported(lr_args, blocks)
    lr_weights = block_weights.block_lr_weights(lr_args, blocks) if blocks is not None else None
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
        network = (network_class or LoRANetwork)(
            unet, list(text_encoders), multiplier=multiplier, modules_dim=dims, modules_alpha=alphas,
            unet_blocks=blocks if lr_weights is not None else None, **naming)
    except NetworkError as e:
        raise NetworkError(f"{path}: {e}") from None
    network.load_weights(path)
    network.set_block_lr_weight(lr_weights)
    network.set_loraplus_lr_ratio(*ratios)
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
