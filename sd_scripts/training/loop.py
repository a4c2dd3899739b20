"""The shared training loop: every trainer (LoRA, DreamBooth, fine-tune, textual inversion) runs this.

`Trainer.run()` reads as the list of what a run does; each step is a method with a name. What is trained and saved
comes from a method object (training/methods.py); how a model family encodes text and calls its U-Net comes from a
strategy (sd_scripts/strategies). Devices, precision, gradient accumulation and data parallelism come from accelerate.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from collections import deque
from dataclasses import dataclass

import torch

from ..errors import UserError
from ..options import OptionError, parse_resolution
from . import noise as noise_math
from .control import RunControl, sync_flags
from .distributed import allreduce_gradients, broadcast_parameters, parameters_agree
from .events import EventWriter

log = logging.getLogger("sd_scripts.train")


@dataclass
class Plan:
    """How long the run is: derived once from the dataset size and the options."""

    batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    total_epochs: int


class Trainer:
    def __init__(self, args: argparse.Namespace, method):
        self.args = args
        self.method = method
        method.warn = self.warn  # a method's warnings reach the log and the event stream
        self.started_at = time.time()
        self.outputs: list[str] = []
        self.events = EventWriter(None)
        self.accelerator = None
        self.global_step = 0
        self.epoch = 0
        self._check_args()

    # ------------------------------------------------------------------ the run
    def run(self) -> str:
        self.setup_accelerator()
        self.control = RunControl(self.args.control_dir or self._default_control_dir())
        if self.is_main:
            self.control.install()
        try:
            self.load_model()
            self.prepare_data()
            self.load_dataset()
            self.cache_latents()
            self.cache_text_encoder_outputs()
            self.build_method()
            self.release_unused_models()
            self.create_optimizer()
            self.prepare()
            self.resume_state()
            self.emit_start()
            if self.args.sample_at_first:
                self.sample_images()
            status = self.train_epochs()
            self.save_final(status)
            self.finish(status)
            return status
        finally:
            self.control.restore()
            self.accelerator.end_training()

    # ------------------------------------------------------------------ setup
    def _check_args(self) -> None:
        a = self.args
        if not a.pretrained_model_name_or_path:
            raise OptionError("option 'pretrained_model_name_or_path' is required: give a .safetensors/.ckpt "
                              "checkpoint or a diffusers folder")
        if not a.output_dir:
            raise OptionError("option 'output_dir' is required: the folder where the trained model is written")
        if not (a.train_data_dir or a.dataset_config):
            raise OptionError("give 'train_data_dir' (parent of '<repeats>_<class>' folders) or 'dataset_config'")
        from .saving import check_output_dir_writable

        check_output_dir_writable(a.output_dir)
        from .te_cache import check_options as check_te_cache_options

        check_te_cache_options(a, trains_text_encoder=self.method.trains_text_encoder, trainer=self.method.name)
        if a.output_name is None:
            a.output_name = "last"
        if (a.color_aug or a.random_crop) and a.cache_latents:
            raise OptionError("options 'cache_latents' and 'color_aug'/'random_crop' exclude each other: latents of "
                              "augmented images change every epoch; turn one of them off")

    def _default_control_dir(self) -> str | None:
        return os.path.dirname(os.path.abspath(self.args.events_file)) if self.args.events_file else None

    def setup_accelerator(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration, set_seed

        a = self.args
        log_with = None
        project = None
        if a.logging_dir:
            log_with = a.log_with or "tensorboard"
            run_name = (a.log_prefix or "") + time.strftime("%Y%m%d%H%M%S")
            project = ProjectConfiguration(project_dir=a.logging_dir, logging_dir=os.path.join(a.logging_dir, run_name))
        # `accelerate launch --multi_gpu --num_processes N` on a machine without GPUs: data parallel on the CPU
        # over gloo (accelerate only picks that up when told to use the CPU).
        cpu_ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
        self.accelerator = Accelerator(gradient_accumulation_steps=a.gradient_accumulation_steps,
                                       mixed_precision=a.mixed_precision, log_with=log_with,
                                       project_config=project, cpu=cpu_ddp)
        self.is_main = self.accelerator.is_main_process
        self.events = EventWriter(a.events_file, enabled=self.is_main)
        if a.seed is not None:
            set_seed(a.seed, device_specific=True)
        for old in ("xformers", "mem_eff_attn"):
            if getattr(a, old):
                self.warn(f"option '{old}' is not needed: PyTorch scaled-dot-product attention is always used")
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(a.mixed_precision, torch.float32)
        self.save_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "float": torch.float32}.get(
            a.save_precision or "", None)

    def load_model(self) -> None:
        from ..models.loading import load_model

        a = self.args
        log.info("loading %s", a.pretrained_model_name_or_path)
        bundle = load_model(a.pretrained_model_name_or_path, vae=a.vae, v2=a.v2 or None,
                            v_parameterization=a.v_parameterization or None)
        device = self.accelerator.device
        # Frozen parts in the compute dtype; trained weights stay float32 (mixed precision autocasts).
        bundle.unet.to(device, dtype=self.method.module_dtype("unet", self.weight_dtype))
        for text_encoder in bundle.text_encoders:
            text_encoder.to(device, dtype=self.method.module_dtype("text_encoder", self.weight_dtype))
        # The VAE overflows in fp16 (the SDXL one in bf16 too, unless no_half_vae keeps it in float32)
        half_vae_ok = self.weight_dtype != torch.float16 and not a.no_half_vae
        bundle.vae.to(device, dtype=self.weight_dtype if half_vae_ok else torch.float32)
        if a.gradient_checkpointing:
            bundle.unet.enable_gradient_checkpointing()
        self.bundle = bundle
        from ..models.families import family_info
        from ..strategies import strategy_for

        self.family = family_info(bundle.family)
        self.strategy = strategy_for(bundle, a)
        self.alphas_cumprod = torch.tensor(self._alphas_cumprod(bundle.scheduler_config), device=device)
        self.v_prediction = bundle.v_prediction

    @staticmethod
    def _alphas_cumprod(config: dict) -> list[float]:
        from diffusers import DDPMScheduler

        sched = DDPMScheduler.from_config(config)
        return sched.alphas_cumprod.tolist()

    def prepare_data(self) -> None:
        """The method's data preparation with the loaded model (DreamBooth class images), on the main process."""
        if self.is_main:
            self.method.prepare_data(self.bundle, device=self.accelerator.device, dtype=self.weight_dtype)
        self.accelerator.wait_for_everyone()

    def load_dataset(self) -> None:
        from ..data.dataset import TrainDataset
        from ..data.dataset_config import load_datasets

        a = self.args
        configs = load_datasets(a, bucket_step_default=self.family.bucket_step)
        self.dataset = TrainDataset(configs, seed=a.seed or 0, prior_loss_weight=a.prior_loss_weight,
                                    max_train_steps=a.max_train_steps, bucket_step=self.family.bucket_step)
        self.summary = self.dataset.summary()
        if self.summary.num_train_images == 0:
            raise UserError(f"no training images found in {a.train_data_dir or a.dataset_config}")

    def cache_latents(self) -> None:
        a = self.args
        if not a.cache_latents:
            return
        t0 = time.time()
        kwargs = dict(vae_id=self.bundle.vae_id, to_disk=a.cache_latents_to_disk, batch_size=a.vae_batch_size,
                      skip_check=a.skip_cache_check,
                      npz_suffix=getattr(self.strategy, "latent_cache_suffix", "_sd"))
        with torch.no_grad():
            if a.cache_latents_to_disk:  # the main process writes the files, the others read them
                if self.is_main:
                    report = self.dataset.cache_latents(self.strategy.encode_images, is_main_process=True, **kwargs)
                self.accelerator.wait_for_everyone()
                if not self.is_main:
                    report = self.dataset.cache_latents(self.strategy.encode_images, is_main_process=False, **kwargs)
            else:
                report = self.dataset.cache_latents(self.strategy.encode_images, is_main_process=self.is_main,
                                                    **kwargs)
        log.info("latents: %d encoded, %d reused from disk in %.1f s", report.encoded, report.reused,
                 time.time() - t0)

    def cache_text_encoder_outputs(self) -> None:
        """cache_text_encoder_outputs[_to_disk]: every caption encoded once before training (te_cache.py)."""
        from .te_cache import cache_text_encoder_outputs

        cache_text_encoder_outputs(self.strategy, self.dataset, self.args, self.accelerator)

    def build_method(self) -> None:
        self.param_groups, self.lr_names = self.method.build(self.bundle, family=self.bundle.family)
        if not any(p.requires_grad for g in self.param_groups for p in g["params"]):
            raise OptionError("nothing to train: check network_train_unet_only / network_train_text_encoder_only "
                              "and the learning rates")
        self.train_text_encoder = self.method.trains_text_encoder
        if self.train_text_encoder and self.args.gradient_checkpointing:
            for text_encoder in self.bundle.text_encoders:
                text_encoder.gradient_checkpointing_enable()

    def release_unused_models(self) -> None:
        """Free the VAE once latents are cached, and a frozen text encoder once every (fixed) caption is encoded.

        Only when nothing later needs them: no sample images, no full-model save, no trained text encoder.
        """
        a = self.args
        if a.sample_prompts or getattr(self.method, "saves_full_model", False):
            return
        freed = []
        if a.cache_latents:
            self.bundle.vae = None
            freed.append("VAE")
        release = getattr(self.strategy, "release_text_encoders", None)
        if release and not self.method.trains_text_encoder:
            captions = self.dataset.fixed_captions()
            if captions is not None and release(captions):
                freed.append("text encoder")
        if freed:
            import gc

            gc.collect()
            log.info("released the %s: not needed for the rest of the run", " and ".join(freed))

    def create_optimizer(self) -> None:
        from .optim import create_optimizer

        a = self.args
        opt_type = "AdamW8bit" if a.use_8bit_adam else a.optimizer_type
        self.optimizer = create_optimizer(opt_type, a.optimizer_args, self.param_groups, a.learning_rate)
        if getattr(a, "fused_backward_pass", False):  # steps each parameter inside backward; step() is a no-op
            from .fused_backward import FusedBackwardOptimizer

            self.optimizer = FusedBackwardOptimizer(self.optimizer, max_grad_norm=a.max_grad_norm)

    def prepare(self) -> None:
        from .optim import create_lr_scheduler

        a = self.args
        workers = 0 if a.cache_latents else min(a.max_data_loader_n_workers, os.cpu_count() or 1)
        loader = torch.utils.data.DataLoader(self.dataset, batch_size=1, shuffle=False, collate_fn=_first,
                                             num_workers=workers,
                                             persistent_workers=a.persistent_data_loader_workers and workers > 0)
        # The trained module is not wrapped in DDP: the U-Net is called directly, so gradients are averaged
        # across processes by training/distributed.py instead.
        self.module = self.method.trainable_module()
        self.trained_params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        broadcast_parameters(self.trained_params)
        self.optimizer, self.loader = self.accelerator.prepare(self.optimizer, loader)
        self.plan = self._plan(len(self.loader))
        self.lr_scheduler = create_lr_scheduler(
            a.lr_scheduler, self.optimizer, num_training_steps=self.plan.total_steps,
            num_warmup_steps=a.lr_warmup_steps, num_cycles=a.lr_scheduler_num_cycles, power=a.lr_scheduler_power)
        self.accelerator.register_for_checkpointing(self.lr_scheduler)
        # The trained weights live outside accelerate.prepare: register them so save_state/resume keep them.
        self.accelerator.register_for_checkpointing(self.module)
        if self.accelerator.trackers is not None and a.logging_dir:
            self.accelerator.init_trackers(a.log_tracker_name or "network_train")

    def _plan(self, batches_per_epoch: int) -> Plan:
        a = self.args
        steps_per_epoch = max(1, math.ceil(batches_per_epoch / a.gradient_accumulation_steps))
        total = a.max_train_epochs * steps_per_epoch if a.max_train_epochs else a.max_train_steps
        return Plan(batches_per_epoch, steps_per_epoch, total, math.ceil(total / steps_per_epoch))

    def resume_state(self) -> None:
        a = self.args
        self.first_epoch = 0
        if not a.resume:
            return
        state_file = os.path.join(a.resume, "train_state.json")
        if not os.path.isfile(state_file):
            raise UserError(f"resume folder {a.resume!r} has no train_state.json: give a '<name>-state' folder "
                            "written with save_state")
        self.accelerator.load_state(a.resume)
        with open(state_file, encoding="utf-8") as f:
            state = json.load(f)
        self.global_step = int(state["current_step"])
        self.first_epoch = self.global_step // self.plan.steps_per_epoch
        log.info("resumed from %s at step %d", a.resume, self.global_step)

    def emit_start(self) -> None:
        s, p = self.summary, self.plan
        self.events.start(model_family=self.bundle.family, v_prediction=self.v_prediction, trainer=self.method.name,
                          num_train_images=s.num_train_images, num_reg_images=s.num_reg_images,
                          batches_per_epoch=p.batches_per_epoch, steps_per_epoch=p.steps_per_epoch,
                          total_steps=p.total_steps, total_epochs=p.total_epochs,
                          batch_size=self.args.train_batch_size, num_processes=self.accelerator.num_processes,
                          output_dir=self.args.output_dir, output_name=self.args.output_name)
        log.info("training: %d images (+%d reg), %d steps per epoch, %d steps, %d epochs", s.num_train_images,
                 s.num_reg_images, p.steps_per_epoch, p.total_steps, p.total_epochs)

    # ------------------------------------------------------------------ training
    def train_epochs(self) -> str:
        from tqdm.auto import tqdm

        p = self.plan
        self.bar = tqdm(total=p.total_steps, initial=self.global_step, desc="steps", smoothing=0,
                        disable=not self.is_main)
        self.recent_losses: deque = deque(maxlen=max(1, p.batches_per_epoch))
        self.loss_clock = _LossClock()
        self.module.train()
        status = "completed"
        for epoch in range(self.first_epoch, p.total_epochs):
            self.epoch = epoch + 1
            self.dataset.set_epoch(self.epoch)
            status = self.train_one_epoch()
            if status != "completed":
                break
            last = self.global_step >= p.total_steps
            self.end_of_epoch(last)
            if last:
                break
        self.bar.close()
        return status

    def train_one_epoch(self) -> str:
        for batch in self.loader:
            with self.accelerator.accumulate():
                loss = self.training_step(batch)
            if not self.accelerator.sync_gradients:
                continue
            self.global_step += 1
            self.after_step(loss)
            if self.global_step >= self.plan.total_steps:
                return "completed"
            if self.handle_requests():
                return "stopped"
        return "completed"

    def training_step(self, batch: dict) -> torch.Tensor:
        """One forward/backward (and optimizer step at the end of an accumulation window)."""
        a, acc = self.args, self.accelerator
        self.dataset.set_step(self.global_step)
        self.train_text_encoder = self.method.before_step(self.global_step)
        latents = self.batch_latents(batch)
        captions = self.method.captions(batch["captions"])
        with torch.set_grad_enabled(self.train_text_encoder), acc.autocast():
            cond = self.strategy.encode_captions(captions, train_text_encoder=self.train_text_encoder)
        noise = noise_math.make_noise(latents, a.noise_offset)
        timesteps = noise_math.sample_timesteps(latents.shape[0], len(self.alphas_cumprod), a.min_timestep,
                                                a.max_timestep, device=latents.device)
        noisy = noise_math.add_noise(self.alphas_cumprod, latents, noise, timesteps).to(self.weight_dtype)
        with acc.autocast():
            pred = self.strategy.predict(noisy, timesteps, cond.to(self.weight_dtype), batch)
        target = noise_math.training_target("v_prediction" if self.v_prediction else "epsilon", latents, noise,
                                            timesteps, self.alphas_cumprod)
        loss = noise_math.diffusion_loss(pred.float(), target.float(), timesteps, self.alphas_cumprod,
                                         min_snr_gamma=a.min_snr_gamma, v_prediction=self.v_prediction,
                                         loss_weights=batch["loss_weights"].to(latents.device))
        acc.backward(loss)
        if acc.sync_gradients:
            allreduce_gradients(self.trained_params)
            if a.max_grad_norm:
                acc.clip_grad_norm_(self.trained_params, a.max_grad_norm)
        self.optimizer.step()  # accelerate's optimizer wrapper skips the step inside an accumulation window
        if acc.sync_gradients:
            self.lr_scheduler.step()
            self.method.after_optimizer_step(self.global_step + 1)
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def batch_latents(self, batch: dict) -> torch.Tensor:
        device = self.accelerator.device
        if "latents" in batch:
            latents = batch["latents"].to(device, non_blocking=True)
        else:
            with torch.no_grad():
                latents = self.strategy.encode_images(batch["images"])
        return latents.float() * self.strategy.vae_scaling_factor

    def after_step(self, loss: torch.Tensor) -> None:
        """Progress bar, events and scalars; reads the loss from the device only when something shows it."""
        self.bar.update(1)
        self.loss_clock.add(loss)
        if self.loss_clock.due(self.global_step, self.plan.total_steps):
            values = self.loss_clock.flush()
            self.recent_losses.extend(values)
            self.report_progress(values[-1])
        a = self.args
        if a.sample_every_n_steps and self.global_step % a.sample_every_n_steps == 0:
            self.sample_images()
        if a.save_every_n_steps and self.global_step % a.save_every_n_steps == 0 \
                and self.global_step < self.plan.total_steps:
            self.save_model(step=self.global_step)

    def report_progress(self, loss: float) -> None:
        avg = sum(self.recent_losses) / len(self.recent_losses)
        lrs = self.lr_scheduler.get_last_lr()
        elapsed = time.time() - self.loss_clock.started
        done = self.global_step - self.loss_clock.first_step
        rate = done / elapsed if elapsed > 0 and done > 0 else None
        eta = (self.plan.total_steps - self.global_step) / rate if rate else None
        self.bar.set_postfix(avr_loss=f"{avg:.4g}", refresh=False)
        self.events.progress(step=self.global_step, total_steps=self.plan.total_steps, epoch=self.epoch,
                             total_epochs=self.plan.total_epochs, loss=loss, avg_loss=avg, lr=lrs[0],
                             it_per_s=rate, eta_s=eta)
        if self.args.logging_dir:
            scalars = {"loss/current": loss, "loss/average": avg}
            for name, lr in zip(self.lr_names, lrs):
                scalars[f"lr/{name}"] = lr
            self.accelerator.log(scalars, step=self.global_step)

    def end_of_epoch(self, last: bool) -> None:
        """Epoch scalars, per-epoch saves (the last epoch's is the final file) and samples."""
        a = self.args
        if self.args.logging_dir and self.recent_losses:
            self.accelerator.log({"loss/epoch_average": sum(self.recent_losses) / len(self.recent_losses)},
                                 step=self.epoch)
        if a.save_every_n_epochs and self.epoch % a.save_every_n_epochs == 0 and not last:
            self.save_model(epoch=self.epoch)
        if a.sample_every_n_epochs and self.epoch % a.sample_every_n_epochs == 0:
            self.sample_images(epoch=self.epoch)

    def handle_requests(self) -> bool:
        """Stop / save now / sample now from SIGINT or the control folder; True when the run must stop."""
        flags = {"stop": False, "save": False, "sample": False}
        if self.is_main:
            self.control.poll()
            flags = {"stop": self.control.stop_requested, "save": self.control.take_save_request(),
                     "sample": self.control.take_sample_request()}
        if self.accelerator.num_processes > 1:
            flags = sync_flags(self.accelerator, flags)
        if flags["save"]:
            self.save_model(step=self.global_step)
        if flags["sample"]:
            self.sample_images()
        return flags["stop"]

    # ------------------------------------------------------------------ outputs
    def sample_images(self, epoch: int | None = None) -> None:
        a = self.args
        if not a.sample_prompts:
            return
        if self.is_main:
            from .sampling import generate_samples, parse_prompt_file

            prompts = self.method.sample_prompts(parse_prompt_file(a.sample_prompts,
                                                                   default_sampler=a.sample_sampler))
            b = self.bundle
            with self.method.output_weights():
                paths = generate_samples(unet=b.unet, vae=b.vae, text_encoder=b.text_encoder, tokenizer=b.tokenizer,
                                         scheduler_config=b.scheduler_config, prompts=prompts,
                                         out_dir=os.path.join(a.output_dir, "sample"), output_name=a.output_name,
                                         epoch=epoch, step=None if epoch else self.global_step,
                                         device=self.accelerator.device, dtype=self.weight_dtype,
                                         clip_skip=a.clip_skip, eval_modules=[self.module],
                                         text_encoder_2=b.text_encoder_2, tokenizer_2=b.tokenizer_2)
            self.events.sample(step=self.global_step, epoch=self.epoch, paths=paths,
                               prompts=[p.prompt for p in prompts])
        self.accelerator.wait_for_everyone()

    def save_model(self, *, epoch: int | None = None, step: int | None = None, final: bool = False) -> None:
        from .saving import model_file_name, prune_old_saves, state_dir_name

        a = self.args
        ext = self.method.file_extension()
        name = model_file_name(a.output_name, ext, epoch=None if final else epoch, step=None if final else step)
        path = os.path.join(a.output_dir, name)
        if self.is_main:
            module = self.module
            self.method.save(module, path, dtype=self.save_dtype, metadata=self.metadata())
            self.outputs.append(path)
            kind = "final" if final else ("epoch" if epoch else "step")
            self.events.emit("save", path=path, kind=kind, step=self.global_step, epoch=self.epoch)
            log.info("saved %s", path)
            prune_old_saves(a.output_dir, a.output_name, ext, keep_last_n_epochs=a.save_last_n_epochs,
                            current_epoch=epoch, keep_last_n_steps=a.save_last_n_steps, current_step=step)
        if a.save_state or (final and a.save_state_on_train_end):
            state_dir = os.path.join(a.output_dir, state_dir_name(a.output_name, epoch=None if final else epoch,
                                                                  step=None if final else step))
            self.accelerator.save_state(state_dir)
            if self.is_main:
                with open(os.path.join(state_dir, "train_state.json"), "w", encoding="utf-8") as f:
                    json.dump({"current_epoch": self.epoch, "current_step": self.global_step}, f)
                self.events.emit("save", path=state_dir, kind="state", step=self.global_step, epoch=self.epoch)
        self.accelerator.wait_for_everyone()

    def metadata(self) -> dict[str, str]:
        from .metadata import build_training_metadata, minimal_metadata

        a = self.args
        resolution = parse_resolution(a.resolution)
        kwargs = dict(family=self.bundle.family, v_prediction=self.v_prediction, resolution=resolution,
                      dataset_summary=self.summary, total_steps=self.plan.total_steps, epoch=self.epoch,
                      step=self.global_step, started_at=self.started_at, finished_at=time.time(),
                      sd_model_name=os.path.basename(a.pretrained_model_name_or_path.rstrip("/\\")),
                      network_args=self.method.network_args_dict())
        metadata = self.method.metadata(build_training_metadata(a, **kwargs))
        return minimal_metadata(metadata) if a.no_metadata else metadata

    def save_final(self, status: str) -> None:
        if self.accelerator.num_processes > 1 and not parameters_agree(self.trained_params):
            self.warn("processes hold different trained weights: gradients were not averaged; the file saved "
                      "is the main process's")
        self.save_model(epoch=self.epoch, step=self.global_step, final=True)

    def finish(self, status: str) -> None:
        self.events.done(status, outputs=self.outputs, step=self.global_step, epoch=self.epoch)
        self.events.close()
        log.info("%s after %d steps", status, self.global_step)

    def fail(self, message: str, hint: str) -> None:
        """Called by the entry point on an error: one `error` and a `done: failed` event."""
        self.events.error(message, hint=hint)
        self.events.done("failed", outputs=self.outputs, step=self.global_step, epoch=self.epoch)
        self.events.close()

    def warn(self, message: str, hint: str = "") -> None:
        log.warning(message)
        self.events.warning(message, hint=hint)


class _LossClock:
    """Collects per-step loss tensors and decides when to read them from the device (a host sync) and report.

    Reports the first step at once, then about twice a second and at the last step, so logging never costs a
    device sync per step on a GPU.
    """

    def __init__(self, interval_s: float = 0.5):
        self.interval_s = interval_s
        self.pending: list[torch.Tensor] = []
        self.last = 0.0
        self.started = time.time()
        self.first_step = 0

    def add(self, loss: torch.Tensor) -> None:
        self.pending.append(loss)

    def due(self, step: int, total: int) -> bool:
        now = time.time()
        if self.first_step == 0:
            self.first_step, self.started = step, now
            return True
        return step >= total or now - self.last >= self.interval_s or loss_on_cpu(self.pending)

    def flush(self) -> list[float]:
        values = torch.stack(self.pending).float().tolist()
        self.pending.clear()
        self.last = time.time()
        return values


def loss_on_cpu(pending: list[torch.Tensor]) -> bool:
    """On the CPU reading a loss costs nothing, so every step is reported."""
    return bool(pending) and pending[-1].device.type == "cpu"


def _first(items):
    return items[0]
