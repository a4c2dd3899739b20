"""ModelBundle: everything a trainer needs from a loaded SD1.x/SD2.x/SDXL model, and the VAE identity used by caches."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class ModelBundle:
    """A loaded model. `extra_state` holds the single-file tensors no module consumed (the last OpenCLIP layer,
    text_projection, logit_scale, position ids, EMA weights, schedule buffers, ...): they are written back on save so
    a round trip is exact.

    SDXL also has `text_encoder_2` (transformers CLIPTextModelWithProjection, the OpenCLIP-bigG encoder) and
    `tokenizer_2` (pads with id 0, '!'); both are None for SD1/SD2. Code that works for every family uses the
    `text_encoders` / `tokenizers` lists.
    """

    family: str  # 'sd1' | 'sd2' | 'sdxl'
    v_prediction: bool
    unet: Any  # diffusers UNet2DConditionModel
    vae: Any  # diffusers AutoencoderKL
    text_encoder: Any  # transformers CLIPTextModel
    tokenizer: Any  # transformers CLIPTokenizer
    scheduler_config: dict  # DDPMScheduler kwargs of the training schedule, incl. prediction_type
    source_path: str
    extra_state: dict[str, torch.Tensor] = field(default_factory=dict)
    vae_id: str = ""
    metadata: dict[str, str] = field(default_factory=dict)  # the single file's header metadata, if any
    text_encoder_2: Any = None  # SDXL: transformers CLIPTextModelWithProjection (OpenCLIP-bigG); else None
    tokenizer_2: Any = None  # SDXL: CLIPTokenizer padding with id 0 ('!'); else None

    @property
    def text_encoders(self) -> list:
        """[text_encoder] (SD1/SD2) or [text_encoder, text_encoder_2] (SDXL)."""
        return [self.text_encoder] if self.text_encoder_2 is None else [self.text_encoder, self.text_encoder_2]

    @property
    def tokenizers(self) -> list:
        """[tokenizer] (SD1/SD2) or [tokenizer, tokenizer_2] (SDXL), in the order of `text_encoders`."""
        return [self.tokenizer] if self.tokenizer_2 is None else [self.tokenizer, self.tokenizer_2]

    @property
    def vae_scaling_factor(self) -> float:
        """Latent scale: 0.18215 (SD1/SD2) or 0.13025 (SDXL), from the VAE config."""
        return float(self.vae.config.scaling_factor)

    @property
    def prediction_type(self) -> str:
        return "v_prediction" if self.v_prediction else "epsilon"


_VAE_ID_SAMPLES = 4096


def compute_vae_id(vae: torch.nn.Module) -> str:
    """A short, stable id of the VAE encoder weights (what latents depend on), cheap even for the real VAE.

    Hashes the name, shape and a strided sample of at most 4096 values (as float32) of every encoder and
    quant_conv tensor, so a different VAE changes the id, and a decoder-only fine-tune (same latents) does not.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        if not name.startswith(("encoder.", "quant_conv.")):
            continue
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // _VAE_ID_SAMPLES)
        sample = flat[::step][:_VAE_ID_SAMPLES].to(torch.float32).contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]
