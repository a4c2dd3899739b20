"""HunyuanImage-2.1 (torch-free facts and detection): Tencent's 17B dual/single-stream DiT on a 32x, 64-channel VAE,
conditioned on Qwen2.5-VL-7B (the caption) and byT5 (quoted glyph text), trained with flow matching. LoRA only, as
sd-scripts 48d368f (`hunyuan_image_train_network.py`).

sd-scripts' names: ss_base_model_version and modelspec.architecture 'hunyuan-image-2.1' (+ '/lora'), implementation
'diffusers' in its LoRA files (IMPLEMENTATION is the model's own repository), LoRA module
`networks.lora_hunyuan_image` with `lora_unet_` keys, latents cached as `_hi.npz`, text-encoder outputs as
`_hi_te.npz`; buckets are checked against 32 px steps.

The torch side: `model.py` (HunyuanImageFamily); file layouts: `layout.py`, `weights.py`; tiny models: `tiny.py`.
"""
from __future__ import annotations

import os
from typing import Mapping

from .. import json_config
from ..spec import DDPM_ONLY_OPTIONS, FamilySpec, MemoryFacts
from . import layout

NAME = "hunyuan_image"
BASE_MODEL_VERSION = ARCHITECTURE = "hunyuan-image-2.1"
IMPLEMENTATION = "https://github.com/Tencent-Hunyuan/HunyuanImage-2.1"
SCRIPT = "hunyuan_image_train_network"

OPTIONS = frozenset({
    "text_encoder", "byt5", "fp8_scaled", "fp8_vl", "text_encoder_cpu", "vae_chunk_size", "attn_mode", "split_attn",
    "timestep_sampling", "sigmoid_scale", "model_prediction_type", "discrete_flow_shift", "weighting_scheme",
    "logit_mean", "logit_std", "mode_scale", "blocks_to_swap", "fp8_base", "fp8_base_unet",
    "cpu_offload_checkpointing", "cache_text_encoder_outputs", "cache_text_encoder_outputs_to_disk",
    "text_encoder_batch_size",
})
_REFUSED = {
    **DDPM_ONLY_OPTIONS,
    "clip_skip": "HunyuanImage-2.1 takes Qwen2.5-VL's third-last layer, as sd-scripts; there is no layer to choose",
    "max_token_length": "the Qwen2.5-VL prompt holds up to 1024 tokens, as sd-scripts; remove max_token_length",
    "min_timestep": "HunyuanImage-2.1 samples sigmas with timestep_sampling, not integer timesteps",
    "max_timestep": "HunyuanImage-2.1 samples sigmas with timestep_sampling, not integer timesteps",
    "v2": "not a Stable Diffusion 2 model", "v_parameterization": "HunyuanImage-2.1 is trained with flow matching",
}
_TINY_FILES = {"pretrained_model_name_or_path": "hunyuanimage2.1-tiny.safetensors",
               "text_encoder": "qwen_2.5_vl.safetensors", "byt5": "byt5.safetensors", "vae": "vae.safetensors"}

SPECS = (
    FamilySpec(NAME, "HunyuanImage-2.1", "sd_scripts.families.hunyuan_image.model:HunyuanImageFamily",
               bucket_step=32, default_resolution=2048, vae_scaling_factor=layout.VAE_SCALING_FACTOR,
               base_model_version=BASE_MODEL_VERSION, modelspec_architecture=ARCHITECTURE,
               modelspec_implementation="diffusers",  # what sd-scripts' LoRA files of this family say
               # DiT 17B + Qwen2.5-VL-7B 8.3B + byT5 0.2B + VAE 0.4B in bf16 / fp16; LoRA only
               memory=MemoryFacts(weights_gb=52.0, trainable_b=17.0, activations_gb=8.0),
               learning_rates={"network": 1e-4}, latent_cache_suffix="_hi", lora_te_prefixes=("lora_te1", "lora_te2"),
               trainers=frozenset({"network"}), options=OPTIONS, scripts=(SCRIPT,),
               trainer_scripts={"network": SCRIPT}, refused_options=_REFUSED, strict_options=True,
               text_encoder_cache=True, lora_text_encoders=False, ti_keys=(),
               tiny_builder="sd_scripts.families.hunyuan_image.tiny:build_tiny_model",
               tiny_variants={"hunyuan-image": {}}, tiny_files={"hunyuan-image": _TINY_FILES},
               part_files=("text_encoder", "byt5", "vae"),
               option_values={"network_module": ("networks.lora_hunyuan_image",)}),
)


def _detected():
    from .. import Detected

    return Detected(NAME, False)


def detect_single_file(shapes: Mapping[str, tuple], metadata: Mapping[str, str]):
    """The official (or ComfyUI-named) HunyuanImage-2.1 DiT file; None otherwise."""
    return _detected() if layout.is_dit(shapes) else None


def detect_folder(path: str):
    """A diffusers HunyuanImagePipeline folder (model_index.json names the class); None for other folders."""
    index = json_config(os.path.join(path, "model_index.json")) or {}
    return _detected() if index.get("_class_name") == "HunyuanImagePipeline" else None
