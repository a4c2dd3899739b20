"""Read a single file's weights in the compute dtype, whatever precision they are stored in.

Users download FLUX.1 / SD3 denoisers and T5-XXL encoders stored in float8 (`*_fp8_e4m3fn.safetensors`) beside the
bf16/fp16 ones. Plain float8 tensors are upcast to the requested dtype. ComfyUI's "scaled fp8" files
(`t5xxl_fp8_e4m3fn_scaled.safetensors`: a `scaled_fp8` marker tensor, and per Linear a `<module>.scale_weight`
beside `<module>.weight`, optionally `<module>.scale_input`) store weight / scale, so the weight is multiplied back
by its scale. Each tensor is read once; `consumed` records which names were used, for "unused keys" reports.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .checkpoint import Checkpoint

SCALED_FP8_MARKER = "scaled_fp8"
_SCALE_SUFFIXES = (".scale_weight", ".scale_input")


def is_scale_key(name: str) -> bool:
    """True for the bookkeeping tensors of a scaled-fp8 file (never model parameters)."""
    return name == SCALED_FP8_MARKER or name.endswith(_SCALE_SUFFIXES)


@dataclass
class TensorReader:
    """`reader(name)` gives tensor `name` of `ckpt` as a floating tensor in `dtype` (scaled fp8 undone)."""

    ckpt: Checkpoint
    dtype: torch.dtype
    consumed: set[str] = field(default_factory=set)

    def __call__(self, name: str) -> torch.Tensor:
        self.consumed.add(name)
        scale_name = name[: -len(".weight")] + ".scale_weight" if name.endswith(".weight") else None
        if scale_name and scale_name in self.ckpt.shapes:
            self.consumed.add(scale_name)
            weight = self.ckpt.get(name).to(torch.float32)
            scale = self.ckpt.get(scale_name).to(torch.float32)
            return (weight * scale).to(self.dtype)
        return self.ckpt.get(name, self.dtype)

    def unused(self, names) -> list[str]:
        """Names in `names` not read and not scaled-fp8 bookkeeping."""
        return sorted(n for n in names if n not in self.consumed and not is_scale_key(n))

