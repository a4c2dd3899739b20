"""What SD 1.x / 2.x and SDXL share on the torch side: loading and saving the LDM layout or a diffusers folder,
the DDPM objective, and the diffusers schedulers of sample images."""
from __future__ import annotations

from typing import Any

import torch

from ..base import Family, NoisedLatents
from ...training.loss import LossSettings
from .objective import DDPMObjective, DDPMOptions, check_options


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
    def __init__(self, bundle, args=None):
        super().__init__(bundle, args)
        # read and checked now, so a bad combination stops the run before any caching
        self.ddpm_options = DDPMOptions.from_args(args)
        self.loss_settings = LossSettings.from_args(args)
        check_options(self.ddpm_options, bundle.v_prediction)

    @property
    def objective(self) -> DDPMObjective:
        if getattr(self, "_objective", None) is None:
            device = next(self.bundle.denoiser.parameters()).device
            self._objective = DDPMObjective(self.bundle.scheduler_config, v_prediction=self.bundle.v_prediction,
                                            device=device, options=self.ddpm_options, loss=self.loss_settings)
        return self._objective

    def noised(self, latents: torch.Tensor, generator: torch.Generator | None) -> NoisedLatents:
        return self.objective.noised(latents, generator)

    # ---- sampling
    def scheduler(self, sampler: str | None) -> Any:
        from ...training.sampling import make_scheduler

        return make_scheduler(sampler or "ddim", self.bundle.scheduler_config)
