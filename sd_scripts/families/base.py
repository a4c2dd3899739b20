"""The torch side of a model family: what the shared loop, the training methods, sampling and saving ask of it.

The loop holds no model maths: it asks the family to scale latents, encode captions, noise a batch (which also gives
the target and the objective's loss weights) and call the denoiser. A new family subclasses `Family`, fills in the
abstract parts, and registers its `FamilySpec` (families/spec.py) in its package; nothing else changes.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Callable

import torch

from . import family_spec
from .spec import FamilySpec


@dataclass
class NoisedLatents:
    """One batch prepared for the denoiser by the family's objective (DDPM, flow matching, ...)."""

    noisy: torch.Tensor  # the denoiser's input
    timesteps: torch.Tensor  # what the denoiser is conditioned on (DDPM: integer steps; flow matching: sigma x 1000)
    target: torch.Tensor  # what the prediction is compared with
    weights: torch.Tensor | None = None  # per-sample loss weights of the objective (e.g. min-SNR), [B]
    loss_type: str = "l2"  # how prediction and target are compared (training/loss.py: l2, l1, huber, smooth_l1)
    huber_c: torch.Tensor | None = None  # per-sample threshold of the huber / smooth_l1 loss types, [B]


@dataclass
class SamplePipeline:
    """A diffusers pipeline around the family's in-memory modules, and how to ask it for one image."""

    pipeline: Any
    inputs: Callable[[Any, Any], dict]  # (SamplePrompt, device) -> the prompt arguments of pipeline(...)


