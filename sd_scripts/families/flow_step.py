"""The training step's noising shared by the flow-matching families that draw sigmas as FLUX.1 does
(`training/flow_matching.sample_flux_sigmas`: timestep_sampling sigma / uniform / sigmoid / shift / flux_shift with
discrete_flow_shift, or a weighting scheme's density) and train on target = noise - latents.

A family mixes `FlowMatchingNoise` in before `Family` and sets, from its options, `timestep_sampling`,
`sigmoid_scale`, `discrete_flow_shift`, `weighting_scheme`, `logit_mean`, `logit_std`, `mode_scale`,
`ip_noise_gamma`, `ip_noise_gamma_random_strength` and `loss_settings`; `loss_weighted()` says whether the weighting
scheme's loss weights apply (FLUX.1: only with model_prediction_type sigma_scaled).
"""
from __future__ import annotations

import torch

from ..training import flow_matching as fm
from ..training.noise import perturbed_noise
from .base import NoisedLatents


class FlowMatchingNoise:
    def loss_weighted(self) -> bool:
        return True

    def noised(self, latents: torch.Tensor, generator: torch.Generator | None,
               timesteps: torch.Tensor | None = None) -> NoisedLatents:
        """Noise, then sigmas (training/flow_matching.py with the run's options; given timesteps: t / 1000), then
        the input perturbation (ip_noise_gamma: the noisy input only); target = noise - latents; the weighting
        scheme's loss weights when `loss_weighted()`; the loss type and Huber thresholds."""
        device = latents.device
        gen_device = generator.device if generator is not None else device
        noise = torch.randn(latents.shape, generator=generator, device=gen_device, dtype=torch.float32)
        noise = noise.to(device, latents.dtype)
        if timesteps is not None:
            sigmas, timesteps = fm.sigmas_of_timesteps(timesteps, device=device)
        else:
            sigmas, timesteps = fm.sample_flux_sigmas(
                self.timestep_sampling, latents.shape[0], latent_height=latents.shape[2],
                latent_width=latents.shape[3], sigmoid_scale=self.sigmoid_scale,
                discrete_flow_shift=self.discrete_flow_shift, weighting_scheme=self.weighting_scheme,
                logit_mean=self.logit_mean, logit_std=self.logit_std, mode_scale=self.mode_scale,
                generator=generator, device=device)
        model_input_noise = perturbed_noise(noise, self.ip_noise_gamma, self.ip_noise_gamma_random_strength,
                                            generator=generator)
        noisy = fm.add_flow_noise(latents, model_input_noise, sigmas)
        weights = fm.loss_weighting(self.weighting_scheme, sigmas) if self.loss_weighted() else None
        return NoisedLatents(noisy, timesteps, fm.flux_target(latents, noise), weights, self.loss_settings.loss_type,
                             self.loss_settings.thresholds(timesteps, fm.NUM_TRAIN_TIMESTEPS))
