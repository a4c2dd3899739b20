"""SD3 / SD3.5 (MMDiT) as one family (torch-free facts and detection): SD3 medium, SD3.5 medium (MMDiT-X) and SD3.5
large, told apart by the file (`layout.classify`), trained with flow matching on a 16-channel autoencoder and
conditioned on CLIP-L + CLIP-G + T5-XXL.

Facts from kohya-ss/sd-scripts 48d368f (`sd3_train_network.py`, `sd3_train.py`, `library/sd3_train_utils.py`,
`library/sai_model_spec.py`): `ss_base_model_version` is the MMDiT's model type ('medium', '5-medium', '5-large'),
`modelspec.architecture` 'stable-diffusion-3-' + that type, LoRA files use `lora_unet` / `lora_te1` (CLIP-L) /
`lora_te2` (CLIP-G) / `lora_te3` (T5), buckets are checked against 32 px steps.

The torch side: `model.py` (SD3Family); files in `layout.py` / `weights.py`; tiny test models in `tiny.py`.
"""
from __future__ import annotations

import json
import os
from typing import Mapping

from ..spec import DDPM_ONLY_OPTIONS, FamilySpec, MemoryFacts
from . import layout

#: sd-scripts' MMDiT model type per variant: `ss_base_model_version`, and `modelspec.architecture` after
#: 'stable-diffusion-3-'
MODEL_TYPES = {"sd3_medium": "medium", "sd35_medium": "5-medium", "sd35_large": "5-large"}

OPTIONS = frozenset({
    "clip_l", "clip_g", "t5xxl", "t5xxl_max_token_length", "apply_lg_attn_mask", "apply_t5_attn_mask",
    "clip_l_dropout_rate", "clip_g_dropout_rate", "t5_dropout_rate", "training_shift", "weighting_scheme",
    "logit_mean", "logit_std", "mode_scale", "pos_emb_random_crop_rate", "enable_scaled_pos_embed",
    "cache_text_encoder_outputs", "cache_text_encoder_outputs_to_disk", "blocks_to_swap", "fp8_base",
    "fp8_base_unet", "cpu_offload_checkpointing", "learning_rate_te1", "learning_rate_te2", "learning_rate_te3",
    "train_t5xxl", "use_t5xxl_cache_only", "text_encoder_batch_size", "num_last_block_to_freeze",
})

# what the tiny builder writes with layout 'single' (tiny.py): the MMDiT + autoencoder file and the separate text
# encoders (the file with bundled encoders is written too, but the demo uses the separate files users have)
_TINY_PARTS = {"clip_l": "clip_l.safetensors", "clip_g": "clip_g.safetensors", "t5xxl": "t5xxl.safetensors"}
# kohya_ss GUI config keys (bmaltais/kohya_ss kohya_gui/class_sd3.py, lora_gui.py / dreambooth_gui.py) that it
# passes to sd-scripts only with its 'sd3_checkbox' on -> our option; plain clip_l / t5xxl are the SD3 files in
# configs of kohya_ss before the sd3_-prefixed fields (a set prefixed field wins)
_KOHYA_KEYS = {
    **{name: name for name in ("clip_g", "clip_g_dropout_rate", "logit_mean", "logit_std", "mode_scale",
                               "pos_emb_random_crop_rate", "weighting_scheme", "clip_l", "t5xxl")},
    "sd3_cache_text_encoder_outputs": "cache_text_encoder_outputs",
    "sd3_cache_text_encoder_outputs_to_disk": "cache_text_encoder_outputs_to_disk",
    "sd3_fused_backward_pass": "fused_backward_pass",
    "sd3_clip_l": "clip_l",
    "sd3_clip_l_dropout_rate": "clip_l_dropout_rate",
    "sd3_t5_dropout_rate": "t5_dropout_rate",
    "sd3_t5xxl": "t5xxl",
    "sd3_enable_scaled_pos_embed": "enable_scaled_pos_embed",
    "sd3_text_encoder_batch_size": "text_encoder_batch_size",
}
_REFUSED = {
    "use_t5xxl_cache_only": "caching only T5-XXL's outputs while CLIP-L / CLIP-G train is not implemented; remove it "
                            "(with train_text_encoder every encoder runs each step; without it every output is cached "
                            "with cache_text_encoder_outputs)",
}
_KOHYA_UNSUPPORTED = {
    "save_clip": "saving the text encoders into the fine-tuned file is not implemented",
    "save_t5xxl": "saving T5-XXL into the fine-tuned file is not implemented",
    "t5xxl_device": "T5-XXL runs on the training device here",
    "t5xxl_dtype": "T5-XXL runs in the mixed precision here",
    "sd3_disable_mmap_load_safetensors": "not needed: weights are memory-mapped and read lazily here",
}

SPECS = (
    FamilySpec("sd3", "Stable Diffusion 3 / 3.5", "sd_scripts.families.sd3.model:SD3Family", bucket_step=32,
               default_resolution=1024, vae_scaling_factor=layout.VAE_SCALING_FACTOR,
               vae_shift_factor=layout.VAE_SHIFT_FACTOR, base_model_version=MODEL_TYPES["sd3_medium"],
               modelspec_architecture=layout.MODELSPEC_ARCHITECTURE["sd3_medium"],
               modelspec_implementation="diffusers",
               # SD3.5 large, the largest variant: MMDiT 8.1B + CLIP-L 0.12B + CLIP-G 0.69B + T5-XXL 4.7B in fp16
               memory=MemoryFacts(weights_gb=27.5, trainable_b=8.9, activations_gb=6.0),
               learning_rates={"network": 1e-4, "finetune": 5e-6}, latent_cache_suffix="_sd3",
               lora_te_prefixes=("lora_te1", "lora_te2", "lora_te3"), trainers=frozenset({"network", "finetune"}),
               options=OPTIONS, scripts=("sd3_train_network", "sd3_train"),
               trainer_scripts={"network": "sd3_train_network", "finetune": "sd3_train"}, strict_options=True,
               refused_options={**DDPM_ONLY_OPTIONS, **_REFUSED},
               text_encoder_cache=True, kohya_ss_flags=("sd3_checkbox",),
               tiny_builder="sd_scripts.families.sd3.tiny:build_tiny_model",
               tiny_variants={"sd3": {"variant": "sd3_medium"}, "sd35-medium": {"variant": "sd35_medium"}},
               tiny_files={"sd3": dict(_TINY_PARTS, pretrained_model_name_or_path="tiny-sd3_medium.safetensors"),
                           "sd35-medium": dict(_TINY_PARTS,
                                               pretrained_model_name_or_path="tiny-sd35_medium.safetensors")},
               kohya_ss_keys=_KOHYA_KEYS, kohya_ss_unsupported=_KOHYA_UNSUPPORTED,
               option_values={"network_module": ("networks.lora_sd3",)},
               part_files=("clip_l", "clip_g", "t5xxl", "vae")),
)


def _detected():
    from .. import Detected

    return Detected("sd3", False)


def detect_single_file(shapes: Mapping[str, tuple], metadata: Mapping[str, str]):
    """An SAI SD3 / SD3.5 single file (MMDiT under `model.diffusion_model.`, or a bare MMDiT); None otherwise."""
    return _detected() if layout.classify(shapes) is not None else None


def detect_folder(path: str):
    """A diffusers StableDiffusion3Pipeline folder (model_index.json names the class); None for other folders."""
    try:
        with open(os.path.join(path, "model_index.json"), encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(index, dict) or index.get("_class_name") != "StableDiffusion3Pipeline":
        return None
    return _detected()
