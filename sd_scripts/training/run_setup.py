"""Setting a run up: accelerator, model, dataset, caches, the trained parameters, optimizer and schedule.

`RunSetup` holds the steps `Trainer.run()` calls before the first training step (training/loop.py); each is a
method with a name. What is trained comes from the method object, everything about the model from its family
(sd_scripts/families).
"""
from __future__ import annotations

import json
import logging
import os
import time

import torch

from ..errors import UserError
from ..options import OptionError
from .distributed import GradientAverager, broadcast_parameters
from .events import EventWriter
from .memory import MemoryFeatures
from .methods import compute_dtype
from .plan import Plan, plan_steps
from .validation import build_validation

log = logging.getLogger("sd_scripts.train")


def load_dtype(weight_dtype: torch.dtype, method, no_half_vae: bool = False) -> torch.dtype:
    """The dtype the weights are read in: the compute dtype when every part ends up in it (a frozen denoiser and
    text encoders under mixed precision, a VAE not kept in float32), so no float32 copy of a large model (48 GB for
    FLUX.1-dev) is ever made; float32 otherwise (trained weights, or a float32 VAE under fp16 / no_half_vae)."""
    if weight_dtype == torch.float32 or weight_dtype == torch.float16 or no_half_vae:
        return torch.float32
    if any(method.module_dtype(part, weight_dtype) != weight_dtype for part in ("denoiser", "text_encoder")):
        return torch.float32
    return weight_dtype


