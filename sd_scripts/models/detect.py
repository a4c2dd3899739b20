"""Torch-free model detection: which family a checkpoint or diffusers folder is, from key names and configs.

`detect_family` works on names and shapes (a safetensors header gives them without reading weights);
`probe_model` lets the GUI and pre-flight checks tell the family of a path without importing torch.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from typing import Mapping

from ..errors import ModelLoadError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPENCLIP_PREFIX = "cond_stage_model.model."
SDXL_PREFIX = "conditioner.embedders."
SDXL_TE1_PREFIX = "conditioner.embedders.0.transformer."  # CLIP-L, transformers layout
SDXL_TE2_PREFIX = "conditioner.embedders.1.model."  # OpenCLIP-bigG, OpenCLIP layout
SDXL_REFINER_PREFIX = "conditioner.embedders.0.model."  # the refiner has only the bigG encoder, as embedder 0


def detect_family(keys_and_shapes: Mapping[str, tuple], source: str = "the model") -> str:
    """'sd1', 'sd2' or 'sdxl' from single-file keys (and shapes), also for tiny test sizes. ModelLoadError naming
    `source` when it is not a Stable Diffusion checkpoint."""
    keys = keys_and_shapes
    # SDXL: its conditioner, or (a U-Net-only file) the added time/size embedding 'label_emb'
    if any(k.startswith(SDXL_PREFIX) for k in keys) or UNET_PREFIX + "label_emb.0.0.weight" in keys:
        return "sdxl"
    if OPENCLIP_PREFIX + "token_embedding.weight" in keys:
        return "sd2"
    if any(k.startswith(CLIP_PREFIX) for k in keys):
        return "sd1"
    proj_in = [k for k in keys if k.startswith(UNET_PREFIX) and k.endswith("proj_in.weight")]
    to_k = [k for k in keys if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight")]
    if proj_in and to_k:
        linear = len(keys[proj_in[0]]) == 2
        return "sd2" if linear or keys[to_k[0]][1] == 1024 else "sd1"
    raise ModelLoadError(f"{source}: not a Stable Diffusion 1.x/2.x/XL checkpoint (no U-Net/text-encoder keys in the "
                         f"original layout); pass a full SD model, or a diffusers folder")


def detect_diffusers_family(unet_config: Mapping, text_config: Mapping, source: str = "the model", *,
                            has_text_encoder_2: bool = False) -> str:
    """Family of a diffusers folder from its configs (works for tiny test models, not only real sizes);
    `has_text_encoder_2`: the folder has a text_encoder_2/ (an SDXL pipeline)."""
    if (unet_config.get("addition_embed_type") == "text_time" or unet_config.get("cross_attention_dim") == 2048
            or has_text_encoder_2):
        return "sdxl"
    if (unet_config.get("use_linear_projection") or text_config.get("hidden_act") == "gelu"
            or unet_config.get("cross_attention_dim") == 1024):
        return "sd2"
    if unet_config.get("cross_attention_dim") is None:
        raise ModelLoadError(f"{source}: unet/config.json is not a text-conditioned U-Net; pass a Stable Diffusion "
                             f"pipeline folder")
    return "sd1"


def v_prediction_from_metadata(metadata: Mapping[str, str]) -> bool:
    """True when a file's modelspec metadata says it predicts v."""
    pred = str(metadata.get("modelspec.prediction_type", "")).lower()
    arch = str(metadata.get("modelspec.architecture", ""))
    return pred in ("v", "v_prediction") or arch.split("/")[0].endswith("-v")


@dataclass(frozen=True)
class ModelProbe:
    """What a path holds, as far as can be told without loading weights. family/v_prediction are None when the
    layout cannot be read without torch (a .ckpt)."""

    layout: str  # 'single_file' | 'diffusers'
    family: str | None
    v_prediction: bool | None


def _safetensors_header(path: str) -> dict:
    with open(path, "rb") as f:
        head = f.read(8)
        (n,) = struct.unpack("<Q", head) if len(head) == 8 else (0,)
        if n < 2 or n > 100_000_000:
            raise ValueError("no safetensors header")
        return json.loads(f.read(n))


def probe_model(path: str) -> ModelProbe:
    """Family and prediction type of a single file or diffusers folder, torch-free. ModelLoadError when the path
    is missing or is not an SD model."""
    if not os.path.exists(path):
        raise ModelLoadError(f"{path}: no such file or folder; check the model path")
    if os.path.isdir(path):
        try:
            with open(os.path.join(path, "unet", "config.json"), encoding="utf-8") as f:
                unet = json.load(f)
            with open(os.path.join(path, "text_encoder", "config.json"), encoding="utf-8") as f:
                text = json.load(f)
        except (OSError, ValueError):
            raise ModelLoadError(f"{path}: not a diffusers Stable Diffusion folder (unet/ and text_encoder/ configs "
                                 f"are needed); pass such a folder or a .safetensors/.ckpt file") from None
        sched = {}
        try:
            with open(os.path.join(path, "scheduler", "scheduler_config.json"), encoding="utf-8") as f:
                sched = json.load(f)
        except (OSError, ValueError):
            pass
        te2 = os.path.isfile(os.path.join(path, "text_encoder_2", "config.json"))
        return ModelProbe("diffusers", detect_diffusers_family(unet, text, path, has_text_encoder_2=te2),
                          sched.get("prediction_type") == "v_prediction")
    if not path.lower().endswith(".safetensors"):
        return ModelProbe("single_file", None, None)
    try:
        header = _safetensors_header(path)
    except (OSError, ValueError, struct.error):
        raise ModelLoadError(f"{path}: not a readable .safetensors file; download it again or pass the right "
                             f"file") from None
    metadata = header.pop("__metadata__", None) or {}
    shapes = {k: tuple(v.get("shape", ())) for k, v in header.items() if isinstance(v, dict)}
    return ModelProbe("single_file", detect_family(shapes, path), v_prediction_from_metadata(metadata))
