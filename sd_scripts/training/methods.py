"""Training methods: what a run trains and what it saves. The loop is shared; a method is one small class.

`NetworkMethod` trains a kohya-format LoRA on a frozen base model (train_network). DreamBooth, fine-tuning and
textual inversion add their own classes here with the same four methods.
"""
from __future__ import annotations

import argparse
import logging
from contextlib import nullcontext
from typing import Any, ContextManager

import torch

from ..options import parse_kv_args


def compute_dtype(mixed_precision: str | None) -> torch.dtype:
    """The dtype frozen weights are kept and computed in under `mixed_precision` (float32 without it)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision or "no", torch.float32)


class TrainingMethod:
    """What the shared loop asks of a method. Subclasses override build/trainable_module/save and the hooks."""

    name = "base"

    def __init__(self, args: argparse.Namespace):
        self.args = args

    # ---- set-up
    def module_dtype(self, part: str, compute_dtype: torch.dtype) -> torch.dtype:
        """The dtype the loop loads `part` ('denoiser' or 'text_encoder') in: frozen parts use the compute dtype;
        methods that train a part's own weights keep it in float32 (mixed precision autocasts)."""
        return compute_dtype

    def prepare_data(self, bundle, *, device: torch.device, dtype: torch.dtype) -> None:
        """Called on the main process after the model is loaded and before the dataset is read (DreamBooth makes
        missing class images here)."""

    @property
    def trains_text_encoder(self) -> bool:
        """Whether any text-encoder weights are trained at the start of the run."""
        return False

    def build(self, bundle, *, family: str) -> tuple[list[dict], list[str]]:
        """Make the trained parameters; returns (optimizer param groups, names for lr logging)."""
        raise NotImplementedError

    def trainable_module(self) -> torch.nn.Module:
        """The module accelerate wraps for data-parallel gradient sync (holds every trained parameter)."""
        raise NotImplementedError

    # ---- per step
    def before_step(self, step: int) -> bool:
        """Called before each forward pass; returns whether the text encoder is trained in this step."""
        return self.trains_text_encoder

    def captions(self, captions: list[str]) -> list[str]:
        """The captions actually encoded (textual inversion swaps in its templates)."""
        return captions

    def after_optimizer_step(self, step: int) -> None:
        """Called after each optimizer step (EMA updates, restoring frozen embeddings, ...)."""

    def sample_prompts(self, prompts: list) -> list:
        """The sample prompts actually generated (textual inversion expands its token to all its vectors)."""
        return prompts

    def warn(self, message: str, hint: str = "") -> None:
        """A warning for the user; the loop replaces this with its own (log line and `warning` event)."""
        logging.getLogger("sd_scripts.train").warning(message)

    # ---- outputs
    def file_extension(self) -> str:
        return "." + self.args.save_model_as

    def metadata(self, training_metadata: dict[str, str]) -> dict[str, str]:
        """The file's metadata from the LoRA-style training metadata (full models and embeddings adapt it)."""
        return training_metadata

    def network_args_dict(self) -> dict[str, Any] | None:
        return None

    def output_weights(self) -> ContextManager:
        """While entered, the models hold the weights that are saved (e.g. EMA weights); used around sampling."""
        return nullcontext()

    def save(self, module: torch.nn.Module, path: str, *, dtype: torch.dtype | None, metadata: dict[str, str]):
        raise NotImplementedError


class NetworkMethod(TrainingMethod):
    """An adapter network (LoRA / LoCon, LoHa, LoKr, LyCORIS: `network_module`, resolved by networks/registry.py) on
    the U-Net and text encoder; the base weights stay frozen and shared."""

    name = "network"
    model_kind = "lora"  # metadata / modelspec suffix

    def __init__(self, args: argparse.Namespace):
        super().__init__(args)
        self.network = None

    @property
    def trains_text_encoder(self) -> bool:
        return not self.args.network_train_unet_only and self._te_lr() != 0

    def _te_lr(self) -> float:
        a = self.args
        return a.text_encoder_lr if a.text_encoder_lr is not None else a.learning_rate

    def build(self, bundle, *, family: str) -> tuple[list[dict], list[str]]:
        """Creates the network on the bundle's models and returns (optimizer param groups, their lr names)."""
        from ..networks.registry import resolve_network_module

        a = self.args
        network_module = resolve_network_module(a.network_module)
        for part in (bundle.denoiser, *bundle.text_encoders, bundle.vae):
            part.requires_grad_(False)
        train_unet = not a.network_train_text_encoder_only
        train_te = self.trains_text_encoder
        if a.network_weights and a.dim_from_weights:
            net = network_module.create_network_from_weights(a.network_weights, unet=bundle.denoiser,
                                                             text_encoders=bundle.text_encoders, family=family,
                                                             multiplier=a.network_multiplier)
        else:
            net = network_module.create_network(unet=bundle.denoiser, text_encoders=bundle.text_encoders,
                                                family=family, network_dim=a.network_dim,
                                                network_alpha=a.network_alpha, network_dropout=a.network_dropout,
                                                network_args=a.network_args, multiplier=a.network_multiplier,
                                                train_unet=train_unet, train_text_encoder=train_te)
        if a.network_weights:
            net.load_weights(a.network_weights)
        net.apply_to()
        self.network = net
        unet_lr = a.unet_lr if a.unet_lr is not None else a.learning_rate
        te_lr = self._te_lr() if train_te else None
        groups, names = net.prepare_optimizer_params(unet_lr if train_unet else None, te_lr, a.learning_rate)
        return groups, names

    def trainable_module(self) -> torch.nn.Module:
        """The module accelerate wraps for data-parallel gradient sync."""
        return self.network

    def network_args_dict(self) -> dict[str, Any] | None:
        args = parse_kv_args(self.args.network_args, "network_args")
        return args or None

    def save(self, module: torch.nn.Module, path: str, *, dtype: torch.dtype | None, metadata: dict[str, str]):
        module.save_weights(path, dtype=dtype, metadata=metadata)
