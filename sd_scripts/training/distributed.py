"""Data-parallel gradient averaging for the trained parameters, and a check that processes stayed in step.

The U-Net and text encoder are called directly (the trained adapter lives inside them), never through a
DistributedDataParallel wrapper, so DDP's hooks would not fire: gradients are averaged here instead, in a few large
flat buckets per optimizer step. Works with gloo (CPU) and NCCL (GPU) process groups started by `accelerate launch`.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist

BUCKET_ELEMENTS = 1 << 24  # 64 MiB of float32 per collective: bounded extra memory even for full fine-tuning


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def allreduce_gradients(params: Iterable[torch.nn.Parameter], bucket_elements: int = BUCKET_ELEMENTS) -> None:
    """Average `.grad` of `params` over all processes (a no-op in a single process)."""
    if not is_distributed():
        return
    world = dist.get_world_size()
    grads = [p.grad for p in params if p.grad is not None]
    bucket: list[torch.Tensor] = []
    size = 0
    for g in grads:
        bucket.append(g)
        size += g.numel()
        if size >= bucket_elements:
            _reduce_bucket(bucket, world)
            bucket, size = [], 0
    if bucket:
        _reduce_bucket(bucket, world)


class GradientAverager:
    """Averages the trained parameters' gradients once per optimizer step, honouring accelerate's DDP settings
    (`DistributedDataParallelKwargs`, from ddp_gradient_as_bucket_view / ddp_static_graph):

    - default: gradients are copied into flat buckets, all-reduced and copied back (allreduce_gradients);
    - gradient_as_bucket_view: after the first step every gradient IS a view into a persistent flat buffer, so
      backward accumulates straight into the buffer and the all-reduce runs in place (no copies, no temporaries);
      the loop then zeroes gradients in place instead of dropping them;
    - static_graph: the bucket layout is planned on the first step and reused; a step whose set of gradients
      differs from the first one's is an error (DDP's static-graph contract).
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], ddp_kwargs=None,
                 bucket_elements: int = BUCKET_ELEMENTS):
        self.params = list(params)
        self.bucket_view = bool(getattr(ddp_kwargs, "gradient_as_bucket_view", False))
        self.static_graph = bool(getattr(ddp_kwargs, "static_graph", False))
        self.bucket_elements = bucket_elements
        self.buckets: list[tuple[torch.Tensor, list[torch.nn.Parameter]]] | None = None  # (flat buffer, params)
        self.planned: tuple[int, ...] | None = None  # ids of the parameters the layout holds

    def average(self) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            return
        if not self.bucket_view and not self.static_graph:
            allreduce_gradients(self.params, self.bucket_elements)
            return
        with_grad = [p for p in self.params if p.grad is not None]
        if not with_grad:
            return
        ids = tuple(id(p) for p in with_grad)
        if self.planned is None or (ids != self.planned and not self.static_graph):
            self._plan(with_grad)
        elif ids != self.planned:
            raise RuntimeError("ddp_static_graph: the parameters with gradients changed between steps (e.g. a text "
                               "encoder stops training); run without ddp_static_graph")
        world = dist.get_world_size()
        for flat, params in self.buckets:
            if not self.bucket_view:  # copy in
                torch.cat([p.grad.reshape(-1) for p in params], out=flat)
            dist.all_reduce(flat)
            flat.div_(world)
            if not self.bucket_view:  # copy out
                offset = 0
                for p in params:
                    n = p.grad.numel()
                    p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
                    offset += n

    def _plan(self, params: list[torch.nn.Parameter]) -> None:
        """Group the gradients by dtype and device into buffers of about bucket_elements; with bucket_view, move
        each gradient into its buffer and make .grad a view of it."""
        groups: dict[tuple, list[list[torch.nn.Parameter]]] = {}
        for p in params:
            runs = groups.setdefault((p.grad.dtype, p.grad.device), [[]])
            if runs[-1] and sum(q.grad.numel() for q in runs[-1]) >= self.bucket_elements:
                runs.append([])
            runs[-1].append(p)
        self.buckets = []
        for (dtype, device), runs in groups.items():
            for run in runs:
                flat = torch.empty(sum(p.grad.numel() for p in run), dtype=dtype, device=device)
                if self.bucket_view:
                    offset = 0
                    for p in run:
                        n = p.grad.numel()
                        view = flat[offset:offset + n].view_as(p.grad)
                        view.copy_(p.grad)
                        p.grad = view
                        offset += n
                self.buckets.append((flat, run))
        self.planned = tuple(id(p) for p in params)


def _reduce_bucket(grads: list[torch.Tensor], world: int) -> None:
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for same in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in same])
        dist.all_reduce(flat)
        flat.div_(world)
        offset = 0
        for g in same:
            n = g.numel()
            g.copy_(flat[offset:offset + n].view_as(g))
            offset += n


def parameters_agree(params: Iterable[torch.nn.Parameter]) -> bool:
    """True when every process holds the same trained weights (compared by a float64 checksum)."""
    if not is_distributed():
        return True
    params = list(params)
    device = params[0].device if params else torch.device("cpu")
    checksum = torch.stack([p.detach().double().sum() for p in params]).sum() if params else \
        torch.zeros((), dtype=torch.float64, device=device)
    checksum = checksum.reshape(1)
    low, high = checksum.clone(), checksum.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    return bool((high - low).abs().item() <= 1e-9 * max(1.0, high.abs().item()))


def broadcast_parameters(params: Iterable[torch.nn.Parameter], src: int = 0) -> None:
    """Give every process the main process's initial weights (random inits differ between processes)."""
    if not is_distributed():
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=src)
