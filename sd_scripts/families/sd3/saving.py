"""Saving a (fine-tuned) SD3 / SD3.5 model as sd-scripts' `sd3_train` does, or as a diffusers pipeline folder.

Single file (.safetensors, or .ckpt with the same tensors under `state_dict`): the MMDiT under
`model.diffusion_model.` in the SAI layout (`weights.transformer_to_sai`) and the autoencoder under
`first_stage_model.` in the LDM layout; `SD3Transformer2DModel.from_single_file` and our loader read it. Text encoders
that were trained go beside it in their separate-file layouts, as sd-scripts names them: `<stem>_clip_l.safetensors`,
`<stem>_clip_g.safetensors`, `<stem>_t5xxl.safetensors` (frozen ones are the user's files already).
"""
from __future__ import annotations

import os
from typing import Mapping

import torch

from ...models.keymaps import vae_keymap
from ...models.module_io import cast_for_save
from ...training.saving import atomic_save_safetensors, atomic_torch_save
from . import layout
from .weights import transformer_to_sai

_TEXT_ENCODER_FILES = ("clip_l", "clip_g", "t5xxl")


def _write(tensors: dict[str, torch.Tensor], path: str, metadata: Mapping[str, str] | None) -> None:
    if path.lower().endswith(".safetensors"):
        atomic_save_safetensors(tensors, path, {str(k): str(v) for k, v in (metadata or {}).items()})
    else:
        atomic_torch_save({"state_dict": tensors}, path)


def _is_trained(module) -> bool:
    return module is not None and any(p.requires_grad for p in module.parameters())


def _text_encoder_state(name: str, module) -> dict[str, torch.Tensor]:
    from .tiny import _clip_file_state, _t5_file_state

    if name == "t5xxl":
        return _t5_file_state(module)
    return _clip_file_state(module, with_projection=name == "clip_g")


def save_single_file(bundle, path: str, *, dtype: torch.dtype | None = None,
                     metadata: Mapping[str, str] | None = None) -> str:
    """Write the MMDiT + autoencoder file and the trained text encoders' files beside it; returns `path`."""
    transformer, vae = bundle.denoiser, bundle.vae
    tensors = dict(transformer_to_sai(transformer.state_dict(), transformer.config))
    vae_state = vae.state_dict()
    tensors.update(vae_keymap(vae_state.keys(), len(vae.config.block_out_channels)).to_ldm(vae_state))
    _write(cast_for_save(tensors, dtype), path, metadata)
    stem, ext = os.path.splitext(path)
    for name, module in zip(_TEXT_ENCODER_FILES, bundle.text_encoders):
        if _is_trained(module):
            _write(cast_for_save(_text_encoder_state(name, module), dtype), f"{stem}_{name}{ext}", None)
    return path


def save_diffusers(bundle, folder: str, *, dtype: torch.dtype | None = None) -> str:
    """A StableDiffusion3Pipeline folder (safetensors weights) with every part and the tokenizers."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    (clip_l, clip_g, t5), (tok_l, tok_g, tok_t5) = bundle.text_encoders[:3], bundle.tokenizers[:3]
    pipeline = StableDiffusion3Pipeline(transformer=bundle.denoiser, vae=bundle.vae, text_encoder=clip_l,
                                        tokenizer=tok_l, text_encoder_2=clip_g, tokenizer_2=tok_g,
                                        text_encoder_3=t5, tokenizer_3=tok_t5,
                                        scheduler=FlowMatchEulerDiscreteScheduler.from_config(
                                            layout.SCHEDULER_CONFIG))
    pipeline.save_pretrained(folder, safe_serialization=True)
    if dtype is not None:  # cast the written files, not the live (trained) modules
        from safetensors.torch import load_file, save_file

        for root, _dirs, files in os.walk(folder):
            for name in files:
                if name.endswith(".safetensors"):
                    file = os.path.join(root, name)
                    save_file(cast_for_save(load_file(file), dtype), file, metadata={"format": "pt"})
    return folder
