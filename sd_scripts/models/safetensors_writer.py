"""A deterministic .safetensors writer: same tensors and metadata give the same bytes.

The safetensors library orders the header's metadata through a hash map, so two saves of one model can differ in
bytes. Here the header is JSON with sorted keys, tensors are stored in name order, and data is streamed tensor by
tensor (no second in-memory copy of the whole model). The files are ordinary safetensors files.
"""
from __future__ import annotations

import json
import struct
from typing import BinaryIO, Mapping

import torch

_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}


def _header(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> bytes:
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
    offset = 0
    for name in sorted(tensors):
        t = tensors[name]
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return raw + b" " * (-len(raw) % 8)  # the data starts 8-byte aligned


def write_safetensors(f: BinaryIO, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
                      ) -> None:
    """Write `tensors` (CPU) and string `metadata` to the open binary file `f`."""
    header = _header(tensors, metadata)
    f.write(struct.pack("<Q", len(header)))
    f.write(header)
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous()
        if t.numel():
            f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str, metadata: Mapping[str, str] | None = None,
                     ) -> None:
    """Write a safetensors file at `path` (callers make it atomic by writing to a temp path first)."""
    with open(path, "wb") as f:
        write_safetensors(f, tensors, metadata)
