"""Textual-inversion embedding files: read every layout users bring, write ours (FORMATS.md, 'Other adapter files').

Layouts read (all give {encoder key: float32 tensor [n_vectors, dim]}):
- ours / sd-scripts / A1111 safetensors: SD1/SD2 `{"emb_params": [n, dim]}`; SDXL `{"clip_l": .., "clip_g": ..}`
- A1111 torch file (.pt/.bin/.ckpt): `{"string_to_param": {"*": [n, dim]}, "name": .., "step": .., ...}`
- diffusers `learned_embeds.bin` / `.safetensors`: `{"<token>": [dim] or [n, dim]}` (one key)
Torch files are read with `weights_only=True` (no code from the file runs).

Written: safetensors `{key: [n, dim]}` with only modelspec metadata, or (save_model_as pt/ckpt) the A1111 torch
layout, which A1111, ComfyUI and diffusers' `load_textual_inversion` read. Writes are atomic.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Mapping

import torch

from ..errors import UserError
from ..training.saving import atomic_save_safetensors, atomic_torch_save

EMB_PARAMS_KEY = "emb_params"  # SD1/SD2: one text encoder
SDXL_KEYS = ("clip_l", "clip_g")  # SDXL: text encoder 1 (CLIP-L) and 2 (OpenCLIP-bigG)
SAFETENSORS_EXT = ".safetensors"
A1111_PLACEHOLDER = "*"
A1111_PLACEHOLDER_ID = 265  # what A1111 writes as string_to_token["*"]


class EmbeddingFileError(UserError):
    """An embedding file that cannot be read or does not fit the model."""


@dataclass
class EmbeddingFile:
    """The vectors of an embedding file, per text-encoder key, plus what the file says about itself."""

    vectors: dict[str, torch.Tensor]  # key -> float32 [n_vectors, dim]
    name: str | None = None  # A1111 'name' or the diffusers token
    step: int | None = None
    metadata: dict[str, str] = field(default_factory=dict)  # safetensors header

    @property
    def num_vectors(self) -> int:
        return next(iter(self.vectors.values())).shape[0]

    def vectors_for(self, key: str, path: str = "") -> torch.Tensor:
        """The vectors for text encoder `key`; a single-encoder file answers for 'emb_params' whatever its key."""
        if key in self.vectors:
            return self.vectors[key]
        if key == EMB_PARAMS_KEY and len(self.vectors) == 1:
            return next(iter(self.vectors.values()))
        raise EmbeddingFileError(f"embedding file {path!r} has no vectors for text encoder {key!r} (it holds "
                                 f"{', '.join(sorted(self.vectors))}): it was made for another model family")


def _as_matrix(tensor: torch.Tensor, path: str, key: str) -> torch.Tensor:
    if not torch.is_tensor(tensor) or tensor.dim() not in (1, 2) or tensor.numel() == 0:
        raise EmbeddingFileError(f"embedding file {path!r}: {key!r} is not a [vectors, size] tensor")
    tensor = tensor.detach().to("cpu", torch.float32)
    return tensor.unsqueeze(0) if tensor.dim() == 1 else tensor


def _from_torch_data(data, path: str) -> EmbeddingFile:
    if isinstance(data, Mapping) and "string_to_param" in data:  # A1111
        params = data["string_to_param"]
        params = getattr(params, "_parameters", params)  # files pickled with a ParameterDict
        if not isinstance(params, Mapping) or len(params) != 1:
            raise EmbeddingFileError(f"embedding file {path!r}: string_to_param must hold exactly one entry")
        tensor = next(iter(params.values()))
        step = data.get("step")
        return EmbeddingFile({EMB_PARAMS_KEY: _as_matrix(tensor, path, "string_to_param")},
                             name=data.get("name"), step=int(step) if isinstance(step, int) else None)
    if isinstance(data, Mapping) and data and all(torch.is_tensor(v) for v in data.values()):
        return _from_tensors(dict(data), path, {})
    raise EmbeddingFileError(f"{path!r} is not a textual-inversion embedding: expected A1111 'string_to_param', "
                             f"'emb_params', SDXL 'clip_l'/'clip_g' or a diffusers {{token: vector}} file")


def _from_tensors(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> EmbeddingFile:
    if not tensors:
        raise EmbeddingFileError(f"embedding file {path!r} holds no tensors")
    if set(SDXL_KEYS) <= set(tensors):
        vectors = {k: _as_matrix(tensors[k], path, k) for k in SDXL_KEYS}
        if vectors["clip_l"].shape[0] != vectors["clip_g"].shape[0]:
            raise EmbeddingFileError(f"embedding file {path!r}: clip_l and clip_g hold different numbers of vectors")
        return EmbeddingFile(vectors, metadata=metadata, name=metadata.get("modelspec.title"))
    if len(tensors) != 1:
        raise EmbeddingFileError(f"embedding file {path!r} holds {len(tensors)} tensors "
                                 f"({', '.join(sorted(tensors)[:4])}); an embedding holds one (or clip_l + clip_g)")
    key, tensor = next(iter(tensors.items()))
    name = metadata.get("modelspec.title") or (None if key == EMB_PARAMS_KEY else key)  # diffusers: key = token
    return EmbeddingFile({EMB_PARAMS_KEY: _as_matrix(tensor, path, key)}, name=name, metadata=metadata)


def load_embedding(path: str | os.PathLike) -> EmbeddingFile:
    """Read an embedding file of any supported layout; EmbeddingFileError naming the file when it is not one."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise EmbeddingFileError(f"embedding file {path!r} does not exist: check the path given to 'weights'")
    try:
        if path.lower().endswith(SAFETENSORS_EXT):
            from safetensors import safe_open

            with safe_open(path, framework="pt", device="cpu") as f:
                metadata = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            return _from_tensors(tensors, path, metadata)
        data = torch.load(path, map_location="cpu", weights_only=True)
    except EmbeddingFileError:
        raise
    except Exception as e:  # noqa: BLE001 - any read error is the user's file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise EmbeddingFileError(f"cannot read embedding file {path!r} ({first}): give a .safetensors or "
                                 f".pt/.bin embedding") from None
    return _from_torch_data(data, path)


