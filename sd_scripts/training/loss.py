"""The training loss from a family's prediction and target: an element-wise loss (`--loss_type`), times the loss mask
(masked_loss / alpha_mask), its mean per sample, then the per-sample weights.

Weights multiply in a fixed order (the batch's own, e.g. prior_loss_weight of regularisation images, then the
objective's, e.g. min-SNR), then the batch mean: a float32 scalar.

Loss types (sd-scripts 48d368f `--loss_type`, `library/train_util.py` `conditional_loss`), with d = pred - target and
a per-sample threshold c from `--huber_schedule` (`huber_thresholds`):
- 'l2' (default): d^2;  'l1': |d|;
- 'huber': the pseudo-Huber loss 2 c (sqrt(d^2 + c^2) - c) (Charbonnier 1994; Barron 2019,
  https://arxiv.org/abs/1701.03077): quadratic (d^2) for |d| << c, linear (2 c |d|) beyond;
- 'smooth_l1': 2 (sqrt(d^2 + c^2) - c), the same curve divided by c (d^2 / c near 0, 2 |d| far out).
Scheduled Huber loss: Khrapov et al. 2024, "Improving Diffusion Models's Data-Corruption Resistance using Scheduled
Pseudo-Huber Loss", https://arxiv.org/abs/2403.16728.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

LOSS_TYPES = ("l1", "l2", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")
THRESHOLD_LOSS_TYPES = ("huber", "smooth_l1")
LOSS_OPTIONS = ("loss_type", "huber_schedule", "huber_c", "huber_scale")  # what LossSettings reads


def huber_thresholds(schedule: str, timesteps: torch.Tensor, huber_c: float, huber_scale: float = 1.0,
                     num_train_timesteps: int = 1000, alphas_cumprod: torch.Tensor | None = None) -> torch.Tensor:
    """The Huber threshold c of each sample, float32 [B] on the timesteps' device (sd-scripts
    `get_huber_threshold_if_needed`), t the timestep the denoiser gets (DDPM: 0..999; flow matching: sigma * 1000):

    - 'constant': huber_c * huber_scale;
    - 'exponential': huber_scale * exp(-a t) with a = -ln(huber_c) / num_train_timesteps, i.e. huber_scale at t = 0
      falling to huber_c * huber_scale at t = num_train_timesteps;
    - 'snr' (DDPM only, needs `alphas_cumprod`): (1 - huber_c) / (1 + sigma_t)^2 + huber_c with
      sigma_t = sqrt((1 - a_t) / a_t), near 1 for clean timesteps and huber_c for noisy ones (huber_scale is not used,
      as in sd-scripts).
    """
    t = timesteps.float()
    if schedule == "constant":
        return torch.full_like(t, huber_c * huber_scale)
    if schedule == "exponential":
        return torch.exp(t * (math.log(huber_c) / num_train_timesteps)) * huber_scale
    if schedule == "snr":
        if alphas_cumprod is None:
            raise ValueError("the 'snr' Huber schedule needs a DDPM noise schedule (alphas_cumprod)")
        a = alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps.long()]
        sigmas = ((1.0 - a) / a).sqrt()
        return (1.0 - huber_c) / (1.0 + sigmas) ** 2 + huber_c
    raise ValueError(f"huber_schedule must be one of {', '.join(HUBER_SCHEDULES)}; got {schedule!r}")


def elementwise_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str = "l2",
                     huber_c: torch.Tensor | None = None) -> torch.Tensor:
    """The loss of every element, float32, shaped like `pred` (see the module docstring); `huber_c` [B] is needed by
    'huber' and 'smooth_l1'."""
    diff = pred.float() - target.float()
    if loss_type == "l2":
        return diff.pow(2)
    if loss_type == "l1":
        return diff.abs()
    if loss_type in THRESHOLD_LOSS_TYPES:
        if huber_c is None:
            raise ValueError(f"loss_type {loss_type!r} needs per-sample thresholds (huber_c)")
        c = huber_c.to(device=diff.device, dtype=torch.float32).reshape(-1, *([1] * (diff.ndim - 1)))
        curve = torch.sqrt(diff.pow(2) + c.pow(2)) - c
        return 2.0 * c * curve if loss_type == "huber" else 2.0 * curve
    raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}; got {loss_type!r}")


def apply_loss_mask(loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-element loss [B, C, h, w] x the loss mask [B, H, W] (0..1, pixel size) area-averaged to h x w, as
    sd-scripts' apply_masked_loss: a pixel with mask 0 adds nothing (and gets no gradient); the mean over the
    elements is then taken as usual (not renormalised by the masked area)."""
    mask = mask.to(device=loss.device, dtype=loss.dtype).unsqueeze(1)
    if mask.shape[-2:] != loss.shape[-2:]:
        mask = torch.nn.functional.interpolate(mask, size=loss.shape[-2:], mode="area")
    return loss * mask


