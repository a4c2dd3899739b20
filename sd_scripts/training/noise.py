"""Noise, timestep and loss math of diffusion training (DDPM forward process, targets, min-SNR weighting).

Pure functions on tensors: no module state, no host syncs (no `.item()`, no Python branching on tensor values), so
the loop stays asynchronous on a GPU. `alphas_cumprod` is the noise scheduler's cumulative product of (1 - beta_t)
(diffusers' `DDPMScheduler.alphas_cumprod`, shape [num_train_timesteps]). Keep it on the training device: a CPU
tensor works but costs a host-to-device copy (and with it a synchronisation) in every call.

Notation: a_t = alphas_cumprod[t], x0 = clean latents, n = noise.
- Forward process (Ho et al. 2020, https://arxiv.org/abs/2006.11239): x_t = sqrt(a_t) x0 + sqrt(1 - a_t) n.
- v-prediction target (Salimans & Ho 2022, https://arxiv.org/abs/2202.00512): v = sqrt(a_t) n - sqrt(1 - a_t) x0.
- SNR(t) = a_t / (1 - a_t); min-SNR-gamma weighting (Hang et al. 2023, https://arxiv.org/abs/2303.09556).
"""
from __future__ import annotations

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction")


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a [B] tensor to [B, 1, 1, ...] so it broadcasts against `like` ([B, C, H, W] or more dims)."""
    return values.reshape(values.shape[0], *([1] * (like.ndim - 1)))


def _gather(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """alphas_cumprod[timesteps] in float32 on the timesteps' device."""
    return alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps.long()]


def sample_timesteps(batch_size: int, num_train_timesteps: int = 1000, min_timestep: int | None = None,
                     max_timestep: int | None = None, generator: torch.Generator | None = None,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """Timesteps drawn uniformly from [min_timestep, max_timestep) (defaults 0 and num_train_timesteps), as int64.

    Without a generator they are drawn directly on `device` (no host-to-device copy, which would synchronise). With
    one they are drawn on the generator's device and then moved, so a CPU generator gives the same timesteps on
    every device.
    """
    low = 0 if min_timestep is None else int(min_timestep)
    high = num_train_timesteps if max_timestep is None else int(max_timestep)
    if not 0 <= low < high <= num_train_timesteps:
        raise ValueError(f"need 0 <= min_timestep < max_timestep <= {num_train_timesteps}, got {low} and {high}")
    gen_device = generator.device if generator is not None else (device if device is not None else "cpu")
    timesteps = torch.randint(low, high, (batch_size,), generator=generator, device=gen_device, dtype=torch.long)
    return timesteps.to(device) if device is not None else timesteps


def make_noise(latents: torch.Tensor, noise_offset: float | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Gaussian noise shaped like `latents`, plus optional offset noise.

    Offset noise adds `noise_offset * N(0, 1)` per sample and channel (shape [B, C, 1, 1]), so the model learns to
    change an image's mean brightness (Guttenberg 2023, https://www.crosslabs.org/blog/diffusion-with-offset-noise).
    """
    gen_device = generator.device if generator is not None else latents.device
    noise = torch.randn(latents.shape, generator=generator, device=gen_device, dtype=latents.dtype)
    if noise_offset:
        offset_shape = (latents.shape[0], latents.shape[1]) + (1,) * (latents.ndim - 2)
        offset = torch.randn(offset_shape, generator=generator, device=gen_device, dtype=latents.dtype)
        noise = noise + noise_offset * offset
    return noise.to(latents.device)


def add_noise(alphas_cumprod: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor,
              timesteps: torch.Tensor) -> torch.Tensor:
    """Forward diffusion q(x_t | x_0): sqrt(a_t) * latents + sqrt(1 - a_t) * noise, in the latents' dtype."""
    a = _per_sample(_gather(alphas_cumprod, timesteps), latents)
    noisy = a.sqrt() * latents.float() + (1.0 - a).sqrt() * noise.float()
    return noisy.to(latents.dtype)


def training_target(prediction_type: str, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                    alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """What the model should predict: the noise ('epsilon') or v = sqrt(a_t) n - sqrt(1 - a_t) x0 ('v_prediction')."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        a = _per_sample(_gather(alphas_cumprod, timesteps), latents)
        velocity = a.sqrt() * noise.float() - (1.0 - a).sqrt() * latents.float()
        return velocity.to(latents.dtype)
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def compute_snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio a_t / (1 - a_t) of each timestep, float32 [B] (inf where a_t == 1)."""
    a = _gather(alphas_cumprod, timesteps)
    return a / (1.0 - a)


def min_snr_weight(snr: torch.Tensor, gamma: float, v_prediction: bool = False) -> torch.Tensor:
    """Min-SNR-gamma loss weight per sample (https://arxiv.org/abs/2303.09556).

    For an epsilon loss the weight is min(SNR, gamma) / SNR; for a v loss it is min(SNR, gamma) / (SNR + 1), since
    the v loss already equals the epsilon loss times (SNR + 1). (A zero SNR, e.g. with zero-terminal-SNR schedules,
    gives NaN for epsilon: such schedules are trained with v-prediction.)
    """
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1.0) if v_prediction else clipped / snr


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each sample over all non-batch dimensions, computed in float32: [B]."""
    diff = pred.float() - target.float()
    return diff.pow(2).reshape(diff.shape[0], -1).mean(dim=1)


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor,
                   *, min_snr_gamma: float | None = None, v_prediction: bool = False,
                   loss_weights: torch.Tensor | None = None) -> torch.Tensor:
    """The training loss: per-sample MSE, times per-sample `loss_weights` (e.g. prior_loss_weight for regularisation
    images), times the min-SNR weight when `min_snr_gamma` is set, averaged over the batch (a float32 scalar)."""
    loss = per_sample_mse(pred, target)
    if loss_weights is not None:
        loss = loss * loss_weights.to(device=loss.device, dtype=loss.dtype)
    if min_snr_gamma:
        snr = compute_snr(alphas_cumprod, timesteps.to(loss.device))
        loss = loss * min_snr_weight(snr, min_snr_gamma, v_prediction)
    return loss.mean()
