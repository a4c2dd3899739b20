"""The training step's maths of the Stable Diffusion families: DDPM noising, epsilon / v targets, loss weights.

The formulas are the pure functions of sd_scripts.training.noise (noise, timesteps, SNR weights) and
sd_scripts.training.loss (loss types, Huber thresholds); this class holds the schedule (alphas_cumprod on the
training device) and the options that shape the step, with sd-scripts' (48d368f) meanings: `library/train_util.py`
`get_noise_noisy_latents_and_timesteps` / `get_huber_threshold_if_needed`, `library/custom_train_functions.py`,
`train_network.py` (`get_noise_scheduler`, `post_process_loss`).

Randomness comes only from the generator the loop passes, drawn in this order: the noise (then the offset noise's
strength and per-channel draws), the multires ratios and levels, the timesteps, the input perturbation (strength,
then its noise). So a resumed run draws what the straight run would have drawn.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch

from ...options import OptionError
from ...training import noise as noise_math
from ...training.loss import LossSettings
from ..base import NoisedLatents

log = logging.getLogger(__name__)


def alphas_cumprod_of(scheduler_config: dict, zero_terminal_snr: bool = False) -> list[float]:
    """The DDPM schedule's cumulative products of (1 - beta_t), from a diffusers scheduler config; with
    `zero_terminal_snr` the betas rescaled so that the last timestep is pure noise (Lin et al. 2023, "Common
    Diffusion Noise Schedules and Sample Steps are Flawed", https://arxiv.org/abs/2305.08891, Algorithm 1, as
    diffusers' `rescale_betas_zero_snr` and sd-scripts' `--zero_terminal_snr` compute it)."""
    from diffusers import DDPMScheduler

    config = dict(scheduler_config)
    if zero_terminal_snr:
        config["rescale_betas_zero_snr"] = True
    return DDPMScheduler.from_config(config).alphas_cumprod.tolist()


@dataclass(frozen=True)
class DDPMOptions:
    """The run's options that shape a DDPM step (names and defaults as sd-scripts'; see sd_scripts/options.py)."""

    noise_offset: float | None = None
    noise_offset_random_strength: bool = False
    adaptive_noise_scale: float | None = None
    multires_noise_iterations: int | None = None
    multires_noise_discount: float = 0.3
    ip_noise_gamma: float | None = None
    ip_noise_gamma_random_strength: bool = False
    min_timestep: int | None = None
    max_timestep: int | None = None
    zero_terminal_snr: bool = False
    min_snr_gamma: float | None = None
    scale_v_pred_loss_like_noise_pred: bool = False
    v_pred_like_loss: float | None = None
    debiased_estimation_loss: bool = False

    @classmethod
    def from_args(cls, args: Any) -> "DDPMOptions":
        """The options present (and not None) in a run's namespace; the rest keep their defaults."""
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
                  if args is not None and getattr(args, f.name, None) is not None}
        return cls(**values)


class DDPMObjective:
    """Noise, timesteps, target and loss weights of one batch (Ho et al. 2020; Salimans & Ho 2022 for v)."""

    def __init__(self, scheduler_config: dict, *, v_prediction: bool, device: torch.device | str,
                 options: DDPMOptions | None = None, loss: LossSettings | None = None):
        self.options = o = options or DDPMOptions()
        self.loss = loss or LossSettings()
        self.v_prediction = v_prediction  # the options are checked against it by the family (check_options)
        base = torch.tensor(alphas_cumprod_of(scheduler_config), device=device)
        # the schedule noise is added with; sd-scripts computes its SNR table before --zero_terminal_snr rescales the
        # betas, so the SNR loss weights below keep the base schedule's SNR (which also keeps them finite at t = T)
        self.alphas_cumprod = torch.tensor(alphas_cumprod_of(scheduler_config, True), device=device) \
            if o.zero_terminal_snr else base
        self.snr_alphas_cumprod = base

    @property
    def prediction_type(self) -> str:
        return "v_prediction" if self.v_prediction else "epsilon"

    def noised(self, latents: torch.Tensor, generator: torch.Generator | None) -> NoisedLatents:
        o, ac = self.options, self.alphas_cumprod
        noise = noise_math.make_noise(latents, o.noise_offset, generator=generator,
                                      noise_offset_random_strength=o.noise_offset_random_strength,
                                      adaptive_noise_scale=o.adaptive_noise_scale)
        if o.multires_noise_iterations:
            noise = noise_math.multires_noise(noise, o.multires_noise_iterations, o.multires_noise_discount,
                                              generator=generator)
        timesteps = noise_math.sample_timesteps(latents.shape[0], len(ac), o.min_timestep, o.max_timestep,
                                                generator=generator, device=latents.device)
        model_input_noise = noise_math.perturbed_noise(noise, o.ip_noise_gamma, o.ip_noise_gamma_random_strength,
                                                       generator=generator)
        noisy = noise_math.add_noise(ac, latents, model_input_noise, timesteps)
        target = noise_math.training_target(self.prediction_type, latents, noise, timesteps, ac)
        return NoisedLatents(noisy, timesteps, target, self.loss_weights(timesteps), self.loss.loss_type,
                             self.loss.thresholds(timesteps, len(ac), ac))

    def loss_weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        """The product of the SNR-based per-sample weights the options ask for (sd-scripts' `post_process_loss`
        order: min-SNR, v scaled like epsilon, v-like loss, debiased estimation), or None."""
        o = self.options
        if not (o.min_snr_gamma or o.scale_v_pred_loss_like_noise_pred or o.v_pred_like_loss
                or o.debiased_estimation_loss):
            return None
        snr = noise_math.compute_snr(self.snr_alphas_cumprod, timesteps)
        weights = torch.ones_like(snr)
        if o.min_snr_gamma:
            weights = weights * noise_math.min_snr_weight(snr, o.min_snr_gamma, self.v_prediction)
        if o.scale_v_pred_loss_like_noise_pred:
            weights = weights * noise_math.v_loss_as_epsilon_scale(snr)
        if o.v_pred_like_loss:
            weights = weights * noise_math.v_pred_like_weight(snr, o.v_pred_like_loss)
        if o.debiased_estimation_loss:
            weights = weights * noise_math.debiased_estimation_weight(snr, self.v_prediction)
        return weights


def check_options(options: DDPMOptions, v_prediction: bool) -> None:
    """The options that depend on what the model predicts (sd-scripts' `verify_training_args` checks them against
    --v_parameterization; here the model tells)."""
    kind = "v-prediction" if v_prediction else "epsilon-prediction"
    if options.scale_v_pred_loss_like_noise_pred and not v_prediction:
        raise OptionError(f"option 'scale_v_pred_loss_like_noise_pred' scales a v-prediction loss, but this is an "
                          f"{kind} model: remove it (or train a v-prediction model)")
    if options.v_pred_like_loss and v_prediction:
        raise OptionError(f"option 'v_pred_like_loss' adds a v-like loss to an epsilon-prediction loss, but this is a "
                          f"{kind} model: remove it")
    if options.zero_terminal_snr and not v_prediction:
        log.warning("option 'zero_terminal_snr' with an epsilon-prediction model: the last timestep is pure noise, "
                    "from which epsilon cannot be predicted; zero terminal SNR is meant for v-prediction models")
