"""Torch-free descriptions of the supported model families (the GUI and option checks import this).

A family is a strategy: its loading, text encoding and conditioning live in the model modules; here are only the
facts other code needs without importing torch (bucket step, default resolution, VAE scaling, LoRA prefixes) and the
names that go into kohya (`ss_base_model_version`) and modelspec (`modelspec.architecture`) metadata.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FamilyInfo:
    """Static facts of one model family."""

    name: str  # 'sd1' | 'sd2' | 'sdxl'
    label: str
    bucket_step: int
    default_resolution: int  # of the epsilon model; see default_resolution_for for v-prediction
    vae_scaling_factor: float
    lora_te_prefixes: tuple[str, ...]
    lora_unet_prefix: str = "lora_unet"
    supports_v_prediction: bool = False
    v_default_resolution: int | None = None  # default resolution of the v-prediction variant

    def default_resolution_for(self, v_pred: bool) -> int:
        """The native training resolution: SD 2.x v-prediction models are 768 px models."""
        if v_pred and self.v_default_resolution:
            return self.v_default_resolution
        return self.default_resolution


FAMILIES: dict[str, FamilyInfo] = {
    "sd1": FamilyInfo("sd1", "Stable Diffusion 1.x", 64, 512, 0.18215, ("lora_te",)),
    "sd2": FamilyInfo("sd2", "Stable Diffusion 2.x", 64, 512, 0.18215, ("lora_te",),
                      supports_v_prediction=True, v_default_resolution=768),
    "sdxl": FamilyInfo("sdxl", "Stable Diffusion XL", 32, 1024, 0.13025, ("lora_te1", "lora_te2")),
}


def family_info(family: str) -> FamilyInfo:
    """The FamilyInfo of `family`; ValueError naming the known families otherwise."""
    try:
        return FAMILIES[family]
    except KeyError:
        raise ValueError(f"unknown model family {family!r}: expected one of {sorted(FAMILIES)}") from None


def base_model_version(family: str, v_pred: bool) -> str:
    """kohya `ss_base_model_version`: 'sd_v1', 'sd_v2', 'sd_v2_v' or 'sdxl_base_v1-0'."""
    family_info(family)
    if family == "sd1":
        return "sd_v1"
    if family == "sd2":
        return "sd_v2_v" if v_pred else "sd_v2"
    return "sdxl_base_v1-0"


def modelspec_architecture(family: str, v_pred: bool) -> str:
    """`modelspec.architecture` of a full model (append '/lora' or '/textual-inversion' for adapters)."""
    family_info(family)
    if family == "sd1":
        return "stable-diffusion-v1"
    if family == "sd2":
        return "stable-diffusion-v2-768-v" if v_pred else "stable-diffusion-v2-512"
    return "stable-diffusion-xl-v1-base"
