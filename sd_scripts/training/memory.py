"""The memory options of the DiT trainers, checked and applied: `--blocks_to_swap N` (training/block_swap.py),
`--fp8_base` / `--fp8_base_unet` (training/fp8.py) and `--cpu_offload_checkpointing` (below).

`check_options` runs before any weight is read (option combinations, mixed precision, the trainer);
`MemoryFeatures.place()` replaces the plain `.to(device)` of the denoiser and text encoders: casts, fp8 storage,
the block-count limit and a free-memory estimate are checked on the CPU copy, before anything reaches the device.
The family only says which module lists are its swappable blocks (`Family.block_swap_groups`).

Facts from kohya-ss/sd-scripts 48d368f (`flux_train_network.py`, `sd3_train_network.py`, `train_network.py`,
`library/flux_models.py`): `fp8_base_unet` implies `fp8_base` for the denoiser but keeps the text encoders in the
mixed precision; fp8 needs mixed precision fp16 / bf16; `blocks_to_swap` cannot be combined with
`cpu_offload_checkpointing`; each block list keeps at least two blocks on the device; `cpu_offload_checkpointing`
only acts with `gradient_checkpointing` (sd-scripts ignores it otherwise: here it is an error).
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..options import OptionError
from .block_swap import BlockSwapper, SwapGroup, swap_plan_bytes

log = logging.getLogger(__name__)

GB = 2**30


def _swap(args: argparse.Namespace) -> int:
    """blocks_to_swap; sd-scripts' deprecated double_blocks_to_swap / single_blocks_to_swap (flux_train) convert
    to double + single // 2 when it is not given, as there."""
    given = getattr(args, "blocks_to_swap", None)
    if given is None and (getattr(args, "double_blocks_to_swap", None) or getattr(args, "single_blocks_to_swap", None)):
        converted = int(getattr(args, "double_blocks_to_swap", None) or 0) + \
            int(getattr(args, "single_blocks_to_swap", None) or 0) // 2
        log.warning("double_blocks_to_swap / single_blocks_to_swap are deprecated (as in sd-scripts): using "
                    "blocks_to_swap %d", converted)
        return converted
    return int(given or 0)


def fp8_denoiser(args: argparse.Namespace) -> bool:
    """fp8_base / fp8_base_unet, or fp8_scaled (the float8 base under its name in some sd-scripts scripts)."""
    return bool(getattr(args, "fp8_base", False) or getattr(args, "fp8_base_unet", False)
                or getattr(args, "fp8_scaled", False))


def fp8_text_encoders(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "fp8_base", False)) and not getattr(args, "fp8_base_unet", False)


def check_options(args: argparse.Namespace, *, trainer: str | None) -> None:
    """Option combinations the memory features cannot work with: OptionError (one line, option and fix)."""
    swap = _swap(args)
    offload = bool(getattr(args, "cpu_offload_checkpointing", False))
    fp8 = fp8_denoiser(args)
    if swap < 0:
        raise OptionError(f"option 'blocks_to_swap' must be 0 or more, not {swap}")
    if offload and not getattr(args, "gradient_checkpointing", False):
        raise OptionError("option 'cpu_offload_checkpointing' keeps gradient-checkpointing activations on the CPU: "
                          "add gradient_checkpointing, or remove cpu_offload_checkpointing")
    if offload and swap:
        raise OptionError("options 'blocks_to_swap' and 'cpu_offload_checkpointing' cannot be used together (as in "
                          "sd-scripts): keep blocks_to_swap and remove cpu_offload_checkpointing")
    if trainer not in (None, "network"):
        for name, on in (("fp8_base", getattr(args, "fp8_base", False)),
                         ("fp8_base_unet", getattr(args, "fp8_base_unet", False))):
            if on:
                raise OptionError(f"option '{name}' works on frozen base weights, but this trainer trains them; use "
                                  f"it with the LoRA trainer (*_train_network) or remove it")
        if swap:
            from .fused_backward import fused_backward_wanted

            if not fused_backward_wanted(args) or not getattr(args, "gradient_checkpointing", False):
                raise OptionError("option 'blocks_to_swap' in a full fine-tune moves trained blocks in and out "
                                  "around their backward pass: add fused_backward_pass and gradient_checkpointing "
                                  "(as sd-scripts' flux_train), or remove blocks_to_swap")
    if fp8:
        from .fp8 import fp8_dtype

        fp8_dtype()
        if getattr(args, "mixed_precision", "no") not in ("fp16", "bf16"):
            raise OptionError("options 'fp8_base' / 'fp8_base_unet' compute in the mixed precision: set "
                              "mixed_precision to bf16 (or fp16)")


