"""Lazy reading of single-file checkpoints (.safetensors, .ckpt/.pt/.bin) with one-line errors for bad files.

`open_checkpoint(path)` gives names, shapes and header metadata at once and reads a tensor only when asked, so a
loader can decide the architecture before touching the weights, and every tensor is read exactly once.
"""
from __future__ import annotations

import json
import os
import struct
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import ModelLoadError

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

#: False (`--disable_mmap_load_safetensors`): .safetensors tensors are read with plain file reads, one at a time,
#: instead of memory-mapping the file (faster on WSL and network drives, as sd-scripts' option says)
_MMAP = {"safetensors": True}


@contextmanager
def safetensors_mmap(enabled: bool):
    """Checkpoints opened inside memory-map .safetensors files (enabled) or read them with plain reads."""
    before = _MMAP["safetensors"]
    _MMAP["safetensors"] = bool(enabled)
    try:
        yield
    finally:
        _MMAP["safetensors"] = before


@dataclass
class Checkpoint:
    """Names and shapes of a single file's tensors; `get(name)` reads one (optionally cast to a float dtype)."""

    path: str
    shapes: dict[str, tuple[int, ...]]
    metadata: dict[str, str]
    _read: Callable[[str], torch.Tensor] = field(repr=False)

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        try:
            tensor = self._read(name)
        except Exception as e:  # noqa: BLE001 - a failing read is a damaged file
            raise ModelLoadError(f"{self.path}: cannot read tensor {name!r} ({type(e).__name__}: {e}); the file is "
                                 f"damaged or incomplete: download or save it again") from None
        if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        return tensor


def _read_safetensors_header(path: str) -> dict:
    """The JSON header, after checking it and the file size (safetensors reports a text file or a truncated
    download with obscure messages)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("shorter than a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n <= 1 or 8 + n > size:
            raise ValueError("no valid safetensors header")
        header = json.loads(f.read(n))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise ValueError(f"truncated: {size} bytes instead of {8 + n + end}")
    return header


def _plain_reader(path: str, header: dict) -> Callable[[str], torch.Tensor]:
    """Reads one tensor of a .safetensors file with seek + read (no memory map)."""
    from .safetensors_writer import _DTYPES

    dtypes = {name: dtype for dtype, name in _DTYPES.items()}
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    data_start = 8 + n

    def read(name: str) -> torch.Tensor:
        entry = header[name]
        start, end = entry["data_offsets"]
        with open(path, "rb") as f:
            f.seek(data_start + start)
            raw = bytearray(f.read(end - start))
        if len(raw) != end - start:
            raise ValueError("the file ends before the tensor's data")
        flat = torch.frombuffer(raw, dtype=dtypes[entry["dtype"]]) if raw else \
            torch.empty(0, dtype=dtypes[entry["dtype"]])
        return flat.reshape(entry["shape"])

    return read


def _open_safetensors(path: str) -> Checkpoint:
    from safetensors import safe_open

    try:
        header = _read_safetensors_header(path)
        metadata = dict(header.pop("__metadata__", None) or {})
        shapes = {k: tuple(v["shape"]) for k, v in header.items()}
        read = safe_open(path, framework="pt", device="cpu").get_tensor if _MMAP["safetensors"] else \
            _plain_reader(path, header)
    except Exception as e:  # noqa: BLE001 - any parse failure means a bad file
        raise ModelLoadError(f"{path}: not a readable .safetensors file ({e}); the download may be incomplete or the "
                             f"file is of another type: download it again or pass the right file") from None
    return Checkpoint(path, shapes, metadata, read)


def _open_pickle(path: str) -> Checkpoint:
    try:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            data = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as e:  # noqa: BLE001
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"{path}: cannot read this checkpoint ({first}); it is damaged, incomplete or holds more "
                             f"than weights: use a .safetensors file or re-save it with weights only") from None
    metadata = {}
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        # our own .ckpt saves keep the architecture facts beside the state dict (see saving.py)
        metadata = {k: v for k, v in data.items() if isinstance(v, str)}
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: holds a {type(data).__name__}, not a state dict of tensors; pass a model "
                             f"checkpoint")
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    return Checkpoint(path, {k: tuple(v.shape) for k, v in tensors.items()}, metadata, tensors.__getitem__)


def open_checkpoint(path: str) -> Checkpoint:
    """Open a single-file checkpoint lazily. ModelLoadError for a missing, unreadable or unknown file."""
    if not os.path.exists(path):
        raise ModelLoadError(f"{path}: no such file or folder; check the model path")
    if not os.path.isfile(path):
        raise ModelLoadError(f"{path}: not a file; pass a .safetensors/.ckpt file or a diffusers folder")
    lower = path.lower()
    if lower.endswith(SAFETENSORS_SUFFIXES):
        return _open_safetensors(path)
    if lower.endswith(PICKLE_SUFFIXES):
        return _open_pickle(path)
    raise ModelLoadError(f"{path}: unknown model file type; use a .safetensors or .ckpt file or a diffusers folder")