def a1111_torch_data(vectors: torch.Tensor, *, name: str, step: int | None = None,
                     sd_checkpoint_name: str | None = None) -> dict:
    """The dict A1111 saves in an embedding .pt (loadable with torch.load(weights_only=True))."""
    return {
        "string_to_token": {A1111_PLACEHOLDER: A1111_PLACEHOLDER_ID},
        "string_to_param": {A1111_PLACEHOLDER: vectors},
        "name": name,
        "step": step,
        "sd_checkpoint": None,
        "sd_checkpoint_name": sd_checkpoint_name,
    }


def save_embedding(path: str | os.PathLike, vectors: Mapping[str, torch.Tensor], *, name: str,
                   metadata: Mapping[str, str] | None = None, step: int | None = None,
                   sd_checkpoint_name: str | None = None, dtype: torch.dtype | None = None) -> None:
    """Write `vectors` ({key: [n, dim]}) atomically: safetensors by extension, else a torch file (A1111 layout for
    one text encoder, a plain {key: tensor} dict for SDXL, as A1111 does for SDXL)."""
    path = os.fspath(path)
    tensors = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in vectors.items()}
    if path.lower().endswith(SAFETENSORS_EXT):
        atomic_save_safetensors(tensors, path, metadata=dict(metadata or {}))
        return
    if set(tensors) == {EMB_PARAMS_KEY}:
        atomic_torch_save(a1111_torch_data(tensors[EMB_PARAMS_KEY], name=name, step=step,
                                           sd_checkpoint_name=sd_checkpoint_name), path)
    else:
        atomic_torch_save(tensors, path)