def max_blocks_to_swap(split: Callable[[int], Sequence[SwapGroup]]) -> int:
    """The largest N whose split keeps every block list within its limit (0 when none fits)."""
    total = sum(len(g.blocks) for g in split(0))
    best = 0
    for n in range(1, 2 * total + 1):
        if all(g.count <= g.limit for g in split(n)):
            best = n
    return best


def block_swap_groups(family_cls, denoiser: nn.Module, blocks_to_swap: int) -> list[SwapGroup]:
    """The family's split of `blocks_to_swap`, checked against sd-scripts' limit; OptionError naming the option."""
    groups = family_cls.block_swap_groups(denoiser, blocks_to_swap)
    if groups is None:
        raise OptionError(f"option 'blocks_to_swap': {type(denoiser).__name__} has no swappable blocks; remove it")
    if any(g.count > g.limit for g in groups):
        limit = max_blocks_to_swap(lambda n: family_cls.block_swap_groups(denoiser, n))
        sizes = " + ".join(f"{len(g.blocks)} {g.name}" for g in groups)
        raise OptionError(f"option 'blocks_to_swap' {blocks_to_swap} is too many for this model ({sizes}; each list "
                          f"keeps 2 blocks on the device): use at most {limit}")
    return groups


# ------------------------------------------------------------------ cpu_offload_checkpointing
def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, (list, tuple)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def _device_of(values: Sequence[Any], module: nn.Module) -> torch.device:
    for value in values:
        if isinstance(value, torch.Tensor):
            return value.device
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