class RunSetup:
    """Set-up steps of a run (mixed into Trainer)."""

    def _check_args(self) -> None:
        a = self.args
        if not a.pretrained_model_name_or_path:
            raise OptionError("option 'pretrained_model_name_or_path' is required: give a .safetensors/.ckpt "
                              "checkpoint or a diffusers folder")
        if not a.output_dir:
            raise OptionError("option 'output_dir' is required: the folder where the trained model is written")
        if not (a.train_data_dir or a.dataset_config or getattr(a, "in_json", None)):
            raise OptionError("give 'train_data_dir' (parent of '<repeats>_<class>' folders), 'in_json' (a metadata "
                              "JSON of captions) or 'dataset_config'")
        from .saving import check_output_dir_writable

        check_output_dir_writable(a.output_dir)
        self._check_family()
        from .memory import check_options as check_memory_options
        from .te_cache import check_options as check_te_cache_options

        check_memory_options(a, trainer=getattr(a, "trainer_kind", None))
        from .fused_backward import check_fused_backward_options

        check_fused_backward_options(a)
        from .accelerator_setup import check_options as check_scaleout_options

        check_scaleout_options(a)

        check_te_cache_options(a, trains_text_encoder=self.method.trains_text_encoder, trainer=self.method.name,
                               caption_dropout=self._probed_te_cache_caption_dropout)
        from . import hub, trackers
        from .metadata import check_metadata_options

        self.option_warnings = trackers.check_options(a) + hub.check_options(a) + check_metadata_options(a)
        self._check_optimizer()
        if a.output_name is None:
            a.output_name = "last"
        if (a.color_aug or a.random_crop) and a.cache_latents:
            raise OptionError("options 'cache_latents' and 'color_aug'/'random_crop' exclude each other: latents of "
                              "augmented images change every epoch; turn one of them off")

    def _check_optimizer(self) -> None:
        """Before any weights are read: the optimizer and schedule exist, their libraries run on this machine and
        their arguments are accepted (training/optim)."""
        from .optim import check_optimizer_options

        check_optimizer_options(self.args)

    def _check_family(self) -> None:
        """Before any heavy work: the model's family (read torch-free from the file's header or the folder's
        configs) must be one this script trains, with options it can use (families.check_run)."""
        from ..errors import ModelLoadError
        from ..families import check_run, probe_model
        from ..options import BY_NAME

        a = self.args
        self._probed_te_cache_caption_dropout = False
        try:
            probe = probe_model(a.pretrained_model_name_or_path)
        except ModelLoadError:
            return  # the loader reports it with the whole story
        if probe.family is None:
            return
        from ..families import family_spec

        self._probed_te_cache_caption_dropout = family_spec(probe.family).te_cache_caption_dropout
        message = check_run(probe.family, trainer=getattr(a, "trainer_kind", None),
                            script=getattr(a, "trainer_script", None), values=vars(a),
                            defaults={name: o.default for name, o in BY_NAME.items()},
                            source=a.pretrained_model_name_or_path, variant=probe.variant)
        if message:
            raise OptionError(message)
        from ..families import family_spec

        if not family_spec(probe.family).lora_text_encoders and hasattr(a, "network_train_unet_only"):
            a.network_train_unet_only = True  # its LoRA never adapts the text encoders (frozen: memoised, cacheable)

    def _default_control_dir(self) -> str | None:
        return os.path.dirname(os.path.abspath(self.args.events_file)) if self.args.events_file else None

    def setup_accelerator(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        from .hub import HubUploader
        from .trackers import Trackers

        a = self.args
        self.trackers = Trackers(a)
        # `accelerate launch --multi_gpu --num_processes N` on a machine without GPUs: data parallel on the CPU
        # over gloo (accelerate only picks that up when told to use the CPU).
        cpu_ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
        from .accelerator_setup import accelerator_kwargs, check_distributed_type

        self.accelerator = Accelerator(gradient_accumulation_steps=a.gradient_accumulation_steps,
                                       mixed_precision=a.mixed_precision, log_with=self.trackers.log_with,
                                       project_config=self.trackers.project_config(), cpu=cpu_ddp,
                                       **accelerator_kwargs(a))
        check_distributed_type(self.accelerator, a)
        from .sharding import ShardedRun, check_sharded_run, sharding_kind

        self.sharded = ShardedRun(sharding_kind(self.accelerator), self.accelerator)
        if self.sharded.active:
            check_sharded_run(a, self.method)
        self.is_main = self.accelerator.is_main_process
        self.events = EventWriter(a.events_file, enabled=self.is_main)
        self.hub = HubUploader(a, warn=self.warn)
        for message in getattr(self, "option_warnings", []):
            self.warn(message)
        if a.seed is not None:
            set_seed(a.seed, device_specific=True)
        for old in ("xformers", "mem_eff_attn"):
            if getattr(a, old):
                self.warn(f"option '{old}' is not needed: PyTorch scaled-dot-product attention is always used")
        self.weight_dtype = compute_dtype(a.mixed_precision)
        self.save_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "float": torch.float32}.get(
            a.save_precision or "", None)

    def load_model(self) -> None:
        from ..families import family_class
        from ..models.loading import load_model

        a = self.args
        log.info("loading %s", a.pretrained_model_name_or_path)
        # FSDP keeps the weights it shards in float32 and casts them for compute (accelerate's mixed precision
        # policy); FSDP1 also needs one dtype per unit, where frozen and trained weights meet.
        fsdp = self.sharded.kind == "fsdp"
        dtype = torch.float32 if fsdp else load_dtype(self.weight_dtype, self.method,
                                                       bool(getattr(a, "no_half_vae", False)))
        bundle = load_model(a.pretrained_model_name_or_path, dtype=dtype, **self._load_options())
        self.method.prepare_model(bundle, family=bundle.family)  # e.g. base_weights merged, before any cast
        device = self.accelerator.device
        family_cls = family_class(bundle.family)
        # Frozen parts in the compute dtype; trained weights stay float32 (mixed precision autocasts).
        denoiser_dtype = torch.float32 if fsdp else self.method.module_dtype("denoiser", self.weight_dtype)
        text_encoder_dtype = torch.float32 if fsdp else self.method.module_dtype("text_encoder", self.weight_dtype)
        self.memory = MemoryFeatures.from_args(a)
        if self.memory.any:  # fp8 storage, block swap: checked on the CPU copy, then placed
            self.memory.place(bundle, family_cls, device, denoiser_dtype=denoiser_dtype,
                              text_encoder_dtype=text_encoder_dtype, compute_dtype=self.weight_dtype)
            if self.memory.blocks_to_swap and not a.gradient_checkpointing:
                self.warn("option 'blocks_to_swap' saves device memory only with gradient_checkpointing (without it "
                          "the autograd graph keeps every block's weights until the backward pass): add it")
        else:
            bundle.denoiser.to(device, dtype=denoiser_dtype)
            for text_encoder in bundle.text_encoders:
                text_encoder.to(device, dtype=text_encoder_dtype)
        # The VAE overflows in fp16 (the SDXL one in bf16 too, unless no_half_vae keeps it in float32)
        half_vae_ok = self.weight_dtype != torch.float16 and not getattr(a, "no_half_vae", False)
        bundle.vae.to(device, dtype=self.weight_dtype if half_vae_ok else torch.float32)
        if a.gradient_checkpointing:
            self.memory.enable_checkpointing(bundle.denoiser)
        self.bundle = bundle
        self.family = family_cls(bundle, a)
        self.spec = self.family.spec
        self.v_prediction = bundle.v_prediction

    def _load_options(self) -> dict:
        """The loading options of the command line: every option of the 'model' group a family may take."""
        from ..options import OPTIONS

        return {o.name: getattr(self.args, o.name) for o in OPTIONS
                if o.group == "model" and o.name != "pretrained_model_name_or_path" and hasattr(self.args, o.name)}

    def prepare_data(self) -> None:
        """The method's data preparation with the loaded model (DreamBooth class images), on the main process."""
        if self.is_main:
            self.method.prepare_data(self.bundle, device=self.accelerator.device, dtype=self.weight_dtype)
        self.accelerator.wait_for_everyone()

    def load_dataset(self) -> None:
        from ..data.dataset import TrainDataset
        from ..data.dataset_config import load_datasets

        a = self.args
        configs = load_datasets(a, bucket_step_default=self.spec.bucket_step)
        kwargs = dict(prior_loss_weight=a.prior_loss_weight, max_train_steps=a.max_train_steps,
                      bucket_step=self.spec.bucket_step)
        self.dataset = TrainDataset(configs, seed=a.seed or 0, **kwargs)
        self.summary = self.dataset.summary()
        if self.summary.num_train_images == 0:
            raise UserError(f"no training images found in {a.train_data_dir or a.dataset_config}")
        if getattr(self, "family", None) is not None:  # (debug_dataset lists the data without a model)
            self.family.use_resolutions([tuple(ds.resolution) for ds in configs])
        # held-out images (validation_split): the same seed picks the same images out of both datasets
        self.validation = build_validation(a, configs, seed=a.seed or 0, dataset_kwargs=kwargs,
                                           timestep_range=self._timestep_range(), warn=self.warn)
        if self.validation:
            log.info("validation: %d images, %d batches at timesteps %s", len(self.validation.dataset.records),
                     self.validation.num_batches, self.validation.timesteps)

    def _timestep_range(self) -> tuple[int, int]:
        """The family's training timestep range ((0, 1000) before a model is loaded, e.g. debug_dataset)."""
        family = getattr(self, "family", None)
        return family.timestep_range() if family is not None else (0, 1000)

    def datasets(self) -> list:
        """The training dataset, and the validation dataset when there is one."""
        return [self.dataset] + ([self.validation.dataset] if self.validation else [])

    def debug_dataset(self) -> str:
        """debug_dataset: one epoch of batches listed (printed, and written under <output_dir>/debug_dataset) with
        the bucket step of the model's family read from its header; no weights are loaded, nothing is trained."""
        from ..data.debug import list_batches
        from ..families import default_family, family_spec, probe_model

        family = probe_model(self.args.pretrained_model_name_or_path).family or default_family()
        self.spec = family_spec(family)
        self.load_dataset()
        out_dir = os.path.join(self.args.output_dir, "debug_dataset")
        list_batches(self.dataset, out_dir if self.is_main else None, echo=print if self.is_main else (lambda _: None))
        self.outputs = [os.path.join(out_dir, "debug_dataset.jsonl")] if self.is_main else []
        self.finish("completed")
        return "completed"

    def cache_latents(self) -> None:
        a = self.args
        if not a.cache_latents:
            return
        t0 = time.time()
        kwargs = dict(vae_id=self.bundle.vae_id, to_disk=a.cache_latents_to_disk, batch_size=a.vae_batch_size,
                      skip_check=a.skip_cache_check,
                      npz_suffix=self.family.latent_cache_suffix)
        for dataset in self.datasets():
            with torch.no_grad():
                if a.cache_latents_to_disk:  # the main process writes the files, the others read them
                    if self.is_main:
                        report = dataset.cache_latents(self.family.encode_images, is_main_process=True, **kwargs)
                    self.accelerator.wait_for_everyone()
                    if not self.is_main:
                        report = dataset.cache_latents(self.family.encode_images, is_main_process=False, **kwargs)
                else:
                    report = dataset.cache_latents(self.family.encode_images, is_main_process=self.is_main,
                                                   **kwargs)
            log.info("latents (%s): %d encoded, %d reused from disk in %.1f s", dataset.split, report.encoded,
                     report.reused, time.time() - t0)

    def cache_text_encoder_outputs(self) -> None:
        """cache_text_encoder_outputs[_to_disk]: every caption encoded once before training (te_cache.py)."""
        from .te_cache import cache_text_encoder_outputs

        for dataset in self.datasets():
            cache_text_encoder_outputs(self.family, dataset, self.args, self.accelerator)

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
        if not self.method.trains_text_encoder:
            fixed = [dataset.fixed_captions() for dataset in self.datasets()]
            captions = None if None in fixed else sorted({c for found in fixed for c in found})
            if captions is not None and self.family.release_text_encoders(captions):
                freed.append("text encoder")
        if freed:
            import gc

            gc.collect()
            log.info("released the %s: not needed for the rest of the run", " and ".join(freed))

    def create_optimizer(self) -> None:
        from .optim import create_optimizer, is_schedule_free, resolve_optimizer_type

        a = self.args
        opt_type = resolve_optimizer_type(a.optimizer_type, a.use_8bit_adam, a.use_lion_optimizer)
        self.optimizer = create_optimizer(opt_type, a.optimizer_args, self.param_groups, a.learning_rate,
                                          warn=self.warn)
        if is_schedule_free(self.optimizer) and (a.lr_scheduler != "constant" or a.lr_warmup_steps
                                                 or a.lr_scheduler_type):
            self.warn(f"{opt_type} is schedule-free: lr_scheduler, lr_warmup_steps and lr_scheduler_type are not "
                      f"used (as in sd-scripts); warm up with optimizer_args warmup_steps=N")
        from .fused_backward import FusedBackwardOptimizer, fused_backward_wanted

        if fused_backward_wanted(a):  # steps each parameter inside backward; step() is a no-op
            self.optimizer = FusedBackwardOptimizer(self.optimizer, max_grad_norm=a.max_grad_norm)

    def prepare(self) -> None:
        from .optim import scheduler_from_args

        a = self.args
        workers = 0 if a.cache_latents else min(a.max_data_loader_n_workers, os.cpu_count() or 1)
        loader = torch.utils.data.DataLoader(self.dataset, batch_size=1, shuffle=False, collate_fn=_first,
                                             num_workers=workers,
                                             persistent_workers=a.persistent_data_loader_workers and workers > 0)
        # The trained module is not wrapped in DDP: the U-Net is called directly, so gradients are averaged
        # across processes by training/distributed.py instead.
        self.module = self.method.trainable_module()
        self.trained_params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        from .accelerator_setup import compile_denoiser, uses_deepspeed

        self.deepspeed = uses_deepspeed(self.accelerator)
        if self.sharded.active:  # FSDP / ZeRO-3: the denoiser, trained text encoders and trained module as one
            from .sharding import ShardedModel

            broadcast_parameters(self.trained_params)
            encoders = list(self.bundle.text_encoders) if self.method.trains_text_encoder else []
            wrapper = ShardedModel(self.bundle.denoiser, encoders, self.module)
            self.optimizer, self.loader = self.sharded.prepare(wrapper, self.optimizer, loader)
            if self.sharded.kind == "fsdp":  # (FSDP2 swaps in sharded parameters)
                self.trained_params = self.sharded.trained_parameters(self.optimizer)
        elif self.deepspeed:  # the engine owns the trained module: it averages, clips and steps (ZeRO sharding)
            self.engine, self.optimizer, self.loader = self.accelerator.prepare(self.module, self.optimizer, loader)
        else:
            broadcast_parameters(self.trained_params)
            self.optimizer, self.loader = self.accelerator.prepare(self.optimizer, loader)
        if self.deepspeed:
            e = self.sharded.model if self.sharded.active else self.engine
            log.info("DeepSpeed engine: ZeRO stage %d, micro batch %d, gradient accumulation %d, clipping %s",
                     e.zero_optimization_stage(), e.train_micro_batch_size_per_gpu(),
                     e.gradient_accumulation_steps(), e.gradient_clipping())
        self.gradients = GradientAverager(self.trained_params, self.accelerator.ddp_handler)
        compile_denoiser(self.accelerator, self.bundle.denoiser)
        self.plan = self._plan(len(self.loader))
        if a.save_n_epoch_ratio:  # about N saves over the run, whatever its length
            from .saving import epochs_between_saves

            a.save_every_n_epochs = epochs_between_saves(a.save_n_epoch_ratio, self.plan.total_epochs)
        self.lr_scheduler = scheduler_from_args(a, self.optimizer, self.plan.total_steps)
        self.accelerator.register_for_checkpointing(self.lr_scheduler)
        # The trained weights live outside accelerate.prepare: register them so save_state/resume keep them.
        if not self.deepspeed and not self.sharded.active:  # (a DeepSpeed engine / FSDP saves its module itself)
            self.accelerator.register_for_checkpointing(self.module)
        # Noise and timesteps come from their own generator, saved with the state: a resumed run draws what the
        # uninterrupted run would have drawn (data loader iterators also consume the global RNG).
        seed = a.seed if a.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
        self.noise_rng = NoiseRNG(self.accelerator.device, seed + self.accelerator.process_index)
        self.accelerator.register_for_checkpointing(self.noise_rng)
        self.trackers.start(self.accelerator)

    def _plan(self, batches_per_epoch: int) -> Plan:
        a = self.args
        return plan_steps(batches_per_epoch, a.gradient_accumulation_steps, a.max_train_steps, a.max_train_epochs)

    def resume_state(self) -> None:
        """Where the run starts: a resumed state's step (exactly: the batches it trained are skipped), or
        initial_step / initial_epoch (sd-scripts' meaning; the batches before it are skipped only with
        skip_until_initial_step, and without resume the learning-rate schedule starts at its beginning)."""
        a = self.args
        self.first_epoch = 0
        self.resume_skip_batches = 0
        from_state = self._load_resumed_state() if a.resume else None
        start = initial_step_of(a, self.plan.steps_per_epoch)
        skip = True
        if start is None:
            start = from_state or 0
        else:
            skip = bool(getattr(a, "skip_until_initial_step", False))
            if from_state is not None:
                self.warn(f"the resumed state's step {from_state} is replaced by initial_step/initial_epoch "
                          f"(step {start})")
            elif start and skip:
                log.info("initial step %d without resume: the learning-rate schedule starts at its beginning", start)
        if start >= self.plan.total_steps and start > 0:
            raise OptionError(f"the run would start at step {start}, but it has only {self.plan.total_steps} steps: "
                              "lower initial_step/initial_epoch or raise max_train_steps/max_train_epochs")
        self.global_step = start
        self.first_epoch = start // self.plan.steps_per_epoch
        if skip:
            done_in_epoch = start - self.first_epoch * self.plan.steps_per_epoch
            self.resume_skip_batches = done_in_epoch * a.gradient_accumulation_steps
        if start:
            log.info("starting at step %d (epoch %d, %d batches of it skipped)", self.global_step,
                     self.first_epoch + 1, self.resume_skip_batches)

    def _load_resumed_state(self) -> int:
        """Load the `resume` state folder; the step it was saved at."""
        a = self.args
        resume_dir = a.resume
        if a.resume_from_huggingface:  # every process downloads (to its own folder: no race on the files)
            from .hub import download_state

            resume_dir = download_state(a, os.path.join(a.output_dir, "hub_resume",
                                                        f"process{self.accelerator.process_index}"))
        state_file = os.path.join(resume_dir, "train_state.json")
        if not os.path.isfile(state_file):
            raise UserError(f"resume folder {a.resume!r} has no train_state.json: give a '<name>-state' folder "
                            "written with save_state")
        self.sharded.before_load_state(self.optimizer, self.trained_params)
        self.accelerator.load_state(resume_dir)
        from .optim import set_train_mode

        set_train_mode(self.optimizer)  # a schedule-free optimizer's state was saved with the averaged weights
        with open(state_file, encoding="utf-8") as f:
            state = json.load(f)
        log.info("resumed from %s (step %d)", a.resume, int(state["current_step"]))
        return int(state["current_step"])


