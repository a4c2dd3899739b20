"""Noise, timestep and loss math of diffusion training (DDPM forward process, targets, SNR loss weights), and the
noise options sd-scripts offers (offset noise with random / adaptive strength, multires noise, input perturbation).

Pure functions on tensors: no module state, no host syncs (no `.item()`, no Python branching on tensor values), so
the loop stays asynchronous on a GPU. `alphas_cumprod` is the noise scheduler's cumulative product of (1 - beta_t)
(diffusers' `DDPMScheduler.alphas_cumprod`, shape [num_train_timesteps]). Keep it on the training device: a CPU
tensor works but costs a host-to-device copy (and with it a synchronisation) in every call.

Notation: a_t = alphas_cumprod[t], x0 = clean latents, n = noise.
- Forward process (Ho et al. 2020, https://arxiv.org/abs/2006.11239): x_t = sqrt(a_t) x0 + sqrt(1 - a_t) n.
- v-prediction target (Salimans & Ho 2022, https://arxiv.org/abs/2202.00512): v = sqrt(a_t) n - sqrt(1 - a_t) x0.
- SNR(t) = a_t / (1 - a_t); min-SNR-gamma weighting (Hang et al. 2023, https://arxiv.org/abs/2303.09556), and
  sd-scripts' other SNR weights (v loss scaled like epsilon, v-like loss, debiased estimation).
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
    """Timesteps drawn uniformly from [min_timestep, max_timestep) (defaults 0 and num_train_timesteps), as int64;
    all equal to max_timestep when min_timestep == max_timestep (as sd-scripts; nothing is drawn then).

    Without a generator they are drawn directly on `device` (no host-to-device copy, which would synchronise). With
    one they are drawn on the generator's device and then moved, so a CPU generator gives the same timesteps on
    every device.
    """
    low = 0 if min_timestep is None else int(min_timestep)
    high = num_train_timesteps if max_timestep is None else int(max_timestep)
    gen_device = generator.device if generator is not None else (device if device is not None else "cpu")
    if low == high and 0 <= high < num_train_timesteps:  # sd-scripts: min == max trains that one timestep
        timesteps = torch.full((batch_size,), high, device=gen_device, dtype=torch.long)
        return timesteps.to(device) if device is not None else timesteps
    if not 0 <= low < high <= num_train_timesteps:
        raise ValueError(f"need 0 <= min_timestep < max_timestep <= {num_train_timesteps}, got {low} and {high}")
    timesteps = torch.randint(low, high, (batch_size,), generator=generator, device=gen_device, dtype=torch.long)
    return timesteps.to(device) if device is not None else timesteps


def _gen_device(generator: torch.Generator | None, like: torch.Tensor) -> torch.device:
    return generator.device if generator is not None else like.device


def random_strength(maximum: float, generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    """One strength drawn uniformly from [0, maximum), for the whole batch (sd-scripts' `--noise_offset_random_strength`
    and `--ip_noise_gamma_random_strength`), as a 0-dim float32 tensor on `like`'s device (no host sync)."""
    u = torch.rand((), generator=generator, device=_gen_device(generator, like), dtype=torch.float32)
    return (u * maximum).to(like.device)


def make_noise(latents: torch.Tensor, noise_offset: float | None = None,
               generator: torch.Generator | None = None, *, noise_offset_random_strength: bool = False,
               adaptive_noise_scale: float | None = None) -> torch.Tensor:
    """Gaussian noise shaped like `latents`, plus optional offset noise.

    Offset noise adds `offset * N(0, 1)` per sample and channel (shape [B, C, 1, 1]), so the model learns to change
    an image's mean brightness (Guttenberg 2023, https://www.crosslabs.org/blog/diffusion-with-offset-noise). The
    offset is `noise_offset`; with `noise_offset_random_strength` a strength drawn from U[0, noise_offset) for the
    batch; with `adaptive_noise_scale` s it grows by s * |mean of each latent channel| (clamped at 0 when s < 0),
    as sd-scripts' `apply_noise_offset`. Draws, in order: the noise, the strength, the per-channel offsets.
    """
    gen_device = _gen_device(generator, latents)
    noise = torch.randn(latents.shape, generator=generator, device=gen_device, dtype=latents.dtype)
    noise = noise.to(latents.device)
    if noise_offset:
        offset: float | torch.Tensor = noise_offset
        if noise_offset_random_strength:
            offset = random_strength(noise_offset, generator, latents)
        if adaptive_noise_scale is not None:
            channel_mean = latents.float().mean(dim=tuple(range(2, latents.ndim)), keepdim=True).abs()
            offset = torch.clamp(offset + adaptive_noise_scale * channel_mean, min=0.0)
        offset_shape = (latents.shape[0], latents.shape[1]) + (1,) * (latents.ndim - 2)
        draws = torch.randn(offset_shape, generator=generator, device=gen_device, dtype=latents.dtype)
        noise = (noise + offset * draws.to(latents.device)).to(latents.dtype)
    return noise


