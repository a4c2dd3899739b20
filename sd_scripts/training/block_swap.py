"""Block swap (`--blocks_to_swap N`): N of the denoiser's transformer blocks keep their frozen weights on the CPU and
are copied to the training device just before each use, then dropped from it.

Why our own code: diffusers' group offloading (`diffusers.hooks.apply_group_offloading`) and accelerate's CPU-offload
hooks are made for inference: they offload every group and do not handle the backward pass or gradient
checkpointing's recomputation. Here only the chosen blocks move, and training stays exact:

- Every swapped parameter has one CPU master copy (pinned on CUDA). Bringing a block in copies the masters into
  freshly allocated device tensors; sending it back only points the parameters at their masters again (the weights
  are frozen, so there is nothing to copy back). A device copy is never reused for another block, so tensors the
  autograd graph saved during the forward pass stay valid: gradients are those of the unswapped model, with or
  without gradient checkpointing. The memory is saved with gradient checkpointing, where the graph keeps no block
  weights between the passes (without it the graph holds them until the backward pass, as it would unswapped).
- Forward hooks on each block bring it in (`forward_pre_hook`) and send it back (`forward_hook`). Gradient
  checkpointing recomputes a block's forward inside the backward pass, which fires the same hooks in reverse order;
  a pre-hook on the whole denoiser marks the start of each forward pass.
- On CUDA the copy of the next swapped block (in the pass's direction) runs on a separate stream while the current
  block computes; the compute stream waits on the copy's event just before the block runs. Elsewhere copies are
  synchronous. Swapped blocks are spread evenly over each block list, so a copy also overlaps the resident blocks
  between two swapped ones.

Frozen weights (a LoRA run: the adapters live outside the blocks) are never copied back. A full fine-tune
(`trainable=True`) needs gradient checkpointing and the fused backward pass (training/fused_backward.py): during the
backward pass a swapped block stays on the device from its recomputation until its gradients have been used by the
optimizer step inside backward, and its updated weights are copied back to the CPU masters when it is released
(the next block's turn); so only brought-in blocks hold device weights, and training is exact. The optimizer's
state of those weights lives where they are stepped (the device), as in sd-scripts. Buffers stay on the device. The family says which module lists are its swappable blocks and how N is shared between
them (`Family.block_swap_groups`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

log = logging.getLogger(__name__)

#: sd-scripts' limit (library/custom_offloading_utils.py users): each block list keeps at least this many blocks
MIN_RESIDENT_BLOCKS = 2


@dataclass
class SwapGroup:
    """One list of transformer blocks and how many of them live on the CPU."""

    name: str  # the module path (for messages), e.g. 'transformer_blocks'
    blocks: nn.ModuleList
    count: int

    @property
    def limit(self) -> int:
        """The most blocks of this list that may be swapped (sd-scripts: all but two)."""
        return max(0, len(self.blocks) - MIN_RESIDENT_BLOCKS)


def spread(length: int, count: int) -> list[int]:
    """`count` indices of a list of `length` blocks spread evenly over it, never the first one (block 0's weights
    are what `next(model.parameters())` style device checks often find first)."""
    if count <= 0:
        return []
    if count > length - 1:
        raise ValueError(f"cannot swap {count} of {length} blocks")
    step = (length - 1) / count
    return sorted({1 + int(step * k + step / 2) for k in range(count)})


@dataclass
class _Block:
    """A swapped block: its parameters, their CPU masters, and the device copies while it is brought in."""

    position: int  # in the forward order of every hooked block
    module: nn.Module
    params: list[nn.Parameter]
    masters: list[torch.Tensor]
    loaded: list[torch.Tensor] | None = None
    event: object | None = None  # torch.cuda.Event of the copy, on CUDA
    trainable: bool = False  # its weights are trained: copied back to the masters when released
    dirty: bool = False  # brought in for a backward pass (the optimizer may have stepped the device copies)
    pending: int = 0  # trained weights whose gradient this backward pass has not delivered yet
    hooked: bool = False


@dataclass
class SwapStats:
    """What the swapper did (tests and logs): copies to the device, releases, waits for a copy not yet done."""

    onloads: int = 0
    offloads: int = 0
    prefetches: int = 0
    writebacks: int = 0  # trained blocks copied back to their CPU masters
    swapped_bytes: int = 0
    resident_bytes: int = 0
    per_block: dict[int, int] = field(default_factory=dict)  # position -> onloads


class BlockSwapper:
    """Keeps the chosen blocks of `model` on the CPU and brings each to `device` around its forward (and, with
    gradient checkpointing, its recomputation). `install()` places the rest of the model on the device."""

    def __init__(self, model: nn.Module, groups: Sequence[SwapGroup], device: torch.device | str, *,
                 prefetch: bool = True, trainable: bool = False):
        self.model = model
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.prefetch = prefetch
        self.stats = SwapStats()
        self.order: list[nn.Module] = []  # every block of every group, in forward order
        self.swapped: dict[int, _Block] = {}
        for group in groups:
            chosen = set(spread(len(group.blocks), group.count))
            for index, block in enumerate(group.blocks):
                position = len(self.order)
                self.order.append(block)
                if index in chosen:
                    params = list(block.parameters())
                    trained = any(p.requires_grad for p in params)
                    if trained and not trainable:
                        raise ValueError(f"{group.name}.{index} holds trainable weights: block swap moves frozen "
                                         f"weights only (a full fine-tune swaps with trainable=True)")
                    self.swapped[position] = _Block(position, block, params, [], trainable=trainable)
        self._direction = 1
        self._last = -1
        self._handles: list = []
        self._stream = torch.cuda.Stream(self.device) if self.cuda else None

    # ------------------------------------------------------------------ set-up
    def install(self) -> "BlockSwapper":
        """Move the model to the device except the swapped blocks' parameters (kept as CPU masters, pinned on CUDA),
        and hook the blocks."""
        swapped_ids = {id(p) for b in self.swapped.values() for p in b.params}
        for block in self.swapped.values():
            block.masters = [self._master(p.data) for p in block.params]
            for param, master in zip(block.params, block.masters):
                param.data = master
            self.stats.swapped_bytes += sum(m.numel() * m.element_size() for m in block.masters)
        for module in self.model.modules():
            for name, param in module._parameters.items():
                if param is not None and id(param) not in swapped_ids and param.device != self.device:
                    param.data = param.data.to(self.device)
            for name, buffer in module._buffers.items():
                if buffer is not None and buffer.device != self.device:
                    module._buffers[name] = buffer.to(self.device)
        self.stats.resident_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters()
                                        if id(p) not in swapped_ids)
        self._handles.append(self.model.register_forward_pre_hook(self._start))
        for position, block in enumerate(self.order):
            self._handles.append(block.register_forward_pre_hook(self._make_pre_hook(position)))
            self._handles.append(block.register_forward_hook(self._make_post_hook(position)))
        log.info("block swap: %d of %d blocks on the CPU (%.2f GB), %.2f GB of weights stay on %s",
                 len(self.swapped), len(self.order), self.stats.swapped_bytes / 2**30,
                 self.stats.resident_bytes / 2**30, self.device)
        return self

    def remove(self) -> None:
        """Unhook and bring every swapped block back to the device for good."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for block in self.swapped.values():
            self._offload(block)
            for param, master in zip(block.params, block.masters):
                param.data = master.to(self.device)

    def _master(self, tensor: torch.Tensor) -> torch.Tensor:
        master = tensor.detach().to("cpu", copy=True) if tensor.device.type != "cpu" else tensor.detach()
        if self.cuda and not master.is_pinned():
            master = master.pin_memory()
        return master

    @property
    def swapped_positions(self) -> list[int]:
        return sorted(self.swapped)

    # ------------------------------------------------------------------ moves
    def _onload(self, block: _Block) -> None:
        """Start copying a block's masters to the device (on the copy stream on CUDA)."""
        if block.loaded is not None:
            return
        self.stats.onloads += 1
        self.stats.per_block[block.position] = self.stats.per_block.get(block.position, 0) + 1
        if self.cuda:
            with torch.cuda.stream(self._stream):
                block.loaded = [m.to(self.device, non_blocking=True) for m in block.masters]
                block.event = torch.cuda.Event()
                block.event.record(self._stream)
        else:  # a real copy on every device, so the code path (and the autograd-safety argument) is the same
            block.loaded = [m.to(self.device, copy=True) for m in block.masters]

    def _use(self, block: _Block) -> None:
        """Point the block's parameters at their device copies, once the copy is done (for the compute stream)."""
        self._onload(block)
        if self.cuda:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(block.event)
            for tensor in block.loaded:
                tensor.record_stream(compute)  # allocated on the copy stream, used (and freed) on this one
        for param, tensor in zip(block.params, block.loaded):
            param.data = tensor

    def _offload(self, block: _Block) -> None:
        """Drop the device copies: the parameters point at their CPU masters again (frozen: nothing to copy; a
        trained block brought in for a backward pass first copies its stepped weights back)."""
        if block.loaded is None:
            return
        self.stats.offloads += 1
        block.pending = 0
        if block.dirty:
            with torch.no_grad():
                for master, tensor in zip(block.masters, block.loaded):
                    master.copy_(tensor)
            self.stats.writebacks += 1
            block.dirty = False
        for param, master in zip(block.params, block.masters):
            param.data = master
        block.loaded = block.event = None

    def release_all(self) -> None:
        """Send every brought-in block back (trained weights copied to their masters), e.g. before reading the
        masters directly."""
        self._keep_only(force=True)

    def _await_gradients(self, block: _Block) -> None:
        """A trained block enters its backward turn: it stays on the device until each of its trained weights'
        gradient has been delivered, i.e. after the fused optimizer stepped it (that hook was registered first, so
        it runs before ours), then goes back with its new weights."""
        trained = [p for p in block.params if p.requires_grad]
        if not block.hooked:
            for param in trained:
                param.register_post_accumulate_grad_hook(lambda _p, b=block: self._gradient_done(b))
            block.hooked = True
        block.dirty, block.pending = True, len(trained)

    def _gradient_done(self, block: _Block) -> None:
        block.pending -= 1
        if block.pending == 0:
            self._offload(block)

    def _next_swapped(self, position: int, direction: int) -> _Block | None:
        candidates = [p for p in self.swapped if (p - position) * direction > 0]
        if not candidates:
            return None
        return self.swapped[min(candidates, key=lambda p: abs(p - position))]

    def _prefetch_after(self, position: int) -> None:
        if not self.prefetch:
            return
        upcoming = self._next_swapped(position, self._direction)
        if upcoming is not None and upcoming.loaded is None:
            self.stats.prefetches += 1
            self._onload(upcoming)

    # ------------------------------------------------------------------ hooks
    def _keep_only(self, *keep: _Block | None, force: bool = False) -> None:
        """Release every brought-in block but `keep` (and trained ones still waiting for gradients, unless
        `force`). Checkpointing's recomputation may stop before a block's forward ends (early stop), so a block's
        post-hook is not always reached: the next pre-hook tidies up."""
        for block in self.swapped.values():
            if block.loaded is not None and block not in keep and (force or not block.pending):
                self._offload(block)

    def _start(self, module: nn.Module, args) -> None:
        """A forward pass of the whole model begins: blocks run in forward order from here."""
        for block in self.swapped.values():
            block.pending = 0  # (a weight that got no gradient last time)
        self._keep_only(force=True)
        self._direction, self._last = 1, -1
        self._prefetch_after(-1)

    def _make_pre_hook(self, position: int):
        def pre_hook(module: nn.Module, args) -> None:
            if position <= self._last:  # a block again, or an earlier one: checkpointing recomputes in backward
                self._direction = -1
            self._last = position
            block = self.swapped.get(position)
            upcoming = self._next_swapped(position, self._direction) if self.prefetch else None
            self._keep_only(block, upcoming)
            if block is not None:
                self._use(block)
                if block.trainable and self._direction == -1 and torch.is_grad_enabled():
                    self._await_gradients(block)  # its backward runs next: the fused optimizer steps these
            if upcoming is not None and upcoming.loaded is None:
                self.stats.prefetches += 1
                self._onload(upcoming)

        return pre_hook

    def _make_post_hook(self, position: int):
        def post_hook(module: nn.Module, args, output) -> None:
            block = self.swapped.get(position)
            if block is not None and not block.dirty:  # a block in its backward turn stays until it is done
                self._offload(block)
            if position == len(self.order) - 1 and self._direction == 1 and torch.is_grad_enabled() \
                    and getattr(self.model, "gradient_checkpointing", False):
                # the backward pass recomputes from the last block: start bringing in its first swapped block
                self._direction, self._last = -1, len(self.order)
                self._prefetch_after(len(self.order))

        return post_hook


def swap_plan_bytes(groups: Sequence[SwapGroup], model: nn.Module) -> tuple[int, int]:
    """(bytes of weights that stay on the device, bytes of the largest swapped block) for `groups` on `model`,
    without moving anything: what a memory check compares with the device's free memory."""
    swapped: set[int] = set()
    largest = 0
    for group in groups:
        for index in spread(len(group.blocks), group.count):
            params = list(group.blocks[index].parameters())
            swapped.update(id(p) for p in params)
            largest = max(largest, sum(p.numel() * p.element_size() for p in params))
    resident = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in swapped)
    return resident, largest
