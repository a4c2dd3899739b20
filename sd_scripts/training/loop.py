"""The shared training loop: every trainer (LoRA, DreamBooth, fine-tune, textual inversion) runs this.

`Trainer.run()` reads as the list of what a run does; each step is a method with a name. What is trained and saved
comes from a method object (training/methods.py); everything about the model (latents, text encoding, noising, the
target and the denoiser call) from its family (sd_scripts/families): the loop holds no model maths. Devices,
precision, gradient accumulation and data parallelism come from accelerate.
"""
from __future__ import annotations

import argparse
import logging
import time
from collections import deque

import torch

from .control import RunControl, sync_flags
from .events import EventWriter
from .loss import training_loss
from .run_outputs import RunOutputs
from .run_setup import RunSetup
from .sharding import ShardedRun

log = logging.getLogger("sd_scripts.train")


class Trainer(RunSetup, RunOutputs):
    """One training run. Set-up steps live in run_setup.py, outputs in run_outputs.py."""

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
        self.validation = None  # training/validation.py, when images are held out
        self.sharded = ShardedRun(None)  # FSDP / ZeRO-3 (training/sharding.py), set with the accelerator
        self._check_args()

    # ------------------------------------------------------------------ the run
    def run(self) -> str:
        self.setup_accelerator()
        self.control = RunControl(self.args.control_dir or self._default_control_dir())
        if self.is_main:
            self.control.install()
        try:
            if self.args.debug_dataset:  # list what the dataset yields; no model, no training
                return self.debug_dataset()
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

    def emit_start(self) -> None:
        s, p = self.summary, self.plan
        self.events.start(model_family=self.bundle.family, v_prediction=self.v_prediction, trainer=self.method.name,
                          num_train_images=s.num_train_images, num_reg_images=s.num_reg_images,
                          num_validation_images=len(self.validation.dataset.records) if self.validation else 0,
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
        loader = self.loader
        if self.resume_skip_batches:  # resumed mid-epoch: continue with the batch after the saved step's
            loader = self.accelerator.skip_first_batches(self.loader, self.resume_skip_batches)
            self.resume_skip_batches = 0
        # When iterated, accelerate's loader passes the dataset its own count of epochs from 0 (overriding
        # dataset.set_epoch above); a fresh loader from skip_first_batches would start that count again, so the
        # count is set here: a resumed or skipping run then draws the batches of the straight run's epoch
        loader.set_epoch(self.epoch - 1)
        for batch in loader:
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
        loss = self.batch_loss(batch, self.noise_rng.generator)
        acc.backward(loss)  # (under DeepSpeed the engine also averages, clips and steps here)
        if acc.sync_gradients and not self.deepspeed:
            if self.sharded.active:  # FSDP reduced the gradients in backward
                if a.max_grad_norm:
                    self.sharded.clip_grad_norm_(self.trained_params, a.max_grad_norm)
            else:
                self.gradients.average()
                if a.max_grad_norm:
                    acc.clip_grad_norm_(self.trained_params, a.max_grad_norm)
        self.optimizer.step()  # accelerate's optimizer wrapper skips the step inside an accumulation window
        if acc.sync_gradients:
            self.lr_scheduler.step()
            self.method.after_optimizer_step(self.global_step + 1)
        self.optimizer.zero_grad(set_to_none=not self.gradients.bucket_view)  # bucket views are zeroed in place
        return loss.detach()

    def batch_loss(self, batch: dict, generator: torch.Generator, timesteps: torch.Tensor | None = None
                   ) -> torch.Tensor:
        """The loss of one batch: noise (and timesteps, unless given: validation) from `generator`, the family's
        prediction and target. Under torch.no_grad (validation) nothing keeps a graph."""
        latents = self.batch_latents(batch)
        captions = self.method.captions(batch["captions"])
        pred, noised = self.sharded.call(self.predict, latents, captions, batch, generator, timesteps)
        return training_loss(pred, noised.target, batch["loss_weights"].to(latents.device), noised.weights,
                             loss_type=noised.loss_type, huber_c=noised.huber_c, mask=batch.get("loss_masks"))

    def predict(self, latents: torch.Tensor, captions: list[str], batch: dict, generator: torch.Generator,
                timesteps: torch.Tensor | None):
        """The family's text encoding, noising and prediction: (prediction, NoisedLatents). A sharded run calls this
        inside its model's forward (training/sharding.py)."""
        acc = self.accelerator
        with torch.set_grad_enabled(self.train_text_encoder and torch.is_grad_enabled()), acc.autocast():
            cond = self.family.encode_captions(captions, train_text_encoder=self.train_text_encoder)
        noised = self.family.noised(latents, generator, timesteps)
        noised.noisy = noised.noisy.to(self.weight_dtype)
        with acc.autocast():
            pred = self.family.predict(noised, cond.to(self.weight_dtype), batch)
        return pred, noised

    def batch_latents(self, batch: dict) -> torch.Tensor:
        device = self.accelerator.device
        if "latents" in batch:
            latents = batch["latents"].to(device, non_blocking=True)
        else:
            with torch.no_grad():
                latents = self.family.encode_images(batch["images"])
        return self.family.scale_latents(latents)

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
        if self.validation and self.validation.due_after_step(self.global_step):
            self.validate("step")

    def report_progress(self, loss: float) -> None:
        avg = sum(self.recent_losses) / len(self.recent_losses)
        lrs = self.lr_scheduler.get_last_lr()
        elapsed = time.time() - self.loss_clock.started
        done = self.global_step - self.loss_clock.first_step
        rate = done / elapsed if elapsed > 0 and done > 0 else None
        eta = (self.plan.total_steps - self.global_step) / rate if rate else None
        self.bar.set_postfix(avr_loss=f"{avg:.4g}", refresh=False)
        metrics = self.method.step_metrics()  # e.g. scale_weight_norms' max_norm/keys_scaled
        self.events.progress(step=self.global_step, total_steps=self.plan.total_steps, epoch=self.epoch,
                             total_epochs=self.plan.total_epochs, loss=loss, avg_loss=avg, lr=lrs[0],
                             it_per_s=rate, eta_s=eta, **{k.rsplit("/", 1)[-1]: v for k, v in metrics.items()})
        if self.trackers.active:
            scalars = {"loss/current": loss, "loss/average": avg, **metrics}
            for name, lr in zip(self.lr_names, lrs):
                scalars[f"lr/{name}"] = lr
            self.trackers.log(scalars, step=self.global_step, global_step=self.global_step, epoch=self.epoch)

    def end_of_epoch(self, last: bool) -> None:
        """Epoch scalars, per-epoch saves (the last epoch's is the final file) and samples."""
        a = self.args
        if self.validation and self.validation.due_after_epoch(self.epoch):
            self.validate("epoch")
        if self.trackers.active and self.recent_losses:
            self.trackers.log({"loss/epoch_average": sum(self.recent_losses) / len(self.recent_losses)},
                              step=self.epoch, global_step=self.global_step, epoch=self.epoch)
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
