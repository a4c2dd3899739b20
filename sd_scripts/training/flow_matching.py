"""Flow-matching training maths shared by the DiT families (FLUX.1, SD3 / SD3.5): sigma sampling, noisy input,
targets, prediction post-processing and loss weighting.

Pure functions on tensors, in the style of `noise.py`: no module state, no host syncs (no `.item()`, no Python
branching on tensor values), randomness only from an optional `torch.Generator` (drawn on the generator's device,
then moved, so a CPU generator gives the same numbers on every device).

Notation: x0 = clean latents, n = noise, sigma in [0, 1] the noise level, t = 1000 * sigma the timestep the model
is given (FLUX divides it by 1000 again inside its call).
- Rectified flow (Liu et al. 2022, https://arxiv.org/abs/2209.03003; Esser et al. 2024 "Scaling Rectified Flow
  Transformers", SD3, https://arxiv.org/abs/2403.03206): x_sigma = (1 - sigma) x0 + sigma n. The velocity
  dx/dsigma = n - x0 is FLUX's training target.
- SD3 preconditions the output as an x0 estimate, `pred * (-sigma) + x_sigma` (EDM section 5, Karras et al. 2022,
  https://arxiv.org/abs/2206.00364), and compares it with x0.
- Timestep densities (logit-normal, mode) and loss weights (sigma_sqrt, cosmap) are SD3 paper section 3.1; the
  density and weighting functions themselves are diffusers' (`diffusers.training_utils`).

Semantics and defaults follow kohya-ss/sd-scripts at 48d368f: `library/flux_train_utils.py`
(`get_noisy_model_input_and_timesteps`, `apply_model_prediction_type`, `time_shift`, `get_lin_function`),
`library/sd3_train_utils.py` (`get_noisy_model_input_and_timesteps`, `FlowMatchEulerDiscreteScheduler`),
`flux_train_network.py` / `sd3_train_network.py` (`get_noise_pred_and_target`) and `train_network.py` (the loss).
Option defaults there: --timestep_sampling sigma, --sigmoid_scale 1.0, --model_prediction_type sigma_scaled,
--discrete_flow_shift 3.0 (FLUX); --weighting_scheme uniform, --logit_mean 0.0, --logit_std 1.0, --mode_scale 1.29
(both); --training_shift 1.0, --min_timestep / --max_timestep None = 0 / 1000 (SD3 only; FLUX ignores them).
"""
from __future__ import annotations

import math

import torch

NUM_TRAIN_TIMESTEPS = 1000
TIMESTEP_SAMPLINGS = ("sigma", "uniform", "sigmoid", "shift", "flux_shift")
WEIGHTING_SCHEMES = ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none", "uniform")
MODEL_PREDICTION_TYPES = ("raw", "additive", "sigma_scaled")

# sd-scripts' defaults (48d368f)
DEFAULT_TIMESTEP_SAMPLING = "sigma"
DEFAULT_SIGMOID_SCALE = 1.0
DEFAULT_MODEL_PREDICTION_TYPE = "sigma_scaled"
DEFAULT_DISCRETE_FLOW_SHIFT = 3.0
DEFAULT_WEIGHTING_SCHEME = "uniform"
DEFAULT_LOGIT_MEAN = 0.0
DEFAULT_LOGIT_STD = 1.0
DEFAULT_MODE_SCALE = 1.29
DEFAULT_TRAINING_SHIFT = 1.0

# FLUX.1's resolution-dependent shift: mu linear in the packed sequence length, 0.5 at 256 tokens (256 px) and
# 1.15 at 4096 tokens (1024 px) (BFL's flux `sampling.py`, sd-scripts `get_lin_function` defaults)
FLUX_BASE_SEQ_LEN, FLUX_MAX_SEQ_LEN = 256, 4096
FLUX_BASE_SHIFT, FLUX_MAX_SHIFT = 0.5, 1.15


