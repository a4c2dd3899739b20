"""Sharded training: FSDP (from an accelerate config) and DeepSpeed ZeRO-3 get the trained model as ONE module.

Both shard only the modules handed to `accelerator.prepare`, and gather a module's weights around its own call.
Our trainers call the family's text encoding and denoiser directly, and an adapter (LoRA) patches the forward of
the base model's layers while its own weights live in the network module. So a sharded run:

- puts the denoiser, the text encoders whose weights are trained (directly or by an adapter) and the trained
  module (when its weights are not already inside them, e.g. a LoRA network) into `ShardedModel`, prepared once
  together with the optimizer;
- runs every forward pass (training step, validation, sampling) through `ShardedModel.forward(call)`, so FSDP's
  root unit is gathered and its child units gather themselves (`ShardedRun.call`);
- tells ZeRO-3 which weights a layer reads that it does not own (`deepspeed.zero.register_external_parameter`):
  an adapter's weights with the layer it patches, and embedding tables with their parent (transformers' CLIP reads
  `position_embedding.weight.shape` before calling the table);
- gathers the full weights around saving (`full_weights`: DeepSpeed's `GatheredParameters`, FSDP1's
  `summon_full_params`, FSDP2's DTensor `full_tensor`), on every process, while the main process writes the file;
  state folders are accelerate's `save_state` (DeepSpeed's partitioned checkpoint, FSDP's sharded or full state
  dict as the accelerate config says), plus DeepSpeed's consolidated 16-bit weights with zero3_save_16bit_model.

The single-process and data-parallel paths do not use any of this (`ShardedRun.kind` is None).
"""
from __future__ import annotations

import contextlib
import functools
import logging
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..options import OptionError

log = logging.getLogger("sd_scripts.train")

FSDP = "fsdp"
ZERO3 = "zero3"
ZERO3_16BIT_FILE = "zero3_16bit_model.bin"  # (zero3_save_16bit_model, in state folders)


def sharding_kind(accelerator) -> str | None:
    """'fsdp' (FSDP1 or FSDP2), 'zero3' (DeepSpeed ZeRO stage 3) or None (nothing is sharded)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return FSDP
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        plugin = accelerator.state.deepspeed_plugin
        if plugin is not None and plugin.zero_stage == 3:
            return ZERO3
    return None


def check_sharded_run(args, method) -> None:
    """What a sharded run cannot do, named with the reason (before any weights are read)."""
    reason = getattr(method, "not_shardable", None)
    if reason:
        raise OptionError(f"FSDP / DeepSpeed ZeRO-3: {reason}")
    from .memory import fp8_denoiser

    clashes = {
        "blocks_to_swap": bool(getattr(args, "blocks_to_swap", None)),
        "fp8_base": fp8_denoiser(args),
        "cpu_offload_checkpointing": bool(getattr(args, "cpu_offload_checkpointing", False)),
        "fused_backward_pass": bool(getattr(args, "fused_backward_pass", False)),
        "torch_compile": bool(getattr(args, "torch_compile", False)),
        "use_ema": bool(getattr(args, "use_ema", False)),
        "scale_weight_norms": bool(getattr(args, "scale_weight_norms", None)),
    }
    named = [name for name, on in clashes.items() if on]
    if named:
        raise OptionError(f"option {', '.join(repr(n) for n in named)} cannot be used with FSDP / DeepSpeed ZeRO-3: "
                          "they move, cast, step, compile or read the trained weights themselves between the "
                          "sharded model's calls, where each process holds only its shard; remove it or use data "
                          "parallel / ZeRO stage 2")


class ShardedModel(nn.Module):
    """The denoiser, the text encoders a run trains and the trained module (unless it lies inside them), as one
    module for accelerate. `forward(call, *args)` runs `call` inside the sharded module's own call."""

    def __init__(self, denoiser: nn.Module, text_encoders: list[nn.Module], trained: nn.Module):
        super().__init__()
        self.denoiser = denoiser
        self.text_encoders = nn.ModuleList(text_encoders)
        inside = {id(p) for p in self.denoiser.parameters()} | {id(p) for p in self.text_encoders.parameters()}
        if any(id(p) not in inside for p in trained.parameters()):
            self.trained = trained
        # accelerate's TRANSFORMER_BASED_WRAP without class names wraps the classes listed here: those the parts
        # name as their blocks (diffusers' and transformers' `_no_split_modules`) that they really contain
        # (transformers' CLIP text model also names its vision tower's classes)
        named = {name for part in (denoiser, *text_encoders) for name in (getattr(part, "_no_split_modules", None)
                                                                           or [])}
        present = {type(m).__name__ for m in self.modules()}
        self._no_split_modules = sorted(named & present)

    def forward(self, call: Callable[..., Any], *args, **kwargs) -> Any:
        return call(*args, **kwargs)


