"""The training loss from a family's prediction and target: per-sample error, then the per-sample weights.

Weights multiply in a fixed order (the batch's own, e.g. prior_loss_weight of regularisation images, then the
objective's, e.g. min-SNR), then the batch mean: a float32 scalar.
"""
from __future__ import annotations

import torch

from .noise import per_sample_mse


def training_loss(pred: torch.Tensor, target: torch.Tensor, sample_weights: torch.Tensor | None = None,
                  objective_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the batch of MSE(pred, target) per sample x `sample_weights` x `objective_weights` (each [B])."""
    loss = per_sample_mse(pred.float(), target.float())
    if sample_weights is not None:
        loss = loss * sample_weights.to(device=loss.device, dtype=loss.dtype)
    if objective_weights is not None:
        loss = loss * objective_weights.to(device=loss.device, dtype=loss.dtype)
    return loss.mean()
