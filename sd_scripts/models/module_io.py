"""Small shared pieces of loading and saving model parts, used by every family's loader and saver: one-line
errors from exceptions, filling meta-built modules, diffusers sub-folders, JSON configs, and atomic temp paths."""
from __future__ import annotations

import json
import os
import tempfile
from typing import Mapping

import torch

from ..errors import ModelLoadError


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (at most 200 characters), or its type name."""
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def fill_module(module, state_dict: Mapping[str, torch.Tensor], what: str, path: str, fix: str):
    """Put the tensors into a meta-built module (strict, no copy), turning shape errors into one line that names
    `path` and the part (`what`), followed by `fix` (what the user should do)."""
    try:
        module.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as e:
        detail = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln or "Missing" in ln
                       or "Unexpected" in ln), first_line(e))
        raise ModelLoadError(f"{path}: the {what} weights do not fit the architecture read from the file "
                             f"({detail[:160]}); {fix}") from None
    return module.eval()


def from_pretrained(cls, folder: str, sub: str, dtype: torch.dtype | None):
    """`cls.from_pretrained` of a diffusers / transformers sub-folder, offline, in eval mode; ModelLoadError naming
    the folder otherwise."""
    kwargs: dict = {"local_files_only": True}
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    if sub:
        kwargs["subfolder"] = sub
    try:
        return cls.from_pretrained(folder, **kwargs).eval()
    except Exception as e:  # noqa: BLE001 - any failure here is a problem with the user's folder
        raise ModelLoadError(f"{os.path.join(folder, sub)}: cannot load ({first_line(e)}); re-download or "
                             f"re-convert the model") from None


def read_json(path: str, folder: str, expected: str) -> dict:
    """A config file of a model folder; ModelLoadError when it is missing (saying a complete `expected` is needed)
    or not JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ModelLoadError(f"{folder}: {os.path.relpath(path, folder)} is missing; pass a complete {expected}") \
            from None
    except ValueError as e:
        raise ModelLoadError(f"{path}: not valid JSON ({first_line(e)}); repair or re-download the model") from None


def write_json(path: str, data: Mapping) -> None:
    """A config file as diffusers writes them (indented, sorted keys, final newline)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def temp_path(path: str) -> str:
    """A fresh temporary file next to `path` (same folder, so os.replace is atomic); the folder is created."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    return tmp


def save_safetensors_atomic(tensors: Mapping[str, torch.Tensor], path: str, metadata: Mapping[str, str] | None = None,
                            dtype: torch.dtype | None = None) -> str:
    """Write a deterministic .safetensors file (float tensors cast to `dtype` when given; metadata values as str,
    'format': 'pt' unless set) through a temp file in the same folder and os.replace. Returns `path`. Tensors are
    converted and written one at a time (safetensors_writer.Deferred ones made just then), so the save needs about
    one tensor's memory beyond the model's (what sd-scripts' `mem_eff_save` asks for, always)."""
    from .safetensors_writer import save_safetensors

    meta = {"format": "pt", **{str(k): str(v) for k, v in (metadata or {}).items()}}
    tmp = temp_path(path)
    try:
        save_safetensors(tensors, tmp, metadata=meta, dtype=dtype)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def cast_for_save(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Detached contiguous CPU copies of the tensors, float ones cast to `dtype` when given."""
    out = {}
    for name, t in tensors.items():
        t = t.detach().to("cpu")
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        out[name] = t.contiguous()
    return out