def _check(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a [B] tensor to [B, 1, 1, ...] so it broadcasts against `like`."""
    return values.reshape(values.shape[0], *([1] * (like.ndim - 1)))


def _gen_device(generator: torch.Generator | None, device: torch.device | str | None) -> torch.device | str:
    if generator is not None:
        return generator.device
    return device if device is not None else "cpu"


def _moved(t: torch.Tensor, device: torch.device | str | None) -> torch.Tensor:
    return t.to(device) if device is not None else t


# ---------------------------------------------------------------- shifts


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """The discrete-flow shift s' = shift * s / (1 + (shift - 1) * s) (SD3 paper section 5.3.2, "resolution-dependent
    shifting", https://arxiv.org/abs/2403.03206). shift > 1 moves mass towards noise, shift = 1 is the identity.
    sd-scripts applies it with --discrete_flow_shift (FLUX 'shift' sampling and the 'sigma' schedule) and with
    --training_shift (SD3, on the density sample u)."""
    return (sigmas * shift) / (1 + (shift - 1) * sigmas)


def flux_time_shift(mu: float, t: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """FLUX.1's time shift e^mu / (e^mu + (1/t - 1)^sigma) (BFL flux `sampling.py` `time_shift`, sd-scripts
    `flux_train_utils.time_shift`). With sigma = 1 it is `shift_sigmas(t, e^mu)`, written the other way."""
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


def flux_packed_sequence_length(latent_height: int, latent_width: int) -> int:
    """Tokens FLUX.1 sees for a latent of this size: the latents are packed 2x2, so (h // 2) * (w // 2)."""
    return (latent_height // 2) * (latent_width // 2)


def flux_mu(image_seq_len: int, base_shift: float = FLUX_BASE_SHIFT, max_shift: float = FLUX_MAX_SHIFT,
            base_seq_len: int = FLUX_BASE_SEQ_LEN, max_seq_len: int = FLUX_MAX_SEQ_LEN) -> float:
    """mu of FLUX.1's resolution-dependent shift: the line through (base_seq_len, base_shift) and
    (max_seq_len, max_shift) at `image_seq_len` (sd-scripts `get_lin_function(y1=0.5, y2=1.15)`; 1024 px = 4096
    tokens -> 1.15, 512 px -> 0.7167). A Python float: it depends on shapes only."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return slope * image_seq_len + (base_shift - slope * base_seq_len)


def scheduler_sigmas(shift: float = 1.0, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """The training sigmas of a FlowMatchEulerDiscreteScheduler(num_train_timesteps, shift), float32, from 1 down to
    1/num_train_timesteps before shifting: sigmas[i] = shift_sigmas((N - i) / N, shift). Its timesteps are
    sigmas * N. (sd-scripts' own copy of the scheduler and diffusers' agree.)"""
    steps = torch.arange(num_train_timesteps, 0, -1, dtype=torch.float32)
    return shift_sigmas(steps / num_train_timesteps, shift)


# ---------------------------------------------------------------- sampling


def sample_density(weighting_scheme: str, batch_size: int, *, logit_mean: float = DEFAULT_LOGIT_MEAN,
                   logit_std: float = DEFAULT_LOGIT_STD, mode_scale: float = DEFAULT_MODE_SCALE,
                   generator: torch.Generator | None = None,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """u in [0, 1) per sample, distributed as `--weighting_scheme` asks (SD3 paper section 3.1,
    https://arxiv.org/abs/2403.03206; diffusers' `compute_density_for_timestep_sampling`):
    'logit_normal': sigmoid(N(logit_mean, logit_std)); 'mode': u' = 1 - u - mode_scale * (cos(pi u / 2)^2 - 1 + u)
    for uniform u; every other scheme (uniform, none, sigma_sqrt, cosmap): uniform. float32 [batch_size]."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    _check("weighting_scheme", weighting_scheme, WEIGHTING_SCHEMES)
    u = compute_density_for_timestep_sampling(weighting_scheme, batch_size, logit_mean=logit_mean,
                                              logit_std=logit_std, mode_scale=mode_scale,
                                              device=_gen_device(generator, device), generator=generator)
    return _moved(u, device)


def sample_flux_sigmas(timestep_sampling: str, batch_size: int, *, latent_height: int, latent_width: int,
                       sigmoid_scale: float = DEFAULT_SIGMOID_SCALE,
                       discrete_flow_shift: float = DEFAULT_DISCRETE_FLOW_SHIFT,
                       weighting_scheme: str = DEFAULT_WEIGHTING_SCHEME, logit_mean: float = DEFAULT_LOGIT_MEAN,
                       logit_std: float = DEFAULT_LOGIT_STD, mode_scale: float = DEFAULT_MODE_SCALE,
                       num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, generator: torch.Generator | None = None,
                       device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas, timesteps), float32 [batch_size] each, for FLUX's `--timestep_sampling` (sd-scripts
    `flux_train_utils.get_noisy_model_input_and_timesteps`; timesteps = sigmas * 1000 in every mode):

    - 'uniform': sigma ~ U[0, 1).
    - 'sigmoid': sigma = sigmoid(sigmoid_scale * N(0, 1)) (XLabs x-flux, https://github.com/XLabs-AI/x-flux).
    - 'shift': that sigmoid sample, then `shift_sigmas(., discrete_flow_shift)`.
    - 'flux_shift': that sigmoid sample, then `flux_time_shift(mu, .)` with mu = `flux_mu` of the packed sequence
      length (h // 2) * (w // 2) of the latent (latent_height x latent_width, before packing).
    - 'sigma' (the default): u from `sample_density(weighting_scheme, ...)`, index = floor(u * 1000), and sigma, t
      the scheduler's at that index: FlowMatchEulerDiscreteScheduler(1000, shift=discrete_flow_shift), so sigma =
      shift_sigmas((1000 - index) / 1000, discrete_flow_shift) (see `scheduler_sigmas`).

    `discrete_flow_shift` (default 3.0) thus acts in 'sigma' and 'shift'; `sigmoid_scale` in the three sigmoid
    modes; `latent_height/width` only in 'flux_shift'. sd-scripts' --min_timestep/--max_timestep do not apply here.
    (sd-scripts casts the 'sigma' mode's sigmas to the weight dtype; cast the result if that is wanted.)
    """
    _check("timestep_sampling", timestep_sampling, TIMESTEP_SAMPLINGS)
    gen_device = _gen_device(generator, device)
    if timestep_sampling == "sigma":
        u = sample_density(weighting_scheme, batch_size, logit_mean=logit_mean, logit_std=logit_std,
                           mode_scale=mode_scale, generator=generator)
        index = (u * num_train_timesteps).long()
        sigmas = shift_sigmas((num_train_timesteps - index).float() / num_train_timesteps, discrete_flow_shift)
    elif timestep_sampling == "uniform":
        sigmas = torch.rand((batch_size,), generator=generator, device=gen_device)
    else:
        normal = torch.randn((batch_size,), generator=generator, device=gen_device)
        sigmas = torch.sigmoid(normal * sigmoid_scale)
        if timestep_sampling == "shift":
            sigmas = shift_sigmas(sigmas, discrete_flow_shift)
        elif timestep_sampling == "flux_shift":
            mu = flux_mu(flux_packed_sequence_length(latent_height, latent_width))
            sigmas = flux_time_shift(mu, sigmas)
    sigmas = _moved(sigmas, device)
    return sigmas, sigmas * num_train_timesteps


def sample_sd3_sigmas(batch_size: int, *, weighting_scheme: str = DEFAULT_WEIGHTING_SCHEME,
                      logit_mean: float = DEFAULT_LOGIT_MEAN, logit_std: float = DEFAULT_LOGIT_STD,
                      mode_scale: float = DEFAULT_MODE_SCALE, training_shift: float = DEFAULT_TRAINING_SHIFT,
                      min_timestep: int | None = None, max_timestep: int | None = None,
                      timestep_dtype: torch.dtype = torch.float32, generator: torch.Generator | None = None,
                      device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas, timesteps) [batch_size] for SD3 / SD3.5 (sd-scripts `sd3_train_utils.get_noisy_model_input_and_
    timesteps`): u from `sample_density(weighting_scheme, ...)`, shifted by `training_shift` (> 1 towards noise,
    i.e. overall structure; < 1 towards detail), then the integer timestep t = floor(u * (t_max - t_min) + t_min)
    with t_min = min_timestep or 0 and t_max = max_timestep or 1000, and sigma = t / 1000 (so sigma can be 0, where
    'sigma_sqrt' weighting is infinite, as in sd-scripts).

    Both come back in `timestep_dtype`, sigmas computed in it: sd-scripts uses the weight dtype there (so in bf16
    t = 999 becomes 1000); the float32 default keeps t exact.
    """
    t_min = 0 if min_timestep is None else int(min_timestep)
    t_max = NUM_TRAIN_TIMESTEPS if max_timestep is None else int(max_timestep)
    if not 0 <= t_min <= t_max <= NUM_TRAIN_TIMESTEPS:
        raise ValueError(f"need 0 <= min_timestep <= max_timestep <= {NUM_TRAIN_TIMESTEPS}, got {t_min} and {t_max}")
    u = sample_density(weighting_scheme, batch_size, logit_mean=logit_mean, logit_std=logit_std,
                       mode_scale=mode_scale, generator=generator)
    u = shift_sigmas(u, training_shift)
    timesteps = (u * (t_max - t_min) + t_min).long().to(timestep_dtype)
    timesteps = _moved(timesteps, device)
    return timesteps / NUM_TRAIN_TIMESTEPS, timesteps


def sigmas_of_timesteps(timesteps: torch.Tensor, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
                        device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas, timesteps), float32 [B], for given timesteps t (the validation loss's fixed ones): sigma = t / 1000,
    unshifted, so a validation timestep means the same noise level whatever the sampling options."""
    timesteps = _moved(timesteps.to(torch.float32), device)
    return timesteps / num_train_timesteps, timesteps


# ---------------------------------------------------------------- noisy input and targets


def add_flow_noise(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The rectified-flow interpolation (1 - sigma) * latents + sigma * noise (sigmas [B]), computed in float32 and
    returned in the latents' dtype (sd-scripts casts to the weight dtype the same way). For input-perturbation
    noise (`--ip_noise_gamma`) pass noise + gamma * xi as `noise`."""
    s = _per_sample(sigmas.to(device=latents.device, dtype=torch.float32), latents)
    noisy = (1.0 - s) * latents.float() + s * noise.float()
    return noisy.to(latents.dtype)


def flux_target(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """FLUX.1's flow-matching target, the velocity noise - latents (sd-scripts `flux_train_network.py`). It is the
    target whatever `--model_prediction_type` is."""
    return noise - latents


def sd3_target(latents: torch.Tensor) -> torch.Tensor:
    """SD3's target: the clean latents themselves, compared with the preconditioned prediction
    (`precondition_prediction`; sd-scripts `sd3_train_network.py` and `sd3_train.py`)."""
    return latents


def precondition_prediction(pred: torch.Tensor, noisy: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """pred * (-sigma) + noisy: the velocity prediction turned into an x0 estimate (EDM section 5,
    https://arxiv.org/abs/2206.00364). SD3 always applies it; FLUX with --model_prediction_type sigma_scaled."""
    return pred * (-_per_sample(sigmas.to(pred.device), pred)) + noisy


def loss_weighting(weighting_scheme: str, sigmas: torch.Tensor) -> torch.Tensor:
    """Per-sample loss weights of `--weighting_scheme` (SD3 paper section 3.1; diffusers'
    `compute_loss_weighting_for_sd3`): 'sigma_sqrt' sigma^-2, 'cosmap' 2 / (pi * (1 - 2 sigma + 2 sigma^2)), every
    other scheme 1 (logit_normal and mode shape the sampling instead). Same shape as `sigmas`."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    _check("weighting_scheme", weighting_scheme, WEIGHTING_SCHEMES)
    return compute_loss_weighting_for_sd3(weighting_scheme, sigmas)


def apply_model_prediction_type(model_prediction_type: str, pred: torch.Tensor, noisy: torch.Tensor,
                                sigmas: torch.Tensor, weighting_scheme: str = DEFAULT_WEIGHTING_SCHEME,
                                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(prediction to compare with the target, per-sample loss weights or None), FLUX's `--model_prediction_type`
    (sd-scripts `flux_train_utils.apply_model_prediction_type`):
    'raw': the prediction as is, no weights; 'additive': pred + noisy, no weights; 'sigma_scaled' (the default):
    `precondition_prediction` and `loss_weighting(weighting_scheme, sigmas)`. The target stays `flux_target`
    (noise - latents) in every case, as in sd-scripts."""
    _check("model_prediction_type", model_prediction_type, MODEL_PREDICTION_TYPES)
    if model_prediction_type == "raw":
        return pred, None
    if model_prediction_type == "additive":
        return pred + noisy, None
    return precondition_prediction(pred, noisy, sigmas), loss_weighting(weighting_scheme, sigmas)


def sd3_prediction(pred: torch.Tensor, noisy: torch.Tensor, sigmas: torch.Tensor,
                   weighting_scheme: str = DEFAULT_WEIGHTING_SCHEME) -> tuple[torch.Tensor, torch.Tensor]:
    """SD3's (preconditioned prediction, per-sample loss weights): `precondition_prediction` and
    `loss_weighting(weighting_scheme, sigmas)`, to be compared with `sd3_target` (the latents)."""
    return precondition_prediction(pred, noisy, sigmas), loss_weighting(weighting_scheme, sigmas)


def flow_matching_loss(pred: torch.Tensor, target: torch.Tensor, weighting: torch.Tensor | None = None,
                       loss_weights: torch.Tensor | None = None) -> torch.Tensor:
    """The training loss as sd-scripts' `train_network.py` forms it: squared error in float32, times the scheme's
    `weighting` (per sample, [B]), averaged over each sample, times per-sample `loss_weights` (e.g. prior_loss_weight
    for regularisation images), averaged over the batch (a float32 scalar).

    (sd-scripts' full fine-tuner `sd3_train.py` multiplies the already-averaged [B] loss by the [B, 1, 1, 1]
    weighting, which broadcasts to mean(weighting) * mean(loss); the per-sample form here is the LoRA trainer's.)
    """
    diff = pred.float() - target.float()
    loss = diff.pow(2).reshape(diff.shape[0], -1).mean(dim=1)
    if weighting is not None:
        loss = loss * weighting.reshape(-1).to(device=loss.device, dtype=loss.dtype)
    if loss_weights is not None:
        loss = loss * loss_weights.to(device=loss.device, dtype=loss.dtype)
    return loss.mean()
