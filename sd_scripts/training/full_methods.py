"""Full-model training methods: DreamBooth (`train_db`) and fine-tuning (`fine_tune`) on the shared loop.

Both train the U-Net's own weights (and the text encoder's, see below) and save a whole model: a single file in the
original layout (.safetensors / .ckpt) or a diffusers folder (save_model_as diffusers / diffusers_safetensors; both
write safetensors weights), named like every other output (`<name>`, `<name>-<epoch:06d>`, `<name>-step<step:08d>`).
SD 1.x, SD 2.x and SDXL: for SDXL "the text encoder" means both of them (CLIP-L and OpenCLIP-bigG, with its
projection), trained, frozen, cast and saved together; DreamBooth class images come from the SDXL pipeline.

- Trained weights stay float32 under mixed precision (autocast computes in fp16/bf16); `full_bf16` keeps them in
  bf16. Frozen parts (VAE, a text encoder that is not trained) use the compute dtype.
- Learning rates: `learning_rate` for the U-Net, `learning_rate_te` (default learning_rate) for the text encoder(s);
  `learning_rate_te1` / `_te2` / `_te3` (sdxl_train, sd3_train) set one encoder's rate; a rate of 0 leaves that
  encoder frozen. The family may keep an encoder frozen unless an option asks (SD3's T5-XXL: `train_t5xxl`).
- DreamBooth trains the text encoder for the first `stop_text_encoder_training` steps (all steps when unset; 0:
  never), then freezes it. Fine-tuning trains it with `train_text_encoder`.
- `use_ema`: an average of the trained weights (training/ema.py) is what gets saved and sampled.
- `fused_backward_pass`: optimizer steps inside backward (training/fused_backward.py).
- Metadata (.safetensors): modelspec.* of a full checkpoint (architecture without '/lora', e.g.
  'stable-diffusion-xl-v1-base'; Stability-AI implementation as sd-scripts writes for checkpoints) plus the ss_*
  training keys, without the LoRA-only ones.
"""
from __future__ import annotations

import argparse
import logging
from contextlib import nullcontext
from typing import ContextManager

import torch

from ..options import OptionError
from .methods import TrainingMethod, compute_dtype

log = logging.getLogger(__name__)

IMPLEMENTATION_STABILITY_AI = "https://github.com/Stability-AI/generative-models"
_LORA_ONLY_KEYS = ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args")
DIFFUSERS_FORMATS = ("diffusers", "diffusers_safetensors")


