"""FLUX.1 (dev, schnell) and Chroma (torch-free facts and detection): two registered families, one package.

FLUX.1 and Chroma share the Black Forest Labs single-file layout of the denoiser, the T5-XXL text encoder, the
16-channel autoencoder, flow-matching training and the LoRA names; Chroma drops CLIP-L and the guidance/modulation
embedders. They are two families (their own metadata names, text-encoder prefixes and tiny models) with one torch side:
`model.py` (`FluxFamily`). File layouts and the BFL <-> diffusers key table: `layout.py`; loading and saving:
`weights.py`; tiny test models: `tiny.py` (written as separate part files, see `build_tiny_model`).

sd-scripts names (48d368f, `library/sai_model_spec.py`, `library/flux_utils.py`): modelspec.architecture
'flux-1-dev' / 'flux-1-schnell' / 'chroma', implementation https://github.com/black-forest-labs/flux (Chroma:
https://huggingface.co/lodestones/Chroma), ss_base_model_version 'flux1' / 'chroma'.
"""
from __future__ import annotations

import os
from typing import Mapping

from .. import json_config
from ..spec import DDPM_ONLY_OPTIONS, FamilySpec, MemoryFacts
from . import layout

FLUX, CHROMA = "flux", "chroma"
MODEL_TYPES = (FLUX, CHROMA)  # --model_type (sd-scripts' choices)
IMPL_FLUX = "https://github.com/black-forest-labs/flux"
IMPL_CHROMA = "https://huggingface.co/lodestones/Chroma"
ARCH_DEV, ARCH_SCHNELL, ARCH_CHROMA = "flux-1-dev", "flux-1-schnell", "chroma"

_CLASS = "sd_scripts.families.flux.model:FluxFamily"
_TINY = "sd_scripts.families.flux.tiny:build_tiny_model"
# sd-scripts' FLUX options (flux_train_network / flux_train); every one is declared in sd_scripts/options.py
OPTIONS = frozenset({
    "clip_l", "t5xxl", "ae", "model_type", "t5xxl_max_token_length", "apply_t5_attn_mask", "guidance_scale",
    "timestep_sampling", "sigmoid_scale", "model_prediction_type", "discrete_flow_shift", "weighting_scheme",
    "logit_mean", "logit_std", "mode_scale", "blocks_to_swap", "fp8_base", "fp8_base_unet",
    "cpu_offload_checkpointing", "cache_text_encoder_outputs", "cache_text_encoder_outputs_to_disk", "mem_eff_save",
    "text_encoder_batch_size", "single_blocks_to_swap", "double_blocks_to_swap",
})
# options every family has that a FLUX.1 / Chroma run cannot use, with the reason
_REFUSED = {
    **DDPM_ONLY_OPTIONS,
    "clip_skip": "FLUX.1 uses CLIP-L's pooled output only, so there is no layer to skip",
    "max_token_length": "FLUX.1 reads T5-XXL tokens: set t5xxl_max_token_length instead",
    "min_timestep": "FLUX.1 samples sigmas with timestep_sampling, not integer timesteps",
    "max_timestep": "FLUX.1 samples sigmas with timestep_sampling, not integer timesteps",
    "vae": "FLUX.1's autoencoder is given with ae",
}
_LR = {"network": 1e-4, "finetune": 5e-6}
# what the tiny builder writes (tiny.py: the BFL denoiser file and the part files next to it)
_TINY_PARTS = {"clip_l": "clip_l.safetensors", "t5xxl": "t5xxl.safetensors", "ae": "ae.safetensors"}
_TINY_FLUX = dict(_TINY_PARTS, pretrained_model_name_or_path="flux1-tiny.safetensors")
_TINY_CHROMA = {"pretrained_model_name_or_path": "chroma-tiny.safetensors", "t5xxl": "t5xxl.safetensors",
                "ae": "ae.safetensors"}
# kohya_ss GUI config keys (bmaltais/kohya_ss kohya_gui/class_flux1.py, lora_gui.py / dreambooth_gui.py) that it
# passes to sd-scripts only with its 'flux1_checkbox' on -> our option or network_args item
_KOHYA_KEYS = {
    **{name: name for name in ("model_type", "ae", "clip_l", "t5xxl", "discrete_flow_shift", "model_prediction_type",
                               "timestep_sampling", "t5xxl_max_token_length", "guidance_scale", "apply_t5_attn_mask",
                               "cpu_offload_checkpointing", "fp8_base_unet", "blocks_to_swap", "mem_eff_save",
                               "single_blocks_to_swap", "double_blocks_to_swap")},
    "flux1_cache_text_encoder_outputs": "cache_text_encoder_outputs",
    "flux1_cache_text_encoder_outputs_to_disk": "cache_text_encoder_outputs_to_disk",
    "flux_fused_backward_pass": "fused_backward_pass",
    "train_blocks": "network_args:train_blocks",
    "split_qkv": "network_args:split_qkv",
    "train_t5xxl": "network_args:train_t5xxl",
    **{key: f"network_args:{key}" for key in ("img_attn_dim", "img_mlp_dim", "img_mod_dim", "single_dim",
                                              "txt_attn_dim", "txt_mlp_dim", "txt_mod_dim", "single_mod_dim",
                                              "in_dims", "train_double_block_indices", "train_single_block_indices")},
}
_KOHYA_UNSUPPORTED = {
    "split_mode": "sd-scripts' split_mode (deprecated there) is not implemented; use blocks_to_swap to save memory "
                  "and network_args train_blocks=single to train only the single blocks",
    "show_timesteps": "sd-scripts' timestep plot is not implemented",
    "show_timesteps_resolution": "sd-scripts' timestep plot is not implemented",
    "ggpo_beta": "GGPO regularisation is not implemented",
    "ggpo_sigma": "GGPO regularisation is not implemented",
}
_SCRIPTS = {"network": "flux_train_network", "finetune": "flux_train"}
# sd-scripts' FLUX network modules: its LoRA (the first: the family's LoRA network) and OFT
_NETWORK_MODULES = ("networks.lora_flux", "networks.oft_flux")

