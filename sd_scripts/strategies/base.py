"""The small interface every model family implements for the shared training loop."""
from __future__ import annotations

import logging
from typing import Any, Protocol

import torch

log = logging.getLogger(__name__)


class FamilyStrategy(Protocol):
    """What the loop needs from a family. `bundle` is a sd_scripts.models.loading.ModelBundle."""

    family: str
    vae_scaling_factor: float
    latent_cache_suffix: str  # latent .npz name suffix: "_sdxl"; a strategy without it uses "_sd"

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B,3,H,W] in [-1,1] -> UNSCALED latents [B,4,H/8,W/8] (float32)."""

    def encode_captions(self, captions: list[str], *, train_text_encoder: bool) -> Any:
        """Captions -> the conditioning the U-Net takes (cached for fixed captions when the encoder is frozen)."""

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, conditioning: Any,
                batch: dict) -> torch.Tensor:
        """The U-Net's prediction for a batch."""


def strategy_for(bundle, args) -> FamilyStrategy:
    """Pick the strategy of the bundle's family."""
    if bundle.family in ("sd1", "sd2"):
        from .sd import SDStrategy

        return SDStrategy(bundle, clip_skip=args.clip_skip, max_token_length=args.max_token_length)
    if bundle.family == "sdxl":
        from .sdxl import SDXLStrategy

        if getattr(args, "clip_skip", None):
            log.warning("clip_skip is ignored for SDXL: it always uses the penultimate layer of both text encoders")
        return SDXLStrategy(bundle, max_token_length=args.max_token_length)
    raise NotImplementedError(f"model family {bundle.family!r} has no training strategy yet")
