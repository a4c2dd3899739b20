"""The training loss from a family's prediction and target: per-sample error, then the per-sample weights.

Weights multiply in a fixed order (the batch's own, e.g. prior_loss_weight of regularisation images, then the
objective's, e.g. min-SNR), then the batch mean: a float32 scalar.
"""
from __future__ import annotations

import torch

from .noise import per_sample_mse


def apply_loss_mask(loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-element loss [B, C, h, w] x the loss mask [B, H, W] (0..1, pixel size) area-averaged to h x w, as
    sd-scripts' apply_masked_loss: a pixel with mask 0 adds nothing (and gets no gradient); the mean over the
    elements is then taken as usual (not renormalised by the masked area)."""
    mask = mask.to(device=loss.device, dtype=loss.dtype).unsqueeze(1)
    if mask.shape[-2:] != loss.shape[-2:]:
        mask = torch.nn.functional.interpolate(mask, size=loss.shape[-2:], mode="area")
    return loss * mask


def training_loss(pred: torch.Tensor, target: torch.Tensor, sample_weights: torch.Tensor | None = None,
                  objective_weights: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the batch of MSE(pred, target) per sample x `sample_weights` x `objective_weights` (each [B]);
    with a loss `mask` ([B, H, W], the batch's `loss_masks`) each element's error is weighted by it first."""
    if mask is None:
        loss = per_sample_mse(pred.float(), target.float())
    else:
        loss = apply_loss_mask((pred.float() - target.float()).pow(2), mask).flatten(1).mean(dim=1)
    if sample_weights is not None:
        loss = loss * sample_weights.to(device=loss.device, dtype=loss.dtype)
    if objective_weights is not None:
        loss = loss * objective_weights.to(device=loss.device, dtype=loss.dtype)
    return loss.mean()