class FullModelMethod(TrainingMethod):
    """Trains the U-Net (and optionally the text encoder) in place; saves the whole model."""

    name = "full"
    saves_full_model = True  # the loop keeps the VAE and text encoder: they are part of every saved file

    def __init__(self, args: argparse.Namespace):
        super().__init__(args)
        self.bundle = None
        self.ema = None
        self._module: torch.nn.Module | None = None
        self._te_trained = False
        if args.full_fp16:
            raise OptionError("option 'full_fp16' is not supported for full models (fp16 weights need a patched "
                              "gradient scaler): use full_bf16, or mixed_precision fp16 with float32 weights")
        if args.full_bf16 and args.mixed_precision != "bf16":
            raise OptionError("option 'full_bf16' needs mixed_precision bf16: set mixed_precision = \"bf16\"")

    # ---- what is trained
    def _te_lr(self) -> float:
        a = self.args
        return a.learning_rate_te if a.learning_rate_te is not None else a.learning_rate

    def _te_lrs(self, count: int) -> list[float]:
        """Each of `count` text encoders' learning rate: learning_rate_te<N>, else the shared one."""
        return [_or(getattr(self.args, f"learning_rate_te{i + 1}", None), self._te_lr()) for i in range(count)]

    def _te_wanted(self) -> bool:
        """Whether a text encoder is trained at the start (subclasses add their rule)."""
        return any(lr != 0 for lr in self._te_lrs(3))

    @property
    def trains_text_encoder(self) -> bool:
        return self._te_wanted()

    def trained_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.args.full_bf16 else torch.float32

    def module_dtype(self, part: str, compute_dtype: torch.dtype) -> torch.dtype:
        if part == "denoiser" or (part == "text_encoder" and self._te_wanted()):
            return self.trained_dtype()
        return compute_dtype

    def build(self, bundle, *, family: str) -> tuple[list[dict], list[str]]:
        a = self.args
        self.bundle = bundle
        from ..families import family_class

        text_encoders = _text_encoders(bundle)
        lrs = self._te_lrs(len(text_encoders))
        allowed = family_class(family).trainable_text_encoders(a) or (True,) * len(text_encoders)
        trained = [self._te_wanted() and lr != 0 and bool(ok) for lr, ok in zip(lrs, allowed)]
        self._te_trained = any(trained)
        bundle.vae.requires_grad_(False)
        bundle.denoiser.requires_grad_(True)
        frozen = self._freeze_last_blocks(bundle, family)
        for text_encoder, on in zip(text_encoders, trained):
            text_encoder.requires_grad_(on)
            if not on and self._te_wanted():  # loaded for training (float32), but this one stays frozen
                text_encoder.to(dtype=compute_dtype(a.mixed_precision))
        groups, names = self._denoiser_groups(bundle.denoiser, family)
        if frozen:
            log.info("the denoiser's last %d blocks stay frozen (num_last_block_to_freeze)", frozen)
        modules = {"unet": bundle.denoiser}
        chosen = [(i, te, lr) for i, (te, lr, on) in enumerate(zip(text_encoders, lrs, trained)) if on]
        if len({lr for _, _, lr in chosen}) == 1:  # one rate: one group (lr/textencoder)
            groups.append({"params": [p for _, te, _ in chosen for p in te.parameters()], "lr": chosen[0][2]})
            names.append("textencoder")
        else:  # a group per encoder (lr/textencoder1, lr/textencoder2, ...)
            for i, te, lr in chosen:
                groups.append({"params": list(te.parameters()), "lr": lr})
                names.append(f"textencoder{i + 1}")
        for i, text_encoder, _ in chosen:
            modules["text_encoder" if i == 0 else f"text_encoder_{i + 1}"] = text_encoder
        self._module = torch.nn.ModuleDict(modules)
        if a.use_ema:
            from .ema import TrainedWeightsEMA

            self.ema = TrainedWeightsEMA([p for g in groups for p in g["params"]], decay=a.ema_decay)
        return groups, names

    def _freeze_last_blocks(self, bundle, family: str) -> int:
        """sd3_train's num_last_block_to_freeze: the last N transformer blocks (of the family's last block list)
        keep their weights. Returns N."""
        count = getattr(self.args, "num_last_block_to_freeze", None) or 0
        if not count:
            return 0
        from ..families import family_class

        lists = family_class(family).block_swap_groups(bundle.denoiser, 0) or []
        if not lists or count > len(lists[-1].blocks):
            raise OptionError(f"option 'num_last_block_to_freeze' {count}: this model has "
                              f"{len(lists[-1].blocks) if lists else 0} blocks to freeze; use a smaller number")
        for block in list(lists[-1].blocks)[-count:]:
            block.requires_grad_(False)
        return count

    def _denoiser_groups(self, denoiser: torch.nn.Module, family: str) -> tuple[list[dict], list[str]]:
        """The U-Net's parameter group at learning_rate; with block_lr (sdxl_train) one group per block at its own
        rate ('block<N>', as sd-scripts logs them), and the blocks at 0 frozen."""
        a = self.args
        from ..families import family_class

        if not getattr(a, "block_lr", None):
            parts = family_class(family).denoiser_param_groups(denoiser, a)
            if parts is not None:  # the family's per-part rates (0 = frozen)
                groups, names = [], []
                for name, params, lr in parts:
                    if lr == 0:
                        for param in params:
                            param.requires_grad_(False)
                        log.info("denoiser part %s frozen (%d tensors)", name, len(params))
                        continue
                    groups.append({"params": params, "lr": lr})
                    names.append(f"unet_{name}")
                return groups, names
            trained = [p for p in denoiser.parameters() if p.requires_grad]  # (num_last_block_to_freeze)
            return [{"params": trained, "lr": a.learning_rate}], ["unet"]

        numbering = family_class(family).denoiser_blocks(denoiser)
        if numbering is None:
            raise OptionError("option 'block_lr' needs a U-Net with sd-scripts' block numbering (SDXL): remove it")
        count, block_of = numbering
        rates = [float(v) for v in str(a.block_lr).split(",")]
        if len(rates) != count:
            raise OptionError(f"option 'block_lr' has {len(rates)} values but the U-Net has {count} blocks: give "
                              f"{count} comma-separated learning rates (0 leaves a block untrained)")
        by_block: dict[int, list] = {}
        for name, param in denoiser.named_parameters():
            if param.requires_grad:
                by_block.setdefault(block_of(name), []).append(param)
        groups, names = [], []
        for block in sorted(by_block):
            if rates[block] == 0:
                for param in by_block[block]:
                    param.requires_grad_(False)
                continue
            groups.append({"params": by_block[block], "lr": rates[block]})
            names.append(f"block{block}")
        log.info("block_lr: %d U-Net blocks trained at their own rates, %d frozen", len(groups),
                 len(by_block) - len(groups))
        return groups, names

    def trainable_module(self) -> torch.nn.Module:
        return self._module

    # ---- per step
    def before_step(self, step: int) -> bool:
        return self._te_trained

    def freeze_text_encoder(self, step: int) -> None:
        """Stop training the text encoder from now on (its weights keep their current values)."""
        if not self._te_trained:
            return
        self._te_trained = False
        for text_encoder in _text_encoders(self.bundle):
            text_encoder.requires_grad_(False)
            for p in text_encoder.parameters():
                p.grad = None
        log.info("text encoder(s) frozen at step %d", step)

    def after_optimizer_step(self, step: int) -> None:
        if self.ema is not None:
            self.ema.update()

    # ---- outputs
    def output_weights(self) -> ContextManager:
        return self.ema.swapped_in() if self.ema is not None else nullcontext()

    def file_extension(self) -> str:
        return "" if self.args.save_model_as in DIFFUSERS_FORMATS else "." + self.args.save_model_as

    def metadata(self, training_metadata: dict[str, str]) -> dict[str, str]:
        meta = {k: v for k, v in training_metadata.items() if k not in _LORA_ONLY_KEYS}
        arch = meta.get("modelspec.architecture", "")
        meta["modelspec.architecture"] = arch.split("/", 1)[0]
        meta["modelspec.implementation"] = IMPLEMENTATION_STABILITY_AI
        return meta

    def save(self, module: torch.nn.Module, path: str, *, dtype: torch.dtype | None, metadata: dict[str, str]):
        from ..families import family_class

        family = family_class(self.bundle.family)(self.bundle)
        with self.output_weights():
            family.save_checkpoint(path, dtype=dtype, metadata=metadata,
                                   diffusers=self.args.save_model_as in DIFFUSERS_FORMATS)