class ShardedRun:
    """How the loop reaches a sharded model: `call` for forward passes, `full_weights` for saving."""

    def __init__(self, kind: str | None, accelerator=None):
        self.kind = kind
        self.accelerator = accelerator
        self.model: nn.Module | None = None  # what accelerate returned (FSDP module or DeepSpeed engine)
        self.wrapper: ShardedModel | None = None

    @property
    def active(self) -> bool:
        return self.kind is not None

    def call(self, fn: Callable[..., Any], *args, **kwargs) -> Any:
        """fn(*args) inside the sharded model's forward; a plain call when nothing is sharded."""
        if self.model is None:
            return fn(*args, **kwargs)
        # one argument, the bound call: FSDP and DeepSpeed would otherwise move, cast or rename our arguments
        # (FSDP1's input casting takes a `dtype` of its own)
        return self.model(functools.partial(fn, *args, **kwargs))

    def prepare(self, wrapper: ShardedModel, optimizer, loader):
        """accelerator.prepare of the wrapper with the optimizer and loader; returns (optimizer, loader)."""
        acc = self.accelerator
        self.wrapper = wrapper
        total = _count(wrapper.parameters())
        trained = _count(p for p in wrapper.parameters() if p.requires_grad)
        if self.kind == FSDP:
            plugin = acc.state.fsdp_plugin
            if plugin.fsdp_version == 1 and not plugin.use_orig_params:
                # one FSDP unit holds frozen base weights and trained ones; FSDP1 flattens them into one parameter
                # unless it keeps the original ones (and the optimizer was made on those)
                log.info("FSDP: use_orig_params turned on (frozen and trained weights share FSDP units)")
                plugin.use_orig_params = True
        self.model, optimizer, loader = acc.prepare(wrapper, optimizer, loader)
        if self.kind == ZERO3:
            register_external_weights(wrapper)
        if self.kind == FSDP:
            check_fsdp_units(self.model, getattr(wrapper, "trained", None))
        if acc.is_main_process:
            log.info("sharded model (%s, %s): %d parameters, %d of them trained", describe(acc),
                     type(self.model).__name__, total, trained)
        return optimizer, loader

    def trained_parameters(self, optimizer) -> list[nn.Parameter]:
        """The trained parameters as the optimizer holds them after prepare (FSDP2 swaps in sharded ones)."""
        params = [p for g in optimizer.param_groups for p in g["params"]]
        return [p for p in params if p.requires_grad]

    def clip_grad_norm_(self, params: list[nn.Parameter], max_norm: float) -> None:
        """Clip by the norm over every process's shard (FSDP1 knows its flat parameters; FSDP2's gradients are
        DTensors, whose norm torch computes over all shards)."""
        from torch.distributed.fsdp import FullyShardedDataParallel

        if isinstance(self.model, FullyShardedDataParallel):
            self.model.clip_grad_norm_(max_norm)
        else:
            torch.nn.utils.clip_grad_norm_(params, max_norm)

    def after_save_state(self, state_dir: str) -> None:
        """zero3_save_16bit_model (DeepSpeed's stage3_gather_16bit_weights_on_model_save): the state folder also
        gets DeepSpeed's consolidated 16-bit weights of the whole sharded model (`save_16bit_model`, usable
        without DeepSpeed). Every process takes part."""
        if self.kind == ZERO3 and self.model.zero_gather_16bit_weights_on_model_save():
            self.model.save_16bit_model(state_dir, ZERO3_16BIT_FILE)

    def before_load_state(self, optimizer, params: list[nn.Parameter]) -> None:
        """FSDP's sharded checkpoints (torch.distributed.checkpoint) load the optimizer state into a template made
        from the optimizer's current state, which is empty before its first step, so nothing would be loaded.
        Make the state exist: one step with zero gradients at learning rate 0 (load_state then replaces the
        weights and the state)."""
        if self.kind != FSDP or "FULL_STATE_DICT" in str(self.accelerator.state.fsdp_plugin.state_dict_type):
            return
        inner = getattr(optimizer, "optimizer", optimizer)
        if inner.state:
            return
        rates = [group["lr"] for group in inner.param_groups]
        for group in inner.param_groups:
            group["lr"] = 0.0
        for p in params:
            p.grad = torch.zeros_like(p)
        inner.step()
        for group, lr in zip(inner.param_groups, rates):
            group["lr"] = lr
        for p in params:
            p.grad = None

    @contextlib.contextmanager
    def full_weights(self, module: nn.Module) -> Iterator[None]:
        """While entered, `module`'s parameters hold the full (unsharded) weights on every process. Every process
        must enter it (the weights are gathered collectively); nothing written to them is kept."""
        if self.model is None:
            yield
            return
        if self.kind == ZERO3:
            import deepspeed

            params = list(module.parameters())
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None), _fp32_masters(params):
                yield
            return
        from torch.distributed.fsdp import FullyShardedDataParallel

        if isinstance(self.model, FullyShardedDataParallel):
            with FullyShardedDataParallel.summon_full_params(self.model, writeback=False):
                yield
            return
        from torch.distributed.fsdp import FSDPModule

        for unit in self.model.modules():  # FSDP2: after a forward without backward (validation) the root
            if isinstance(unit, FSDPModule):  # may still hold its unsharded parameters: shard them back first
                unit.reshard()
        with _full_dtensors(module):  # then the parameters are DTensors
            yield