class Family:
    """Base class of every family's torch side. `bundle` is a sd_scripts.models.bundle.ModelBundle on its device."""

    def __init__(self, bundle, args: argparse.Namespace | None = None):
        self.bundle = bundle
        self.args = args

    @property
    def spec(self) -> FamilySpec:
        return family_spec(self.bundle.family)

    @property
    def family(self) -> str:
        return self.bundle.family

    # ---- loading and saving
    @classmethod
    def load(cls, path: str, *, dtype: torch.dtype = torch.float32, **options):
        """The model at `path` (single file or diffusers folder) as a ModelBundle, offline. `options` are the
        trainer's loading options (vae, v2, v_parameterization, and the separate part files a family takes)."""
        raise NotImplementedError

    def save_checkpoint(self, path: str, *, dtype: torch.dtype | None, metadata: dict[str, str] | None,
                        diffusers: bool) -> None:
        """Save the whole (fine-tuned) model: a single file in the layout the ecosystem uses, or a diffusers folder."""
        raise NotImplementedError(f"full-model saving is not implemented for {self.spec.label}")

    # ---- latents
    @property
    def latent_cache_suffix(self) -> str:
        """Latent .npz name suffix (FORMATS: '_sd', '_sdxl', ...)."""
        return self.spec.latent_cache_suffix

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B,3,H,W] in [-1,1] -> UNSCALED latents (float32), as latent caches store them."""
        vae = self.bundle.vae
        return vae.encode(images.to(vae.device, vae.dtype)).latent_dist.sample().float()

    def scale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Unscaled latents -> what the denoiser is trained on: (z - shift) * scale, float32."""
        spec = self.spec
        latents = latents.float()
        if spec.vae_shift_factor:
            latents = latents - spec.vae_shift_factor
        return latents * spec.vae_scaling_factor

    # ---- text
    def encode_captions(self, captions: list[str], *, train_text_encoder: bool) -> Any:
        """Captions -> the conditioning the denoiser takes (with `.to(...)`)."""
        raise NotImplementedError

    def release_text_encoders(self, captions: list[str], max_captions: int = 1024) -> bool:
        """Encode every caption the run can draw, then drop the frozen text encoders; False when not possible."""
        return False

    # ---- the training step
    def noised(self, latents: torch.Tensor, generator: torch.Generator | None,
               timesteps: torch.Tensor | None = None) -> NoisedLatents:
        """Draw noise and timesteps for scaled latents [B, C, H, W]: the denoiser's input, its target and weights.

        Given `timesteps` ([B] integers in `timestep_range()`, the validation loss's fixed ones), the step uses them
        instead of drawing its own (flow matching: sigma = t / 1000); the noise still comes from `generator`."""
        raise NotImplementedError

    def timestep_range(self) -> tuple[int, int]:
        """[low, high) of the timesteps training draws from (min_timestep / max_timestep where the family honours
        them): the validation loss is taken at fixed timesteps spread over it."""
        return 0, 1000

    def predict(self, noised: NoisedLatents, conditioning: Any, batch: dict) -> torch.Tensor:
        """The denoiser's prediction for a noised batch, comparable with `noised.target`."""
        raise NotImplementedError

    def use_resolutions(self, resolutions) -> None:
        """The datasets' training resolutions [(width, height), ...], once known (before caching and training).
        The default ignores them."""

    # ---- adapters
    #: network_args keys the family's LoRA takes besides the shared ones (key -> parser); when non-empty,
    #: lora_naming is called with `network_args=` (those keys, parsed)
    LORA_NETWORK_ARGS: dict[str, Callable[[str], Any]] = {}

    @classmethod
    def lora_naming(cls, family: str, denoiser: torch.nn.Module | None = None) -> dict[str, Any]:
        """How kohya-format LoRA files name this family's layers: unet_prefix, te_prefixes, unet_name_map.

        Optional keys (the shared defaults apply when absent): unet_block_classes / te_block_classes (class names
        of the blocks whose Linear/Conv layers are adapted), te_enabled (per text encoder, whether it gets LoRA
        modules), shared_down (fused file modules share one down projection). unet_name_map(path) may return
        (file path, part index, part count) for layers the file fuses into one module (see networks/lora.py).
        Per-layer ranks: module_rank(file name) -> rank (0 leaves the layer out) or None (the default rank),
        unet_extra_name_map(path) names the layers outside the blocks that are adapted too (None for the others),
        verbose (log every module). A file's modules outside the blocks load through unet_file_name_map(path)
        (every layer the family's files may name)."""
        spec = family_spec(family)
        return {"unet_prefix": spec.lora_unet_prefix, "te_prefixes": spec.lora_te_prefixes, "unet_name_map": None}

    @classmethod
    def lora_blocks(cls, family: str):
        """sd-scripts' numbering of the U-Net blocks for networks.lora's block-wise network_args (block_dims,
        *_lr_weight): a networks.block_weights.UNetBlocks, or None when the family has none (the keys are refused)."""
        return None

    @classmethod
    def denoiser_blocks(cls, denoiser: torch.nn.Module) -> tuple[int, Callable[[str], int]] | None:
        """Full fine-tuning's per-block learning rates (sdxl_train's block_lr): the number of blocks and the block
        of each denoiser parameter name; None when the family has no such numbering."""
        return None

    @classmethod
    def denoiser_param_groups(cls, denoiser: torch.nn.Module, args) -> list[tuple[str, list, float]] | None:
        """Full fine-tuning's per-part learning rates of the family's own options (e.g. anima_train's
        self_attn_lr): (group name, trainable parameters, rate) covering every trainable denoiser parameter, a rate
        of 0 freezing the group; None (the default, or when none of those options is set): one group at
        learning_rate."""
        return None

    @classmethod
    def trainable_text_encoders(cls, args) -> tuple[bool, ...] | None:
        """Which text encoders a full fine-tune with train_text_encoder may train (each still needs a non-zero
        learning rate); None: all of them."""
        return None

    # ---- memory features
    @classmethod
    def block_swap_groups(cls, denoiser: torch.nn.Module, blocks_to_swap: int) -> list | None:
        """`--blocks_to_swap N`: the denoiser's lists of transformer blocks that may live on the CPU, each with how
        many of N it takes, as `sd_scripts.training.block_swap.SwapGroup`s in forward order. None (the default): the
        family has no swappable blocks. Moving, hooks and limits are generic (training/block_swap.py, memory.py)."""
        return None

    # ---- metadata
    def adjust_metadata(self, metadata: dict[str, str]) -> dict[str, str]:
        """The saved file's metadata with the family's own names where the spec's cannot say it (e.g. which variant
        of the family was trained). The default changes nothing."""
        return metadata

    # ---- sampling
    def sample_pipeline(self, sampler: str | None, *, clip_skip: int | None = None) -> SamplePipeline:
        """A pipeline for sample / class images with the named sampler (None: the family's default)."""
        raise NotImplementedError

    def scheduler(self, sampler: str | None) -> Any:
        """The diffusers scheduler of a sampler name from a prompt file (None: the family's default)."""
        raise NotImplementedError

    def sample_modules(self) -> list[torch.nn.Module]:
        """The modules sampling uses (put in eval mode on the device around it)."""
        b = self.bundle
        return [m for m in (b.denoiser, b.vae, *b.text_encoders) if m is not None]