SPECS = (
    FamilySpec(FLUX, "FLUX.1", _CLASS, bucket_step=16, default_resolution=1024,
               vae_scaling_factor=layout.AE_SCALING_FACTOR, vae_shift_factor=layout.AE_SHIFT_FACTOR,
               base_model_version="flux1", modelspec_architecture=ARCH_DEV, modelspec_implementation=IMPL_FLUX,
               memory=MemoryFacts(weights_gb=33.0, trainable_b=11.9, activations_gb=6.0), learning_rates=_LR,
               latent_cache_suffix="_flux", lora_te_prefixes=("lora_te1", "lora_te3"),
               trainers=frozenset(_SCRIPTS), options=OPTIONS, scripts=tuple(_SCRIPTS.values()),
               trainer_scripts=_SCRIPTS, refused_options=_REFUSED, strict_options=True, text_encoder_cache=True,
               ti_keys=(), kohya_ss_flags=("flux1_checkbox",), tiny_builder=_TINY,
               tiny_variants={"flux": {"model_type": "flux_dev"}, "flux-schnell": {"model_type": "flux_schnell"}},
               tiny_files={"flux": _TINY_FLUX, "flux-schnell": _TINY_FLUX}, part_files=("clip_l", "t5xxl", "ae"),
               kohya_ss_keys=_KOHYA_KEYS, kohya_ss_unsupported=_KOHYA_UNSUPPORTED,
               variant_refused_options={"flux_schnell": {
                   "guidance_scale": "FLUX.1-schnell has no guidance embedding (only dev is guidance-distilled), so "
                                     "the value would be ignored"}},
               option_values={"model_type": MODEL_TYPES, "network_module": _NETWORK_MODULES}),
    FamilySpec(CHROMA, "Chroma", _CLASS, bucket_step=16, default_resolution=1024,
               vae_scaling_factor=layout.AE_SCALING_FACTOR, vae_shift_factor=layout.AE_SHIFT_FACTOR,
               base_model_version="chroma", modelspec_architecture=ARCH_CHROMA,
               modelspec_implementation=IMPL_CHROMA,
               memory=MemoryFacts(weights_gb=27.0, trainable_b=8.9, activations_gb=6.0), learning_rates=_LR,
               latent_cache_suffix="_flux", lora_te_prefixes=("lora_te3",),
               trainers=frozenset(_SCRIPTS), options=OPTIONS - {"clip_l", "guidance_scale"},
               scripts=tuple(_SCRIPTS.values()), trainer_scripts=_SCRIPTS,
               refused_options=dict(_REFUSED, clip_l="Chroma has no CLIP-L text encoder: remove clip_l",
                                    guidance_scale="Chroma has no guidance embedding: remove guidance_scale"),
               strict_options=True, text_encoder_cache=True, ti_keys=(), tiny_builder=_TINY,
               tiny_variants={"chroma": {"model_type": "chroma"}}, tiny_files={"chroma": _TINY_CHROMA},
               part_files=("t5xxl", "ae"),
               option_values={"model_type": MODEL_TYPES, "network_module": _NETWORK_MODULES}),
)


def _detected(family: str, variant: str | None = None):
    from .. import Detected

    return Detected(family, False, variant)


def detect_single_file(shapes: Mapping[str, tuple], metadata: Mapping[str, str]):
    """A FLUX.1-dev / schnell or Chroma denoiser in the BFL layout (bare or ComfyUI-prefixed); None otherwise."""
    kind = layout.classify_denoiser(shapes)
    if kind is None:
        return None
    return _detected(CHROMA, kind) if kind == "chroma" else _detected(FLUX, kind)


def _folder_variant(transformer_config: dict) -> str:
    return "flux_dev" if transformer_config.get("guidance_embeds", True) else "flux_schnell"


def detect_folder(path: str):
    """A diffusers FluxPipeline / ChromaPipeline folder (model_index.json), or a bare transformer folder of one."""
    index = json_config(os.path.join(path, "model_index.json")) or {}
    pipeline = index.get("_class_name")
    if pipeline == "FluxPipeline":
        return _detected(FLUX, _folder_variant(json_config(os.path.join(path, "transformer", "config.json")) or {}))
    if pipeline == "ChromaPipeline":
        return _detected(CHROMA)
    config = json_config(os.path.join(path, "config.json")) or {}
    if config.get("_class_name") == "FluxTransformer2DModel":
        return _detected(FLUX, _folder_variant(config))
    if config.get("_class_name") == "ChromaTransformer2DModel":
        return _detected(CHROMA)
    return None
