"""What a run writes: sample images, model files (with metadata and pruning), and its final events.

`RunOutputs` is mixed into Trainer (training/loop.py).
"""
from __future__ import annotations

import json
import logging
import os
import time


from ..options import parse_resolution
from .distributed import parameters_agree

log = logging.getLogger("sd_scripts.train")


class RunOutputs:
    """Outputs of a run (mixed into Trainer)."""

    def sample_images(self, epoch: int | None = None) -> None:
        a = self.args
        if not a.sample_prompts:
            return
        from .optim import eval_weights

        with eval_weights(getattr(self, "optimizer", None)):  # a schedule-free optimizer's averaged weights
            self._sample_images(epoch)

    def _sample_images(self, epoch: int | None) -> None:
        a = self.args
        # A sharded model gathers its weights collectively: every process generates, the main one writes.
        if self.is_main or self.sharded.active:
            from .sampling import generate_samples, parse_prompt_file

            prompts = self.method.sample_prompts(parse_prompt_file(a.sample_prompts,
                                                                   default_sampler=a.sample_sampler))
            with self.method.output_weights():
                paths = self.sharded.call(
                    generate_samples, self.family, prompts=prompts, out_dir=os.path.join(a.output_dir, "sample"),
                    output_name=a.output_name, epoch=epoch, step=None if epoch else self.global_step,
                    device=self.accelerator.device, dtype=self.weight_dtype, clip_skip=a.clip_skip,
                    eval_modules=[self.module], write=self.is_main)
        if self.is_main:
            self.events.sample(step=self.global_step, epoch=self.epoch, paths=paths,
                               prompts=[p.prompt for p in prompts])
            self.trackers.log_samples(paths, [p.prompt for p in prompts])
        self.accelerator.wait_for_everyone()

    def validate(self, kind: str) -> float:
        """The validation loss now (kind 'step' or 'epoch'): a `validation` event, and sd-scripts' TensorBoard tags
        loss/validation/{kind}_average and {kind}_divergence (validation minus the recent training loss; epoch tags
        at step = epoch, as sd-scripts logs them)."""
        from .optim import eval_weights

        with eval_weights(getattr(self, "optimizer", None)):  # a schedule-free optimizer's averaged weights
            loss = self.validation.loss_at(self.global_step, self.batch_loss, self.module, self.accelerator,
                                           split=not self.sharded.active)
        recent = sum(self.recent_losses) / len(self.recent_losses) if self.recent_losses else None
        divergence = loss - recent if recent is not None else None
        log.info("validation loss %.6g (%s %d)", loss, kind, self.global_step if kind == "step" else self.epoch)
        self.events.validation(kind=kind, step=self.global_step, epoch=self.epoch, loss=loss, divergence=divergence,
                               batches=self.validation.num_batches, timesteps=self.validation.timesteps)
        if self.trackers.active:
            scalars = {f"loss/validation/{kind}_average": loss}
            if divergence is not None:
                scalars[f"loss/validation/{kind}_divergence"] = divergence
            self.trackers.log(scalars, step=self.global_step if kind == "step" else self.epoch,
                              global_step=self.global_step, epoch=self.epoch)
        return loss

    def save_model(self, *, epoch: int | None = None, step: int | None = None, final: bool = False) -> None:
        """The model file (and state folder): with a schedule-free optimizer, its averaged (eval) weights, and the
        state in eval mode as sd-scripts saves it (resume switches back to train mode)."""
        from .optim import eval_weights

        with eval_weights(getattr(self, "optimizer", None)):
            self._save_model(epoch=epoch, step=step, final=final)

    def _save_model(self, *, epoch: int | None, step: int | None, final: bool) -> None:
        from .saving import atomic_write, model_file_name, prune_old_saves, state_dir_name

        a = self.args
        ext = self.method.file_extension()
        name = model_file_name(a.output_name, ext, epoch=None if final else epoch, step=None if final else step)
        path = os.path.join(a.output_dir, name)
        with self.sharded.full_weights(self.module):  # (every process takes part in gathering sharded weights)
            if self.is_main:
                self.method.save(self.module, path, dtype=self.save_dtype, metadata=self.metadata())
        if self.is_main:
            self.outputs.append(path)
            kind = "final" if final else ("epoch" if epoch else "step")
            self.events.emit("save", path=path, kind=kind, step=self.global_step, epoch=self.epoch)
            log.info("saved %s", path)
            self.hub.upload(path, wait=final)  # after the local file is complete; the final one is waited for
            prune_old_saves(a.output_dir, a.output_name, ext, keep_last_n_epochs=a.save_last_n_epochs,
                            current_epoch=epoch, keep_last_n_steps=a.save_last_n_steps, current_step=step,
                            include_states=False)
        if a.save_state or (final and a.save_state_on_train_end):
            state_dir = os.path.join(a.output_dir, state_dir_name(a.output_name, epoch=None if final else epoch,
                                                                  step=None if final else step))
            self.accelerator.save_state(state_dir)
            self.sharded.after_save_state(state_dir)
            if self.is_main:
                state = {"current_epoch": self.epoch, "current_step": self.global_step}
                atomic_write(os.path.join(state_dir, "train_state.json"), lambda temp: _write_json(temp, state))
                self.events.emit("save", path=state_dir, kind="state", step=self.global_step, epoch=self.epoch)
                if a.save_state_to_huggingface:
                    self.hub.upload(state_dir, wait=final)
                # state folders: their own counts, else the models' (sd-scripts' save_last_n_*_state)
                prune_old_saves(a.output_dir, a.output_name, ext, include_models=False,
                                keep_last_n_epochs=a.save_last_n_epochs_state or a.save_last_n_epochs,
                                current_epoch=epoch, current_step=step,
                                keep_last_n_steps=a.save_last_n_steps_state or a.save_last_n_steps)
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
        metadata = build_training_metadata(a, **kwargs)
        if hasattr(a, "validation_split"):  # the trainers with validation options (sd-scripts' train_network)
            metadata["ss_num_validation_images"] = str(len(self.validation.dataset.records) if self.validation else 0)
        metadata = self.family.adjust_metadata(self.method.metadata(metadata))
        return minimal_metadata(metadata) if a.no_metadata else metadata

    def save_final(self, status: str) -> None:
        if self.accelerator.num_processes > 1 and not self.sharded.active \
                and not parameters_agree(self.trained_params):
            self.warn("processes hold different trained weights: gradients were not averaged; the file saved "
                      "is the main process's")
        self.save_model(epoch=self.epoch, step=self.global_step, final=True)

    def finish(self, status: str) -> None:
        if getattr(self, "hub", None) is not None:
            self.hub.close()  # background uploads end before `done` (their failures are warnings before it)
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


def _write_json(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)
