"""Load a model of any registered family, offline, from a single file (.safetensors/.ckpt) or a diffusers folder.

The registry (sd_scripts.families) tells the family from the file's tensor names or the folder's configs; the
family's own loader builds the ModelBundle. Every user-side problem is a ModelLoadError naming the file.
"""
from __future__ import annotations

import os

import torch

from ..errors import ModelLoadError
from ..families import detect_folder, detect_single_file, family_class
from .bundle import ModelBundle
from .checkpoint import open_checkpoint, safetensors_mmap

__all__ = ["ModelBundle", "load_model"]


def load_model(path: str, *, dtype: torch.dtype = torch.float32, **options) -> ModelBundle:
    """The model at `path` as a ModelBundle. `options` are the trainer's loading options (vae, v2,
    v_parameterization, and the separate part files some families take); each family uses the ones it knows."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ModelLoadError(f"{path}: no such file or folder; check the model path")
    with safetensors_mmap(not options.pop("disable_mmap_load_safetensors", False)):
        if os.path.isdir(path):
            family = detect_folder(path).family
            return family_class(family).load(path, dtype=dtype, **options)
        checkpoint = open_checkpoint(path)
        family = detect_single_file(checkpoint.shapes, checkpoint.metadata, path).family
        return family_class(family).load(path, dtype=dtype, checkpoint=checkpoint, **options)