class OffloadedCheckpoint:
    """A gradient-checkpointing function (diffusers' `enable_gradient_checkpointing(gradient_checkpointing_func=)`)
    that keeps what checkpointing holds between the passes, each block's inputs, on the CPU: they are copied there
    before the block and back to the device inside it (also when the backward pass recomputes it). `calls` counts
    the checkpointed block calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, block: nn.Module, *args):
        from torch.utils.checkpoint import checkpoint

        self.calls += 1
        device = _device_of(args, block)
        stored = _to(args, torch.device("cpu"))

        def run(*inputs):
            return block(*_to(inputs, device))

        return checkpoint(run, *stored, use_reentrant=False)


# ------------------------------------------------------------------ applying them
@dataclass
class MemoryFeatures:
    """The memory options of one run and what applying them made (the swapper, the checkpoint function)."""

    blocks_to_swap: int = 0
    fp8_denoiser: bool = False
    fp8_text_encoders: bool = False
    cpu_offload_checkpointing: bool = False
    gradient_checkpointing: bool = False
    trains_denoiser: bool = False  # a full fine-tune: swapped blocks' weights are trained
    swapper: BlockSwapper | None = None
    offloaded_checkpoint: OffloadedCheckpoint | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "MemoryFeatures":
        return cls(blocks_to_swap=_swap(args), fp8_denoiser=fp8_denoiser(args),
                   fp8_text_encoders=fp8_text_encoders(args),
                   cpu_offload_checkpointing=bool(getattr(args, "cpu_offload_checkpointing", False)),
                   gradient_checkpointing=bool(getattr(args, "gradient_checkpointing", False)),
                   trains_denoiser=getattr(args, "trainer_kind", None) in ("db", "finetune"))

    @property
    def any(self) -> bool:
        return bool(self.blocks_to_swap or self.fp8_denoiser or self.cpu_offload_checkpointing)

    def place(self, bundle, family_cls, device: torch.device, *, denoiser_dtype: torch.dtype,
              text_encoder_dtype: torch.dtype, compute_dtype: torch.dtype,
              free_memory: Callable[[torch.device], int | None] | None = None) -> None:
        """Cast, store in fp8, and move the denoiser and the text encoders to `device` (the swapped blocks' weights
        stay on the CPU). OptionError before anything moves when the block count or the memory does not fit."""
        from . import fp8

        device = torch.device(device)
        if self.fp8_denoiser or self.fp8_text_encoders:
            fp8.check_fp8_device(device, compute_dtype)
        denoiser = bundle.denoiser
        denoiser.to(dtype=denoiser_dtype)
        if self.fp8_denoiser:
            fp8.store_in_fp8(denoiser, compute_dtype)
        for text_encoder in bundle.text_encoders:
            text_encoder.to(dtype=text_encoder_dtype)
            if self.fp8_text_encoders:
                fp8.store_in_fp8(text_encoder, compute_dtype)
        groups = block_swap_groups(family_cls, denoiser, self.blocks_to_swap) if self.blocks_to_swap else []
        self._check_free_memory(bundle, groups, lambda n: family_cls.block_swap_groups(denoiser, n), device,
                                free_memory or device_free_memory)
        if groups:
            denoiser.requires_grad_(False)  # the method makes what it trains trainable afterwards
            self.swapper = BlockSwapper(denoiser, groups, device, trainable=self.trains_denoiser).install()
        else:
            denoiser.to(device)
        for text_encoder in bundle.text_encoders:
            text_encoder.to(device)

    def _check_free_memory(self, bundle, groups: list[SwapGroup], split: Callable[[int], Sequence[SwapGroup]],
                           device: torch.device, free_memory: Callable[[torch.device], int | None]) -> None:
        """With blocks_to_swap: the weights that stay on the device (plus two swapped blocks in flight) must fit in
        its free memory, else name the smallest blocks_to_swap that fits (a lower bound: activations come on top)."""
        if not groups:
            return
        free = free_memory(device)
        if free is None:
            return
        others = sum(p.numel() * p.element_size() for m in (*bundle.text_encoders, bundle.vae) if m is not None
                     for p in m.parameters() if p.device != device)

        def need(plan: Sequence[SwapGroup]) -> int:
            resident, largest = swap_plan_bytes(plan, bundle.denoiser)
            return resident + 2 * largest + others

        needed = need(groups)
        if needed <= free:
            return
        limit = max_blocks_to_swap(split)
        enough = next((n for n in range(self.blocks_to_swap + 1, limit + 1) if need(split(n)) <= free), None)
        fix = f"use blocks_to_swap {enough} or more" if enough is not None else \
            f"even the most blocks_to_swap ({limit}) does not fit: add fp8_base and cache_text_encoder_outputs"
        raise OptionError(f"option 'blocks_to_swap' {self.blocks_to_swap}: {_size(needed)} of weights would stay on "
                          f"{device} but only {_size(free)} are free; {fix}")

    def enable_checkpointing(self, denoiser: nn.Module) -> None:
        """Gradient checkpointing on the denoiser; with cpu_offload_checkpointing its block inputs kept on the CPU."""
        if not self.cpu_offload_checkpointing:
            denoiser.enable_gradient_checkpointing()
            return
        self.offloaded_checkpoint = OffloadedCheckpoint()
        try:
            denoiser.enable_gradient_checkpointing(gradient_checkpointing_func=self.offloaded_checkpoint)
        except TypeError:
            raise OptionError(f"option 'cpu_offload_checkpointing': {type(denoiser).__name__} takes no checkpointing "
                              f"function; remove the option") from None


def _size(n: int) -> str:
    return f"{n / GB:.1f} GB" if n >= GB / 10 else f"{n / 2**20:.1f} MB"


def device_free_memory(device: torch.device) -> int | None:
    """Free bytes on a CUDA device; None where it cannot be told (the CPU: swapping is a copy between CPU tensors)."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)