@contextlib.contextmanager
def _fp32_masters(params: list[nn.Parameter]) -> Iterator[None]:
    """Under DeepSpeed bf16 / fp16 the module holds 16-bit copies of the trained weights and the optimizer the
    float32 ones: while entered, trained parameters hold their float32 values (as the plain trainer saves them);
    DeepSpeed's `safe_get_full_fp32_param` gathers them, a collective in the same order on every process."""
    from deepspeed.utils import safe_get_full_fp32_param

    swapped = []
    for param in params:
        if param.requires_grad and param.dtype != torch.float32:
            full = safe_get_full_fp32_param(param)
            if full is not None:
                swapped.append((param, param.data))
                param.data = full.detach().to(param.device).view_as(param.data)
    try:
        yield
    finally:
        for param, data in swapped:
            param.data = data


@contextlib.contextmanager
def _full_dtensors(module: nn.Module) -> Iterator[None]:
    """Swap every DTensor parameter of `module` for a plain one holding its full value (an all-gather per
    parameter, in the same order on every process); the sharded ones are put back afterwards."""
    from torch.distributed.tensor import DTensor

    swapped = []
    for owner in module.modules():
        for name, param in list(owner._parameters.items()):
            if isinstance(param, DTensor):
                full = nn.Parameter(param.full_tensor().detach().clone(), requires_grad=False)
                owner._parameters[name] = full
                swapped.append((owner, name, param))
    try:
        yield
    finally:
        for owner, name, param in swapped:
            owner._parameters[name] = param


def adapted_layers(module: nn.Module) -> list[nn.Module]:
    """The base-model layers an adapter module patches (LoRA modules name theirs `org_module`, LyCORIS modules a
    one-element list, OFT a list of fused `layers`); empty for anything else."""
    found = []
    for name in ("org_module", "layers"):
        value = getattr(module, name, None)
        if isinstance(value, nn.Module) and not isinstance(value, nn.ModuleList):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found.extend(v for v in value if isinstance(v, nn.Module))
    own = {id(m) for m in module.modules()}
    return [m for m in found if id(m) not in own]


def register_external_weights(wrapper: ShardedModel) -> None:
    """ZeRO-3 gathers a module's own weights around its call. Weights a layer reads that it does not own are
    registered with it: every adapter's weights with the layer(s) it patches (the adapter's forward runs as theirs),
    and each embedding table with its parent module (transformers' CLIP reads the position table's shape before
    calling it)."""
    from deepspeed import zero

    trained = getattr(wrapper, "trained", None)
    adapters = 0
    if trained is not None:
        for module in trained.modules():
            layers = adapted_layers(module)
            if not layers:
                continue
            adapters += 1
            for layer in layers:
                for param in module.parameters():
                    zero.register_external_parameter(layer, param)
        if not adapters and any(True for _ in trained.parameters()):
            raise OptionError(f"ZeRO stage 3 cannot gather the weights of {type(trained).__name__}: its modules name "
                              "no base-model layer they patch; use zero_stage 2")
    for parent in wrapper.modules():
        for child in parent.children():
            if isinstance(child, nn.Embedding):
                zero.register_external_parameter(parent, child.weight)


def check_fsdp_units(model: nn.Module, trained: nn.Module | None) -> None:
    """An adapter's forward runs as the patched layer's, never as its own call, so FSDP must not make an adapter
    module (or the network holding it) a unit of its own: its weights would stay sharded when read."""
    if trained is None:
        return
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    wrapped = [m for m in trained.modules() if isinstance(m, (FullyShardedDataParallel, FSDPModule))]
    if wrapped:
        name = type(trained.module if isinstance(trained, FullyShardedDataParallel) else trained).__name__
        raise OptionError(f"FSDP's auto wrap policy made {len(wrapped)} FSDP unit(s) inside the trained {name}, "
                          "whose modules are never called themselves (an adapter runs as the layer it patches): "
                          "use fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP (or NO_WRAP), or a larger "
                          "fsdp_min_num_params")


def describe(accelerator) -> str:
    kind = sharding_kind(accelerator)
    if kind == ZERO3:
        return "DeepSpeed ZeRO stage 3"
    plugin = accelerator.state.fsdp_plugin
    return f"FSDP{plugin.fsdp_version}, {accelerator.num_processes} processes"


def _count(params) -> int:
    total = 0
    for p in params:
        total += int(getattr(p, "ds_numel", 0) or p.numel())
    return total