def initial_step_of(args, steps_per_epoch: int) -> int | None:
    """initial_step, else the first step of initial_epoch (1-based), else None (sd-scripts' rule)."""
    if getattr(args, "initial_step", None) is not None:
        return int(args.initial_step)
    if getattr(args, "initial_epoch", None) is not None:
        return (int(args.initial_epoch) - 1) * steps_per_epoch
    return None


class NoiseRNG:
    """A torch.Generator on the training device with the state_dict interface accelerate checkpoints.

    accelerate writes a registered object's state from the main process only, and every process loads that file:
    so the state holds every process's generator (each draws its own noise), and each process takes its own back."""

    def __init__(self, device, seed: int):
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def state_dict(self) -> dict:
        import torch.distributed as dist

        state = self.generator.get_state()
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return {"state": state}
        states: list = [None] * dist.get_world_size()
        dist.all_gather_object(states, state)  # (every process saves its state: a collective)
        return {"state": state, "process_states": states}

    def load_state_dict(self, state: dict) -> None:
        import torch.distributed as dist

        states = state.get("process_states")
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        if states and len(states) == (dist.get_world_size() if dist.is_initialized() else 1):
            self.generator.set_state(states[rank])
        else:  # a state saved with another number of processes (or before this was kept): the main one's
            self.generator.set_state(state["state"])


def _first(items):
    return items[0]
