"""A deterministic .safetensors writer: same tensors and metadata give the same bytes.

The safetensors library orders the header's metadata through a hash map, so two saves of one model can differ in
bytes. Here the header is JSON with sorted keys, tensors are stored in name order, and data is streamed tensor by
tensor (no second in-memory copy of the whole model). The files are ordinary safetensors files.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import BinaryIO, Callable, Mapping, Union

import torch

_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}


@dataclass(frozen=True)
class Deferred:
    """A tensor made only when it is written (e.g. several layers fused into one), so that a save never holds a
    second copy of the model: `make()` must return a tensor of this shape and dtype."""

    shape: tuple
    dtype: torch.dtype
    make: Callable[[], torch.Tensor]


Stored = Union[torch.Tensor, Deferred]


def _out_dtype(t: Stored, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None and t.dtype.is_floating_point and t.dtype != dtype else t.dtype


def _header(tensors: Mapping[str, Stored], metadata: Mapping[str, str] | None,
            dtype: torch.dtype | None = None) -> bytes:
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
    offset = 0
    for name in sorted(tensors):
        t = tensors[name]
        out = _out_dtype(t, dtype)
        numel = 1
        for n in t.shape:
            numel *= int(n)
        size = numel * out.itemsize
        header[name] = {"dtype": _DTYPES[out], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return raw + b" " * (-len(raw) % 8)  # the data starts 8-byte aligned


def write_safetensors(f: BinaryIO, tensors: Mapping[str, Stored], metadata: Mapping[str, str] | None = None,
                      dtype: torch.dtype | None = None) -> None:
    """Write `tensors` and string `metadata` to the open binary file `f`, one tensor at a time: each is made (a
    Deferred), moved to the CPU and, when it is a float tensor and `dtype` is given, cast, just before it is
    written, so at most one converted tensor exists at any time."""
    header = _header(tensors, metadata, dtype)
    f.write(struct.pack("<Q", len(header)))
    f.write(header)
    for name in sorted(tensors):
        t = tensors[name]
        t = t.make() if isinstance(t, Deferred) else t
        t = t.detach().to("cpu", dtype=_out_dtype(t, dtype)).contiguous()
        if t.numel():
            f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        del t


def save_safetensors(tensors: Mapping[str, Stored], path: str, metadata: Mapping[str, str] | None = None,
                     dtype: torch.dtype | None = None) -> None:
    """Write a safetensors file at `path` (callers make it atomic by writing to a temp path first)."""
    with open(path, "wb") as f:
        write_safetensors(f, tensors, metadata, dtype)
