"""What SD 1.x / 2.x and SDXL share on the torch side: loading and saving the LDM layout or a diffusers folder,
the DDPM objective, and the diffusers schedulers of sample images."""
from __future__ import annotations

from typing import Any

import torch

from ..base import Family, NoisedLatents
from .objective import DDPMObjective


class UNetFamily(Family):
    """A diffusers U-Net trained with DDPM (epsilon or v), conditioned on CLIP text encoders."""

    # ---- loading and saving
    @classmethod
    def load(cls, path: str, *, dtype: torch.dtype = torch.float32, vae: str | None = None, v2: bool | None = None,
             v_parameterization: bool | None = None, checkpoint=None, **_options):
        from .loading import load_model

        return load_model(path, vae=vae, v2=v2, v_parameterization=v_parameterization, dtype=dtype,
                          checkpoint=checkpoint)

    def save_checkpoint(self, path: str, *, dtype: torch.dtype | None, metadata: dict[str, str] | None,
                        diffusers: bool) -> None:
        from .saving import save_diffusers, save_single_file

        if diffusers:
            save_diffusers(self.bundle, path, dtype=dtype)
        else:
            save_single_file(self.bundle, path, dtype=dtype, metadata=metadata)

    # ---- the training step
    @property
    def objective(self) -> DDPMObjective:
        if getattr(self, "_objective", None) is None:
            a = self.args
            option = (lambda name: getattr(a, name, None)) if a is not None else (lambda name: None)
            device = next(self.bundle.denoiser.parameters()).device
            self._objective = DDPMObjective(self.bundle.scheduler_config, v_prediction=self.bundle.v_prediction,
                                            device=device, noise_offset=option("noise_offset"),
                                            min_timestep=option("min_timestep"), max_timestep=option("max_timestep"),
                                            min_snr_gamma=option("min_snr_gamma"))
        return self._objective

    def noised(self, latents: torch.Tensor, generator: torch.Generator | None,
               timesteps: torch.Tensor | None = None) -> NoisedLatents:
        return self.objective.noised(latents, generator, timesteps)

    def timestep_range(self) -> tuple[int, int]:
        return self.objective.timestep_range()

    # ---- sampling
    def scheduler(self, sampler: str | None) -> Any:
        from ...training.sampling import make_scheduler

        return make_scheduler(sampler or "ddim", self.bundle.scheduler_config)
