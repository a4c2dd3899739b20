"""Read and write LoRA weight files (.safetensors with header metadata, or torch .ckpt/.pt), atomically."""
from __future__ import annotations

import os

import torch

from ..errors import NetworkError
from ..training.metadata import add_model_hashes
from ..training.saving import atomic_save_safetensors, atomic_torch_save

SAFETENSORS_EXT = ".safetensors"


def load_weights_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a LoRA file; metadata is empty for torch files."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise NetworkError(f"LoRA file {path!r} does not exist: check the path (network_weights)")
    try:
        if path.lower().endswith(SAFETENSORS_EXT):
            from safetensors import safe_open

            with safe_open(path, framework="pt", device="cpu") as f:
                metadata = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            return tensors, metadata
        data = torch.load(path, map_location="cpu", weights_only=True)
    except NetworkError:
        raise
    except Exception as e:  # noqa: BLE001 - any read error means the file is unusable
        raise NetworkError(f"LoRA file {path!r} cannot be read ({type(e).__name__}: {e}); is it complete?") from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise NetworkError(f"LoRA file {path!r} does not hold a dict of tensors: not a LoRA weights file")
    return dict(data), {}


def save_weights_file(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                      metadata: dict[str, str] | None = None) -> None:
    """Write atomically. safetensors: metadata (if given) plus sshs_model_hash/sshs_legacy_hash go in the header."""
    path = os.fspath(path)
    if path.lower().endswith(SAFETENSORS_EXT):
        if metadata is not None:
            metadata = add_model_hashes(tensors, metadata)
        atomic_save_safetensors(tensors, path, metadata)
    else:
        atomic_torch_save(tensors, path)
