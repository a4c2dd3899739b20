"""The Stable Diffusion U-Net families (torch-free facts and detection): SD 1.x, SD 2.x (512 epsilon and 768-v) and
SDXL. They share the original (LDM) single-file layout, the CLIP text encoders, the KL autoencoder, the diffusers
U-Net and DDPM training, so they share one package; each is its own registered family.

The torch side: `sd.py` (SD 1.x / 2.x), `sdxl.py`; loading/saving in `loading.py` / `saving.py` with the key maps in
`sd_scripts.models.keymaps`; bundled configs in `configs/`; tiny test models in `tiny.py`.
"""
from __future__ import annotations

import os
from typing import Mapping

from .. import json_config
from ..spec import FamilySpec, MemoryFacts
from .detect import detect_diffusers_family, detect_family, v_prediction_from_metadata

SGM = "https://github.com/Stability-AI/generative-models"
_TINY = "sd_scripts.families.sd.tiny:build_tiny_model"
_SD_LR = {"network": 1e-4, "db": 1e-6, "finetune": 1e-6, "ti": 5e-3}

PART_FILES = ("vae",)  # a VAE file / folder that replaces the checkpoint's (the loader's `vae`)

SPECS = (
    FamilySpec("sd1", "Stable Diffusion 1.x", "sd_scripts.families.sd.sd:SDFamily", bucket_step=64,
               default_resolution=512, vae_scaling_factor=0.18215, base_model_version="sd_v1",
               modelspec_architecture="stable-diffusion-v1", modelspec_implementation="diffusers",
               memory=MemoryFacts(2.0, 0.98, 1.6), learning_rates=_SD_LR, clip_skip=True, tiny_builder=_TINY,
               options=frozenset({"weighted_captions"}),
               tiny_variants={"sd1": {}}, part_files=PART_FILES),
    FamilySpec("sd2", "Stable Diffusion 2.x", "sd_scripts.families.sd.sd:SDFamily", bucket_step=64,
               default_resolution=512, vae_scaling_factor=0.18215, base_model_version="sd_v2",
               modelspec_architecture="stable-diffusion-v2-512", modelspec_implementation="diffusers",
               memory=MemoryFacts(2.6, 1.2, 1.9), learning_rates=_SD_LR, clip_skip=True, ss_v2=True,
               supports_v_prediction=True, v_default_resolution=768, v_base_model_version="sd_v2_v",
               v_modelspec_architecture="stable-diffusion-v2-768-v",
               options=frozenset({"v2", "v_parameterization", "weighted_captions"}), tiny_builder=_TINY,
               tiny_variants={"sd2": {}, "sd2-v": {"v_prediction": True}}, part_files=PART_FILES),
    FamilySpec("sdxl", "Stable Diffusion XL", "sd_scripts.families.sd.sdxl:SDXLFamily", bucket_step=32,
               default_resolution=1024, vae_scaling_factor=0.13025, base_model_version="sdxl_base_v1-0",
               modelspec_architecture="stable-diffusion-xl-v1-base", modelspec_implementation=SGM,
               memory=MemoryFacts(6.9, 3.5, 4.5), learning_rates=dict(_SD_LR, db=1e-5, finetune=1e-5),
               latent_cache_suffix="_sdxl", lora_te_prefixes=("lora_te1", "lora_te2"),
               options=frozenset({"cache_text_encoder_outputs", "cache_text_encoder_outputs_to_disk",
                                  "learning_rate_te1", "learning_rate_te2", "weighted_captions", "block_lr"}),
               scripts=("sdxl_train_network", "sdxl_train", "sdxl_train_textual_inversion"),
               text_encoder_cache=True, ti_keys=("clip_l", "clip_g"), kohya_ss_flags=("sdxl", "sdxl_checkbox"), tiny_builder=_TINY, tiny_variants={"sdxl": {}},
               part_files=PART_FILES,
               # kohya_ss config keys it passes only for SDXL (bmaltais/kohya_ss kohya_gui/class_sdxl_parameters.py)
               kohya_ss_keys={"sdxl_cache_text_encoder_outputs": "cache_text_encoder_outputs",
                              "sdxl_no_half_vae": "no_half_vae"}),
)


def _detected(family: str, v_pred: bool | None):
    from .. import Detected

    return Detected(family, v_pred)


def detect_single_file(shapes: Mapping[str, tuple], metadata: Mapping[str, str]):
    """SD 1.x / 2.x / XL from the original-layout key names (None for other models)."""
    from ...errors import ModelLoadError

    try:
        family = detect_family(shapes)
    except ModelLoadError:
        return None
    return _detected(family, v_prediction_from_metadata(metadata) or "v_pred" in shapes)


def detect_folder(path: str):
    """A diffusers Stable Diffusion pipeline folder (unet/ + text_encoder/ configs); None for other folders."""
    unet = json_config(os.path.join(path, "unet", "config.json"))
    text = json_config(os.path.join(path, "text_encoder", "config.json"))
    if unet is None or text is None:
        return None
    sched = json_config(os.path.join(path, "scheduler", "scheduler_config.json")) or {}
    te2 = os.path.isfile(os.path.join(path, "text_encoder_2", "config.json"))
    return _detected(detect_diffusers_family(unet, text, path, has_text_encoder_2=te2),
                     sched.get("prediction_type") == "v_prediction")