def multires_noise(noise: torch.Tensor, iterations: int, discount: float,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Multi-resolution ("pyramid") noise (Whitaker 2023, https://wandb.ai/johnowhitaker/multires_noise/reports/
    Multi-Resolution-Noise-for-Diffusion-Model-Training--VmlldzozNjYyOTU2), as sd-scripts'
    `--multires_noise_iterations` / `--multires_noise_discount`.

    For i = 0 .. iterations - 1, with r_i ~ U[2, 4): add N(0, 1) noise of size (max(1, int(H / r_i^i)),
    max(1, int(W / r_i^i))) upsampled bilinearly to H x W, times discount^i; stop after a level that is 1 pixel high
    or wide. Then divide by the standard deviation of the whole batch (as sd-scripts), so the result is about unit
    variance again. Draws from `generator`: first all `iterations` ratios r (read to the host once: the level sizes
    depend on them), then each level's noise.
    """
    b, c, h, w = noise.shape
    gen_device = _gen_device(generator, noise)
    ratios = (2.0 + 2.0 * torch.rand((iterations,), generator=generator, device=gen_device)).tolist()
    out = noise.float()
    for i, r in enumerate(ratios):
        hi, wi = max(1, int(h / r ** i)), max(1, int(w / r ** i))
        level = torch.randn((b, c, hi, wi), generator=generator, device=gen_device).to(noise.device)
        out = out + torch.nn.functional.interpolate(level, size=(h, w), mode="bilinear") * discount ** i
        if hi == 1 or wi == 1:
            break
    return (out / out.std()).to(noise.dtype)


def perturbed_noise(noise: torch.Tensor, gamma: float | None, random_strength_: bool = False,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Input perturbation (Ning et al. 2023, https://arxiv.org/abs/2301.11706; sd-scripts `--ip_noise_gamma`): the
    noise that makes the denoiser's INPUT, `noise + gamma * xi` with fresh xi ~ N(0, 1); the target keeps the
    unperturbed noise. With `random_strength_` gamma is drawn from U[0, gamma) for the batch. Draws, in order: the
    strength, then xi. gamma None or 0 returns `noise` itself."""
    if not gamma:
        return noise
    strength: float | torch.Tensor = random_strength(gamma, generator, noise) if random_strength_ else gamma
    xi = torch.randn(noise.shape, generator=generator, device=_gen_device(generator, noise), dtype=noise.dtype)
    return (noise + strength * xi.to(noise.device)).to(noise.dtype)


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


SNR_CAP = 1000.0  # sd-scripts caps the SNR here in the v-scaling and debiased weights (t = 0 would be ~1175 or inf)


def v_loss_as_epsilon_scale(snr: torch.Tensor) -> torch.Tensor:
    """SNR / (SNR + 1), SNR capped at SNR_CAP: a v loss times this equals the epsilon loss of the same prediction
    (the v loss is the epsilon loss times (SNR + 1) / SNR). sd-scripts' `--scale_v_pred_loss_like_noise_pred` weight,
    and the divisor of `--v_pred_like_loss`."""
    capped = torch.clamp(snr, max=SNR_CAP)
    return capped / (capped + 1.0)


def v_pred_like_weight(snr: torch.Tensor, amount: float) -> torch.Tensor:
    """1 + amount / v_loss_as_epsilon_scale(snr): an epsilon loss times this is the epsilon loss plus `amount` times
    the v loss of the same prediction (sd-scripts `--v_pred_like_loss`, for epsilon models)."""
    return 1.0 + amount / v_loss_as_epsilon_scale(snr)


def debiased_estimation_weight(snr: torch.Tensor, v_prediction: bool = False) -> torch.Tensor:
    """sd-scripts' `--debiased_estimation_loss` weight (Yu et al. 2024, "Debias the Training of Diffusion Models",
    https://arxiv.org/abs/2310.08442): 1 / sqrt(SNR) for epsilon, 1 / (SNR + 1) for v, SNR capped at SNR_CAP."""
    capped = torch.clamp(snr, max=SNR_CAP)
    return 1.0 / (capped + 1.0) if v_prediction else 1.0 / capped.sqrt()


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
