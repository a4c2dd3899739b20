"""The small interface every model family implements for the shared training loop."""
from __future__ import annotations

from typing import Any, Protocol

import torch


class FamilyStrategy(Protocol):
    """What the loop needs from a family. `bundle` is a sd_scripts.models.loading.ModelBundle."""

    family: str
    vae_scaling_factor: float

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
    raise NotImplementedError(f"model family {bundle.family!r} has no training strategy yet")
