"""Torch-free model detection: which family a checkpoint or diffusers folder is, from key names and configs.

`detect_family` works on names and shapes (a safetensors header gives them without reading weights); the registry
(`sd_scripts.families.probe_model`) uses it to tell the family of a path without importing torch.
"""
from __future__ import annotations

from typing import Mapping

from ...errors import ModelLoadError

from ...models.ldm_layout import (CLIP_PREFIX, OPENCLIP_PREFIX, SDXL_PREFIX, SDXL_REFINER_PREFIX,  # noqa: F401
                                    SDXL_TE1_PREFIX, SDXL_TE2_PREFIX, UNET_PREFIX, VAE_PREFIX)


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
