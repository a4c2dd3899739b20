"""ModelBundle: the parts of a loaded model every trainer works with, and the VAE identity used by latent caches."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class ModelBundle:
    """A loaded model of any family: its denoiser (a diffusers U-Net or transformer), autoencoder, text encoders and
    their tokenizers (in the family's order), and what its family needs to train and save it.

    `extra_state` holds the single-file tensors no module consumed (the last OpenCLIP layer, text_projection,
    logit_scale, position ids, EMA weights, schedule buffers, ...): they are written back on save so a round trip is
    exact. A released (frozen, no longer needed) part is None.
    """

    family: str
    denoiser: Any
    vae: Any
    text_encoders: list
    tokenizers: list
    source_path: str
    v_prediction: bool = False
    scheduler_config: dict = field(default_factory=dict)  # the training noise schedule, where the family has one
    extra_state: dict[str, torch.Tensor] = field(default_factory=dict)
    vae_id: str = ""
    metadata: dict[str, str] = field(default_factory=dict)  # the single file's header metadata, if any

    # The Stable Diffusion families' names for the same parts (used inside their package and by SD-only tools).
    @property
    def unet(self) -> Any:
        return self.denoiser

    @unet.setter
    def unet(self, value: Any) -> None:
        self.denoiser = value

    def _part(self, parts: list, index: int) -> Any:
        return parts[index] if index < len(parts) else None

    def _set_part(self, parts: list, index: int, value: Any) -> None:
        while len(parts) <= index:
            parts.append(None)
        parts[index] = value

    @property
    def text_encoder(self) -> Any:
        return self._part(self.text_encoders, 0)

    @text_encoder.setter
    def text_encoder(self, value: Any) -> None:
        self._set_part(self.text_encoders, 0, value)

    @property
    def text_encoder_2(self) -> Any:
        return self._part(self.text_encoders, 1)

    @text_encoder_2.setter
    def text_encoder_2(self, value: Any) -> None:
        self._set_part(self.text_encoders, 1, value)

    @property
    def tokenizer(self) -> Any:
        return self._part(self.tokenizers, 0)

    @property
    def tokenizer_2(self) -> Any:
        return self._part(self.tokenizers, 1)

    @property
    def vae_scaling_factor(self) -> float:
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
