"""The training step's maths of the Stable Diffusion families: DDPM noising, epsilon / v targets, min-SNR weights.

The formulas are the pure functions of sd_scripts.training.noise; this class holds the schedule (alphas_cumprod on
the training device) and the options that shape the step (noise_offset, min/max_timestep, min_snr_gamma).
Randomness comes only from the generator the loop passes (noise first, then timesteps), so a resumed run draws
what the straight run would have drawn.
"""
from __future__ import annotations

import torch

from ...training import noise as noise_math
from ..base import NoisedLatents


def alphas_cumprod_of(scheduler_config: dict) -> list[float]:
    """The DDPM schedule's cumulative products of (1 - beta_t), from a diffusers scheduler config."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(scheduler_config).alphas_cumprod.tolist()


class DDPMObjective:
    """Noise, timesteps, target and loss weights of one batch (Ho et al. 2020; Salimans & Ho 2022 for v)."""

    def __init__(self, scheduler_config: dict, *, v_prediction: bool, device: torch.device | str,
                 noise_offset: float | None = None, min_timestep: int | None = None, max_timestep: int | None = None,
                 min_snr_gamma: float | None = None):
        self.alphas_cumprod = torch.tensor(alphas_cumprod_of(scheduler_config), device=device)
        self.v_prediction = v_prediction
        self.noise_offset = noise_offset
        self.min_timestep, self.max_timestep = min_timestep, max_timestep
        self.min_snr_gamma = min_snr_gamma

    @property
    def prediction_type(self) -> str:
        return "v_prediction" if self.v_prediction else "epsilon"

    def timestep_range(self) -> tuple[int, int]:
        """[min_timestep or 0, max_timestep or the schedule's length): where training timesteps come from."""
        low = 0 if self.min_timestep is None else int(self.min_timestep)
        return low, len(self.alphas_cumprod) if self.max_timestep is None else int(self.max_timestep)

    def noised(self, latents: torch.Tensor, generator: torch.Generator | None,
               timesteps: torch.Tensor | None = None) -> NoisedLatents:
        ac = self.alphas_cumprod
        noise = noise_math.make_noise(latents, self.noise_offset, generator=generator)
        if timesteps is None:
            timesteps = noise_math.sample_timesteps(latents.shape[0], len(ac), self.min_timestep, self.max_timestep,
                                                    generator=generator, device=latents.device)
        else:  # given (validation): fixed timesteps
            timesteps = timesteps.to(device=latents.device, dtype=torch.long)
        noisy = noise_math.add_noise(ac, latents, noise, timesteps)
        target = noise_math.training_target(self.prediction_type, latents, noise, timesteps, ac)
        weights = None
        if self.min_snr_gamma:
            snr = noise_math.compute_snr(ac, timesteps)
            weights = noise_math.min_snr_weight(snr, self.min_snr_gamma, self.v_prediction)
        return NoisedLatents(noisy, timesteps, target, weights)