def training_loss(pred: torch.Tensor, target: torch.Tensor, sample_weights: torch.Tensor | None = None,
                  objective_weights: torch.Tensor | None = None, mask: torch.Tensor | None = None, *,
                  loss_type: str = "l2", huber_c: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the batch of mean(elementwise_loss(pred, target)) per sample x `sample_weights` x
    `objective_weights` (each [B]); with a loss `mask` ([B, H, W], the batch's `loss_masks`) each element's loss is
    weighted by it first (as sd-scripts: the loss type, then the mask, then the means)."""
    loss = elementwise_loss(pred, target, loss_type, huber_c)
    if mask is not None:
        loss = apply_loss_mask(loss, mask)
    loss = loss.reshape(loss.shape[0], -1).mean(dim=1)
    if sample_weights is not None:
        loss = loss * sample_weights.to(device=loss.device, dtype=loss.dtype)
    if objective_weights is not None:
        loss = loss * objective_weights.to(device=loss.device, dtype=loss.dtype)
    return loss.mean()


@dataclass(frozen=True)
class LossSettings:
    """The run's `--loss_type` and Huber options (sd-scripts' defaults); a family's objective asks it for each
    batch's thresholds and hands both to the loop in its NoisedLatents."""

    loss_type: str = "l2"
    huber_schedule: str = "snr"
    huber_c: float = 0.1
    huber_scale: float = 1.0

    @classmethod
    def from_args(cls, args: Any, *, has_ddpm_schedule: bool = True, label: str = "this model") -> "LossSettings":
        """The settings of a run's options (absent ones: the defaults). A flow-matching family passes
        has_ddpm_schedule=False: the 'snr' schedule then is an OptionError saying what to choose instead."""
        from ..options import OptionError

        def option(name: str, default: Any) -> Any:
            value = getattr(args, name, None) if args is not None else None
            return default if value is None else value

        settings = cls(option("loss_type", cls.loss_type), option("huber_schedule", cls.huber_schedule),
                       float(option("huber_c", cls.huber_c)), float(option("huber_scale", cls.huber_scale)))
        if settings.loss_type not in LOSS_TYPES:
            raise OptionError(f"option 'loss_type': {settings.loss_type!r} is not one of {list(LOSS_TYPES)}")
        if settings.uses_threshold:
            if settings.huber_schedule not in HUBER_SCHEDULES:
                raise OptionError(f"option 'huber_schedule': {settings.huber_schedule!r} is not one of "
                                  f"{list(HUBER_SCHEDULES)}")
            if settings.huber_schedule == "snr" and not has_ddpm_schedule:
                raise OptionError(f"option 'huber_schedule': 'snr' (the default) needs a DDPM noise schedule, which "
                                  f"{label} does not have: with loss_type {settings.loss_type} set huber_schedule to "
                                  f"constant or exponential")
            if settings.huber_schedule == "exponential" and not settings.huber_c > 0:
                raise OptionError("option 'huber_c' must be greater than 0 with huber_schedule exponential")
        return settings

    @property
    def uses_threshold(self) -> bool:
        return self.loss_type in THRESHOLD_LOSS_TYPES

    def thresholds(self, timesteps: torch.Tensor, num_train_timesteps: int = 1000,
                   alphas_cumprod: torch.Tensor | None = None) -> torch.Tensor | None:
        """Each sample's Huber threshold for these timesteps; None for l1 / l2."""
        if not self.uses_threshold:
            return None
        return huber_thresholds(self.huber_schedule, timesteps, self.huber_c, self.huber_scale, num_train_timesteps,
                                alphas_cumprod)
