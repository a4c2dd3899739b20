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