def _or(value, default):
    return default if value is None else value


def _text_encoders(bundle) -> list:
    """The bundle's text encoders, in the family's order."""
    return [te for te in bundle.text_encoders if te is not None]


class DreamBoothMethod(FullModelMethod):
    """DreamBooth: instance images plus class (regularisation) images weighted by prior_loss_weight; the text
    encoder is trained for the first stop_text_encoder_training steps; missing class images are generated."""

    name = "dreambooth"

    def __init__(self, args: argparse.Namespace):
        super().__init__(args)
        if args.num_class_images and not args.reg_data_dir:
            raise OptionError("option 'num_class_images' needs reg_data_dir: the folder whose '<repeats>_<class>' "
                              "folders receive the generated class images")

    def _te_wanted(self) -> bool:
        stop = self.args.stop_text_encoder_training
        return super()._te_wanted() and (stop is None or stop > 0)

    def before_step(self, step: int) -> bool:
        stop = self.args.stop_text_encoder_training
        if stop is not None and step >= stop:
            self.freeze_text_encoder(step)
        return self._te_trained

    def prepare_data(self, bundle, *, device: torch.device, dtype: torch.dtype) -> None:
        a = self.args
        if not a.num_class_images:
            return
        from ..families import family_spec
        from ..options import parse_resolution
        from ..tools.class_images import ensure_class_images

        ensure_class_images(bundle, a.reg_data_dir, a.num_class_images, class_prompt=a.class_prompt,
                            resolution=parse_resolution(a.resolution), seed=a.seed or 0,
                            sampler=a.sample_sampler, device=device, dtype=dtype,
                            clip_skip=a.clip_skip if family_spec(bundle.family).clip_skip else None)


class FineTuneMethod(FullModelMethod):
    """Fine-tuning: captions from a metadata JSON (in_json), the text encoder only with train_text_encoder."""

    name = "finetune"
    #: the script also reads DreamBooth-style concept folders (train_data_dir / reg_data_dir) when no in_json is
    #: given, as sd-scripts' sdxl_train, sd3_train and flux_train do; its fine_tune reads metadata only
    folder_datasets = False

    def __init__(self, args: argparse.Namespace):
        super().__init__(args)
        if self.folder_datasets or args.dataset_config:
            return
        script = getattr(args, "trainer_script", None) or "fine_tune"
        if not args.in_json:
            raise OptionError(f"{script} reads captions from a metadata JSON: give in_json (build one with python -m "
                              "sd_scripts.tools.build_metadata --train_data_dir DIR --out meta.json) or a "
                              "dataset_config whose subsets set metadata_file")
        if getattr(args, "reg_data_dir", None):
            raise OptionError(f"option 'reg_data_dir': {script} trains on the in_json metadata only (regularisation "
                              "folders are DreamBooth's: use train_db, or a dataset_config with is_reg subsets)")

    def _te_wanted(self) -> bool:
        return bool(self.args.train_text_encoder) and super()._te_wanted()


class FolderFineTuneMethod(FineTuneMethod):
    """Fine-tuning that also takes concept folders (sdxl_train, sd3_train, flux_train): in_json when given, else
    train_data_dir's '<repeats>_<class tokens>' folders (and reg_data_dir's, weighted by prior_loss_weight)."""

    folder_datasets = True
