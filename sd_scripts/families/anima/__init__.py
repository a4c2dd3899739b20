"""Anima (Anima-Preview, CircleStone Labs) as one family (torch-free facts and detection).

Anima is NVIDIA's Cosmos-Predict2 2B DiT ("MiniTrainDIT": adaLN-LoRA, 3D RoPE, cross-attention) conditioned
through an LLM adapter: Qwen3-0.6B hidden states and the caption's T5-vocabulary token ids -> the cross-attention
context; latents of the Qwen-Image (Wan 2.1) VAE, 16 channels, 8x down, normalised per channel; rectified-flow
training (target noise - latents, timestep = sigma).

Facts from kohya-ss/sd-scripts 48d368f (`anima_train_network.py`, `anima_train.py`, `library/anima_*`,
`library/strategy_anima.py`, `networks/lora_anima.py`, `library/sai_model_spec.py`): the files are the DiT
(`net.`-prefixed), `--qwen3` and `--vae`; buckets in 16 px steps; ss_base_model_version 'anima',
modelspec.architecture 'anima-preview', implementation https://huggingface.co/circlestone-labs/Anima; LoRA files
use `lora_unet_` + the MiniTrainDIT module path and `lora_te_` + the Qwen3 module path; caches `_anima.npz`
(normalised latents) and `_anima_te.npz`.

The torch side: `model.py` (AnimaFamily); the denoiser `adapter.py`; files `layout.py` / `weights.py`; tiny test
models `tiny.py`.
"""
from __future__ import annotations

from typing import Mapping

from ..spec import DDPM_ONLY_OPTIONS, FamilySpec, MemoryFacts
from . import layout

NAME = "anima"
ARCHITECTURE = "anima-preview"
IMPLEMENTATION = "https://huggingface.co/circlestone-labs/Anima"
NETWORK_MODULE = "networks.lora_anima"

# sd-scripts' Anima options (anima_train_network / anima_train); every one is declared in sd_scripts/options.py
OPTIONS = frozenset({
    "qwen3", "llm_adapter_path", "t5_tokenizer_path", "qwen3_max_token_length", "t5_max_token_length",
    "llm_adapter_lr", "self_attn_lr", "cross_attn_lr", "mlp_lr", "mod_lr", "vae_disable_cache",
    "unsloth_offload_checkpointing", "attn_mode", "split_attn",
    "timestep_sampling", "sigmoid_scale", "discrete_flow_shift", "weighting_scheme", "logit_mean", "logit_std",
    "mode_scale", "blocks_to_swap", "cpu_offload_checkpointing", "cache_text_encoder_outputs",
    "cache_text_encoder_outputs_to_disk", "text_encoder_batch_size",
})
_REFUSED = {
    **DDPM_ONLY_OPTIONS,
    "clip_skip": "Anima reads Qwen3's last hidden states, so there is no layer to skip",
    "max_token_length": "Anima's token lengths are qwen3_max_token_length and t5_max_token_length",
    "min_timestep": "Anima samples sigmas with timestep_sampling, not integer timesteps",
    "max_timestep": "Anima samples sigmas with timestep_sampling, not integer timesteps",
    "vae_chunk_size": "not implemented for Anima: diffusers' AutoencoderKLQwenImage encodes whole images; use "
                      "cache_latents (each image is encoded once) to keep the VAE's memory out of training",
    "fp8_base": "sd-scripts does not support fp8 for Anima (it turns fp8_base off); remove it",
    "fp8_base_unet": "sd-scripts does not support fp8 for Anima (it turns fp8_base_unet off); remove it",
}
_SCRIPTS = {"network": "anima_train_network", "finetune": "anima_train"}
_TINY = dict(pretrained_model_name_or_path="anima-tiny.safetensors",
             qwen3="qwen_3_06b_base.safetensors", vae="qwen_image_vae.safetensors")

SPECS = (
    FamilySpec(NAME, "Anima", "sd_scripts.families.anima.model:AnimaFamily", bucket_step=16, default_resolution=1024,
               vae_scaling_factor=1.0, base_model_version=NAME, modelspec_architecture=ARCHITECTURE,
               modelspec_implementation=IMPLEMENTATION,
               # DiT 2.0B + adapter 0.1B + Qwen3-0.6B + VAE 0.13B in bf16; a full fine-tune trains the DiT + adapter
               memory=MemoryFacts(weights_gb=5.6, trainable_b=2.1, activations_gb=3.0),
               learning_rates={"network": 1e-4, "finetune": 1e-5}, latent_cache_suffix="_anima",
               lora_te_prefixes=("lora_te",), trainers=frozenset(_SCRIPTS), options=OPTIONS,
               scripts=tuple(_SCRIPTS.values()), trainer_scripts=_SCRIPTS, refused_options=_REFUSED,
               strict_options=True, text_encoder_cache=True, te_cache_caption_dropout=True, ti_keys=(),
               tiny_builder="sd_scripts.families.anima.tiny:build_tiny_model", tiny_variants={NAME: {}},
               tiny_files={NAME: _TINY}, part_files=("qwen3", "vae", "llm_adapter_path"),
               option_values={"network_module": (NETWORK_MODULE,)}),
)


def detect_single_file(shapes: Mapping[str, tuple], metadata: Mapping[str, str]):
    """An Anima DiT file (MiniTrainDIT + LLM adapter, `net.`-prefixed or bare); None otherwise."""
    if not layout.is_anima(shapes):
        return None
    from .. import Detected

    return Detected(NAME, False)


def detect_folder(path: str):
    """diffusers has no Anima pipeline: no folder is Anima's."""
    return None
