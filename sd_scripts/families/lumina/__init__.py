"""Lumina Image 2.0 (Alpha-VLLM's NextDiT, also Neta Lumina) as one family (torch-free facts and detection): a 2B
flow-matching DiT on the FLUX.1 16-channel autoencoder, conditioned on Gemma-2 2B's penultimate hidden states.

Facts from kohya-ss/sd-scripts 48d368f (`lumina_train_network.py`, `lumina_train.py`, `library/lumina_*.py`,
`library/strategy_lumina.py`, `networks/lora_lumina.py`, `library/sai_model_spec.py`): `ss_base_model_version`
'lumina2', `modelspec.architecture` 'lumina-2', implementation https://github.com/Alpha-VLLM/Lumina-Image-2.0, LoRA
files `lora_unet_` (Alpha-VLLM module paths, q/k/v fused as `attention_qkv`) and `lora_te_` (Gemma-2), buckets in
16 px steps, latent caches `_lumina.npz`, text-encoder caches `_lumina_te.npz`.

The torch side: `model.py` (LuminaFamily); files in `layout.py` / `weights.py`; diffusers LoRA names in
`lora_files.py`; tiny test models (with a test Gemma tokenizer) in `tiny.py`.
"""
from __future__ import annotations

import os
from typing import Mapping

from .. import json_config
from ..spec import DDPM_ONLY_OPTIONS, FamilySpec, MemoryFacts
from . import layout

LUMINA = "lumina"
TIMESTEP_SAMPLINGS = ("sigma", "uniform", "sigmoid", "shift", "nextdit_shift", "flux_shift")
# sd-scripts' Lumina options (lumina_train_network / lumina_train); every one is declared in sd_scripts/options.py
OPTIONS = frozenset({
    "gemma2", "ae", "gemma2_max_token_length", "system_prompt", "use_flash_attn", "use_sage_attn",
    "sample_batch_size", "timestep_sampling", "sigmoid_scale", "model_prediction_type", "discrete_flow_shift",
    "weighting_scheme", "logit_mean", "logit_std", "mode_scale", "blocks_to_swap", "fp8_base", "fp8_base_unet",
    "cpu_offload_checkpointing", "cache_text_encoder_outputs", "cache_text_encoder_outputs_to_disk", "mem_eff_save",
    "text_encoder_batch_size",
})
_REFUSED = {
    **DDPM_ONLY_OPTIONS,
    "clip_skip": "Lumina 2 reads Gemma-2's penultimate layer (as sd-scripts); there is no CLIP layer to skip",
    "max_token_length": "Lumina 2 reads Gemma-2 tokens: set gemma2_max_token_length instead",
    "min_timestep": "Lumina 2 samples sigmas with timestep_sampling, not integer timesteps",
    "max_timestep": "Lumina 2 samples sigmas with timestep_sampling, not integer timesteps",
    "vae": "Lumina 2's autoencoder is given with ae",
    "train_text_encoder": "lumina_train trains the denoiser only (Gemma-2 stays frozen, as in sd-scripts); a LoRA "
                          "(lumina_train_network) can adapt Gemma-2",
}
_SCRIPTS = {"network": "lumina_train_network", "finetune": "lumina_train"}
_TINY_FILES = {"pretrained_model_name_or_path": "lumina-tiny.safetensors", "gemma2": "gemma2.safetensors",
               "ae": "ae.safetensors"}

SPECS = (
    FamilySpec(LUMINA, "Lumina Image 2.0", "sd_scripts.families.lumina.model:LuminaFamily", bucket_step=16,
               default_resolution=1024, vae_scaling_factor=0.3611, vae_shift_factor=0.1159,
               base_model_version="lumina2", modelspec_architecture=layout.MODELSPEC_ARCHITECTURE,
               modelspec_implementation=layout.MODELSPEC_IMPLEMENTATION,
               # NextDiT 2.6B + Gemma-2 2.6B + autoencoder 0.08B in fp16
               memory=MemoryFacts(weights_gb=10.5, trainable_b=2.6, activations_gb=4.0),
               learning_rates={"network": 1e-4, "finetune": 1e-5}, latent_cache_suffix="_lumina",
               lora_te_prefixes=("lora_te",), trainers=frozenset(_SCRIPTS), options=OPTIONS,
               scripts=tuple(_SCRIPTS.values()), trainer_scripts=_SCRIPTS, refused_options=_REFUSED,
               strict_options=True, text_encoder_cache=True, ti_keys=(),
               tiny_builder="sd_scripts.families.lumina.tiny:build_tiny_model",
               tiny_variants={"lumina": {}}, tiny_files={"lumina": _TINY_FILES}, part_files=("gemma2", "ae"),
               option_values={"network_module": ("networks.lora_lumina",)}),
)


def _detected():
    from .. import Detected

    return Detected(LUMINA, False)


def detect_single_file(shapes: Mapping[str, tuple], metadata: Mapping[str, str]):
    """A Lumina 2 denoiser in the Alpha-VLLM layout (bare, ComfyUI-prefixed or an all-in-one file); None otherwise."""
    return _detected() if layout.is_denoiser(shapes) else None


def detect_folder(path: str):
    """A diffusers Lumina2Pipeline folder, or its bare transformer folder; None for other folders."""
    index = json_config(os.path.join(path, "model_index.json")) or {}
    if index.get("_class_name") in ("Lumina2Pipeline", "Lumina2Text2ImgPipeline"):
        return _detected()
    config = json_config(os.path.join(path, "config.json")) or {}
    return _detected() if config.get("_class_name") == "Lumina2Transformer2DModel" else None
