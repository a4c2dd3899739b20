"""Checks before launch, each a clear message naming the field: what kohya_ss leaves to fail mid-run.

Trainer importable from the job's python, paths exist, output folders writable (created), the '<repeats>_<tokens>'
folder rule with image counts and steps, GPUs vs num_processes, mixed precision vs GPU, a rough memory estimate,
options that do not apply to the model family, and the command itself (field errors from command.py).
Torch-free: GPUs come from `nvidia-smi` (argument list, timeout); the trainer check runs `find_spec` in a subprocess.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Callable

import psutil

from sd_scripts import options as schema
from sd_scripts.data.folders import scan_concept_folders  # the trainer's own folder rule
from sd_scripts.data.images import list_images
from sd_scripts.errors import DatasetError
from sd_scripts.families import check_run, family_of_path, family_spec, guess_family, variant_of_path
from sd_scripts.training.optim.registry import state_bytes_per_param
from sd_scripts.training.plan import batches_per_process, plan_steps

from .command import (KIND_TO_TRAINER, AccelerateSettings, CommandError, TRAINER_MODULES, normalize_values,
                      trainer_for, trainer_module)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: minimum CUDA compute capability per mixed precision mode
PRECISION_MIN_CC = {"fp16": 7.0, "bf16": 8.0, "fp8": 9.0}


@dataclass
class Check:
    """One pre-flight finding. level: 'error' (launch refused), 'warning' or 'info'."""

    level: str
    field: str
    message: str


@dataclass
class GpuInfo:
    """One GPU as nvidia-smi reports it (memory in MiB)."""

    index: int
    name: str
    compute_cap: float | None
    memory_total_mb: float | None
    memory_free_mb: float | None


# ------------------------------------------------------------------ GPUs

def parse_nvidia_smi(text: str) -> list[GpuInfo]:
    """Parse `nvidia-smi --query-gpu=name,compute_cap,memory.total,memory.free --format=csv[,noheader,nounits]`."""
    gpus = []
    for line in text.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 4 or parts[0].lower() == "name":
            continue

        def number(text: str) -> float | None:
            try:
                return float(text.split()[0])
            except (ValueError, IndexError):
                return None

        gpus.append(GpuInfo(len(gpus), parts[0], number(parts[1]), number(parts[2]), number(parts[3])))
    return gpus


def probe_gpus(timeout: float = 10.0) -> list[GpuInfo]:
    """The machine's NVIDIA GPUs via nvidia-smi; [] when it is absent or fails (= CPU)."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        out = subprocess.run([exe, "--query-gpu=name,compute_cap,memory.total,memory.free", "--format=csv"],
                             capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return parse_nvidia_smi(out.stdout) if out.returncode == 0 else []


def _selected(gpus: list[GpuInfo], gpu_ids: str | None) -> list[GpuInfo]:
    if not gpu_ids or str(gpu_ids).strip().lower() == "all":
        return gpus
    wanted = {int(x) for x in str(gpu_ids).replace(" ", "").split(",") if x.isdigit()}
    return [g for g in gpus if g.index in wanted]


# ------------------------------------------------------------------ model family

def detect_family(model_path: str | None) -> str | None:
    """The model family of a .safetensors file or diffusers folder (the trainers' own torch-free detection,
    sd_scripts.families); None when unknown."""
    return family_of_path(model_path)


# ------------------------------------------------------------------ dataset

def scan_concepts(parent: str, option: str, caption_extension: str, checks: list[Check]) -> dict[str, tuple[int, int]]:
    """{concept folder: (images, repeats)} of a kohya-convention parent folder, by the trainer's own scan
    (sd_scripts.data.folders): its errors and warnings become checks, plus a note on images without captions."""
    warnings: list[str] = []
    try:
        subsets = scan_concept_folders(parent, is_reg=option == "reg_data_dir", caption_extension=caption_extension,
                                       warnings=warnings)
    except DatasetError as e:
        checks.extend(Check("warning", option, message) for message in warnings)
        checks.append(Check("error", option, str(e)))
        return {}
    checks.extend(Check("warning", option, message) for message in warnings)
    concepts: dict[str, tuple[int, int]] = {}
    for subset in subsets:
        images = list_images(subset.image_dir)
        entry = os.path.basename(subset.image_dir)
        missing = sum(1 for n in images if not os.path.exists(os.path.splitext(n)[0] + caption_extension))
        if missing:
            checks.append(Check("info", "caption_extension",
                                f"{missing} of {len(images)} images in '{entry}' have no '{caption_extension}' "
                                f"caption: their folder's class tokens '{subset.class_tokens}' are used"))
        concepts[entry] = (len(images), subset.num_repeats)
    return concepts


def steps_plan(train_images: int, reg_images: int, batch_size: int, num_processes: int, grad_accum: int,
               max_train_steps: int | None, max_train_epochs: int | None) -> tuple[int, int, int]:
    """(steps_per_epoch, total_steps, epochs), by the trainer's own arithmetic (sd_scripts.training.plan).
    Regularisation doubles an epoch (one reg draw per train draw)."""
    draws = train_images * (2 if reg_images else 1)
    plan = plan_steps(batches_per_process(draws, batch_size, num_processes), grad_accum, max_train_steps,
                      max_train_epochs)
    return plan.steps_per_epoch, plan.total_steps, plan.total_epochs


# ------------------------------------------------------------------ memory

def estimate_memory_gb(trainer: str, family: str, values: dict[str, Any]) -> float:
    """A rough peak-memory estimate in GB (+-50%): weights, optimizer state for full training, activations."""
    spec = family_spec(family)
    memory, native = spec.memory, spec.default_resolution_for(bool(values.get("v_parameterization")))
    w, h = schema.parse_resolution(values.get("resolution") or str(native))
    fp32 = values.get("mixed_precision", "no") == "no"
    area = (w * h) / (native ** 2)
    act = memory.activations_gb * area * int(values.get("train_batch_size") or 1) * (2 if fp32 else 1)
    if values.get("gradient_checkpointing"):
        act *= 0.3
    weights = memory.weights_gb * (2 if fp32 else 1)
    if trainer in ("db", "finetune"):
        state = state_bytes_per_param(values.get("optimizer_type"), bool(values.get("use_8bit_adam")),
                                      bool(values.get("use_lion_optimizer")))
        per_param = 2 + (2 if values.get("full_fp16") or values.get("full_bf16") else 4) + state
        weights = memory.weights_gb * 0.3 + memory.trainable_b * per_param
    return round(weights + act + 0.6, 1)  # + CUDA context and allocator slack


# ------------------------------------------------------------------ checks

def python_problem(python: str) -> str | None:
    """Why the configured interpreter cannot run jobs (missing, a folder, not executable), or None."""
    if not python:
        return "no Python interpreter is configured; set [gui] python in config.toml or leave it empty"
    if not os.path.isabs(python):
        found = shutil.which(python)
        if not found:
            return f"cannot run the job Python {python!r}: it is not found on PATH; fix [gui] python in config.toml"
        python = found
    if not os.path.isfile(python):
        return f"cannot run the job Python {python!r}: it does not exist; fix [gui] python in config.toml"
    if not os.access(python, os.X_OK):
        return f"cannot run the job Python {python!r}: it is not executable; fix [gui] python in config.toml"
    return None


def trainer_importable(trainer: str, python: str = sys.executable, timeout: float = 30.0) -> str | None:
    """None when `python` can find the trainer module and accelerate (find_spec, torch not imported); else why."""
    module = TRAINER_MODULES[trainer]
    code = ("import importlib.util, sys\n"
            f"missing = [m for m in ({module!r}, 'accelerate') if importlib.util.find_spec(m) is None]\n"
            "print(','.join(missing)); sys.exit(3 if missing else 0)")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH", "")) if p)
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT,
                             env=env)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"cannot run {python!r}: {e}"
    if out.returncode == 0:
        return None
    if out.returncode == 3:
        return f"{python} cannot import {out.stdout.strip()}: run setup_env.sh (or pip install -e .) in that environment"
    return f"{python} failed to check the trainer: {(out.stderr or out.stdout).strip().splitlines()[-1:]}"


def _writable_dir(path: str) -> str | None:
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as e:
        return f"{path} cannot be created or written ({e.strerror or e}): choose a folder you can write to"
    return None


def _check_paths(trainer: str, values: dict[str, Any], checks: list[Check]) -> None:
    for opt in schema.options_for(trainer):
        value = values.get(opt.name)
        if not opt.path or value in (None, "") or opt.name in ("events_file", "control_dir", "sample_prompts"):
            continue
        if opt.name == "resume" and values.get("resume_from_huggingface"):
            continue  # a state folder on the Hub ('user/repo/path'), downloaded at run time
        if opt.path in ("out_dir",):
            problem = _writable_dir(value)
            if problem:
                checks.append(Check("error", opt.name, problem))
        elif opt.path == "file" and opt.nargs:  # a list of files (base_weights)
            items = value.split() if isinstance(value, str) else value
            checks.extend(Check("error", opt.name, f"file {item} does not exist") for item in items
                          if not os.path.isfile(item))
        elif opt.path == "file" and not os.path.isfile(value):
            checks.append(Check("error", opt.name, f"file {value} does not exist"))
        elif opt.path == "dir" and not os.path.isdir(value):
            checks.append(Check("error", opt.name, f"folder {value} does not exist"))
        elif opt.path == "file_or_dir" and not os.path.exists(value):
            hub_like = value.count("/") == 1 and not value.startswith((".", "/")) and not os.path.splitext(value)[1]
            level = "warning" if hub_like else "error"
            hint = " (a hub id needs network access at run time)" if hub_like else ""
            checks.append(Check(level, opt.name, f"{value} does not exist{hint}"))
    if not values.get("pretrained_model_name_or_path"):
        checks.append(Check("error", "pretrained_model_name_or_path", "choose a base model (.safetensors/.ckpt file "
                                                                      "or diffusers folder)"))
    if not values.get("output_dir"):
        checks.append(Check("error", "output_dir", "choose an output folder for the trained model"))
    name = values.get("output_name") or ""
    if any(c in name for c in "/\\") or name in (".", ".."):
        checks.append(Check("error", "output_name", "is a file name, not a path: remove / and \\"))


def _finetune_images(train_dir: str, in_json: str | None) -> int:
    """Images fine-tuning will use: those of the folder listed in the metadata JSON (all of them without one)."""
    files = list_images(train_dir)
    if not in_json or not os.path.isfile(in_json):
        return len(files)
    try:
        with open(in_json, encoding="utf-8") as f:
            keys = set(json.load(f))
    except (OSError, ValueError):
        return len(files)
    listed = 0
    for path in files:
        full = os.path.join(train_dir, path) if not os.path.isabs(path) else path
        stem = os.path.splitext(os.path.basename(full))[0]
        if {stem, full, os.path.splitext(full)[0], os.path.basename(full)} & keys:
            listed += 1
    return listed


def _check_dataset(trainer: str, values: dict[str, Any], accel: AccelerateSettings, checks: list[Check]) -> None:
    train_dir = values.get("train_data_dir")
    if values.get("dataset_config"):
        checks.append(Check("info", "dataset_config", "images and repeats come from the dataset config"))
        return
    if not train_dir:
        checks.append(Check("error", "train_data_dir", "choose the image folder (or a dataset config)"))
        return
    if not os.path.isdir(train_dir):
        return  # reported by the path checks
    ext = values.get("caption_extension") or ".caption"
    if trainer == "finetune":
        images = _finetune_images(train_dir, values.get("in_json"))
        if not images:
            checks.append(Check("error", "train_data_dir", f"{train_dir} has no images for fine-tuning"
                                + (" listed in in_json" if values.get("in_json") else "")))
            return
        repeats = int(values.get("dataset_repeats") or 1)
        train_total, reg_total = images * repeats, 0
        checks.append(Check("info", "train_data_dir", f"{images} images x {repeats} repeats = {train_total} image "
                                                      f"draws per epoch"))
    else:
        concepts = scan_concepts(train_dir, "train_data_dir", ext, checks)
        if not concepts:
            return
        train_total = sum(n * r for n, r in concepts.values())
        detail = ", ".join(f"'{k}': {n} images x {r}" for k, (n, r) in concepts.items())
        checks.append(Check("info", "train_data_dir", f"{detail} = {train_total} image draws per epoch"))
        reg_total = 0
        reg_dir = values.get("reg_data_dir")
        if reg_dir and os.path.isdir(reg_dir):
            reg = scan_concepts(reg_dir, "reg_data_dir", ext, checks)
            reg_total = sum(n * r for n, r in reg.values())
            if reg:
                checks.append(Check("info", "reg_data_dir", f"{sum(n for n, _ in reg.values())} regularisation images"
                                                            f" (one per training image draw)"))
    per_epoch, total, epochs = steps_plan(train_total, reg_total, int(values.get("train_batch_size") or 1),
                                          accel.num_processes, int(values.get("gradient_accumulation_steps") or 1),
                                          values.get("max_train_steps"), values.get("max_train_epochs"))
    checks.append(Check("info", "max_train_steps", f"{per_epoch} steps per epoch; {total} steps in total "
                                                   f"({epochs} epochs)"))


def _check_hardware(trainer: str, family: str, values: dict[str, Any], accel: AccelerateSettings,
                    gpus: list[GpuInfo], checks: list[Check]) -> None:
    precision = accel.mixed_precision or values.get("mixed_precision") or "no"
    selected = [] if accel.cpu else _selected(gpus, accel.gpu_ids)
    need = math.ceil(accel.num_processes / max(1, accel.num_machines))  # processes on this machine
    if not selected:
        checks.append(Check("info", "accelerate.num_processes", "no NVIDIA GPU found: training runs on the CPU "
                                                                "(fine for the tiny demo model, very slow otherwise)"))
        if accel.num_processes > 1:
            checks.append(Check("info", "accelerate.num_processes", f"{accel.num_processes} processes share the CPU "
                                                                    f"(data parallel over gloo): slower than 1 unless "
                                                                    f"the machine has many cores"))
        if precision == "fp16":
            checks.append(Check("error", "mixed_precision", "fp16 needs a GPU: on the CPU choose 'no' (fp32), which "
                                                            "works, or bf16 (works but slow)"))
        elif precision == "bf16":
            checks.append(Check("warning", "mixed_precision", "bf16 on the CPU works but is slow; 'no' (fp32) works "
                                                              "everywhere"))
        else:
            checks.append(Check("info", "mixed_precision", "'no' (fp32) works on the CPU"))
        limit_gb = psutil.virtual_memory().available / 1024 ** 3
        where = "available RAM"
    else:
        names = ", ".join(f"{g.index}: {g.name}" for g in selected)
        checks.append(Check("info", "accelerate.gpu_ids", f"GPUs: {names}"))
        if need > len(selected):
            checks.append(Check("error", "accelerate.num_processes", f"{need} processes on this machine need {need} "
                                                                     f"GPUs; {len(selected)} selected/found"))
        if accel.num_processes > 1 and not accel.multi_gpu and not accel.config_file:
            checks.append(Check("warning", "accelerate.multi_gpu", "several processes: turn on multi_gpu"))
        caps = [g.compute_cap for g in selected if g.compute_cap is not None]
        low = min(caps) if caps else None
        needed = PRECISION_MIN_CC.get(precision)
        if needed and low is not None and low < needed:
            level = "warning" if precision == "fp16" else "error"
            checks.append(Check(level, "mixed_precision", f"{precision} needs compute capability {needed}+; the "
                                                          f"GPU has {low}: choose "
                                                          f"{'fp16' if low >= 7.0 else 'no'} instead"))
        frees = [g.memory_free_mb for g in selected if g.memory_free_mb is not None]
        limit_gb = min(frees) / 1024 if frees else None
        where = "free GPU memory"
    for flag, mode in (("full_fp16", "fp16"), ("full_bf16", "bf16")):
        if values.get(flag) and precision != mode:
            checks.append(Check("error", flag, f"{flag} needs mixed_precision {mode}"))
    estimate = estimate_memory_gb(trainer, family, values)
    checks.append(Check("info", "train_batch_size", f"rough memory estimate: {estimate} GB"))
    if limit_gb is not None and estimate > limit_gb:
        checks.append(Check("warning", "train_batch_size",
                            f"the run may need about {estimate} GB but only {limit_gb:.1f} GB {where}: lower the "
                            f"batch size or resolution, turn on gradient_checkpointing and cache_latents, or use "
                            f"AdamW8bit"))


def _check_family(trainer: str, family: str, values: dict[str, Any], checks: list[Check],
                  skip: set[str] = frozenset()) -> None:
    for opt in schema.options_for(trainer):
        value = values.get(opt.name)
        if value not in (None, opt.default, False, "") and family not in opt.families and opt.name not in skip:
            checks.append(Check("warning", opt.name, f"applies to {', '.join(sorted(opt.families))} models only; "
                                                     f"it has no effect on this {family} model: clear it"))
    res = values.get("resolution")
    native = family_spec(family).default_resolution_for(bool(values.get("v_parameterization")))
    try:
        w, h = schema.parse_resolution(res or "512")
    except ValueError:
        return
    if max(w, h) < native // 2 or max(w, h) > native * 2:
        checks.append(Check("warning", "resolution", f"{w}x{h} is far from the {family} model's native {native} px"))


def _check_family_run(kind: str, trainer: str, family: str, values: dict[str, Any], checks: list[Check]) -> set[str]:
    """The trainer's own refusals, before launch (sd_scripts.families.check_run, torch-free): a kind of training the
    family does not have (FamilySpec.trainers), an option the family refuses, another family's option on a strict
    family. Returns the option names reported."""
    spec = family_spec(family)
    if trainer not in spec.trainers:
        kinds = [k for k, t in KIND_TO_TRAINER.items() if t in spec.trainers]
        checks.append(Check("error", "model_family", f"{spec.label} models cannot be trained with {kind}: use the "
                                                     f"{' or '.join(kinds) or 'other'} tab, or choose another model"))
        return set()
    script = trainer_module(trainer, family).rsplit(".", 1)[-1]
    problem = check_run(family, trainer=trainer, script=script, values=values, defaults=schema.defaults(trainer),
                        variant=variant_of_path(values.get("pretrained_model_name_or_path")))
    if not problem:
        return set()
    option = re.search(r"option '(\w+)'", problem)
    field = option.group(1) if option else "pretrained_model_name_or_path"
    checks.append(Check("error", field, problem))
    return {field}


def _check_accelerate_config(accel: AccelerateSettings, checks: list[Check]) -> str | None:
    """accelerate.config_file: an existing YAML/JSON file (`accelerate config` writes one). Returns the field that
    asks for FSDP (the config's distributed_type, or --use_fsdp), which needs GPUs (checked with them)."""
    fsdp_field = "accelerate.extra_args" if "--use_fsdp" in (accel.extra_args or []) else None
    path = accel.config_file
    if not path:
        return fsdp_field
    if not os.path.isfile(path):
        checks.append(Check("error", "accelerate.config_file", f"file {path} does not exist"))
        return fsdp_field
    if not path.lower().endswith((".yaml", ".yml", ".json")):
        checks.append(Check("error", "accelerate.config_file", "must be an accelerate config (.yaml, .yml or "
                                                               ".json, as `accelerate config` writes)"))
        return fsdp_field
    import yaml  # JSON is YAML too

    try:
        with open(path, encoding="utf-8") as f:
            config = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        checks.append(Check("error", "accelerate.config_file", f"{path} cannot be read as YAML/JSON: {e}"))
        return fsdp_field
    if not isinstance(config, dict):
        checks.append(Check("error", "accelerate.config_file", f"{path} is not an accelerate config (no settings)"))
    elif str(config.get("distributed_type", "")).upper() == "FSDP":
        fsdp_field = "accelerate.config_file"
    elif str(config.get("distributed_type", "")).upper() == "DEEPSPEED":
        checks.append(Check("info", "accelerate.config_file", "DeepSpeed from the accelerate config: ZeRO stage 3 "
                                                              "shards the denoiser and the trained weights; "
                                                              "zero3_init_flag is refused by the trainers"))
    return fsdp_field


def _check_fsdp(field: str | None, accel: AccelerateSettings, gpus: list[GpuInfo], checks: list[Check]) -> None:
    """FSDP needs GPUs (the reason comes from the trainers: without them accelerate runs it as data parallel)."""
    from sd_scripts.training.accelerator_setup import FSDP_ON_CPU

    if field is None:
        return
    if accel.cpu or not _selected(gpus, accel.gpu_ids):
        checks.append(Check("error", field, FSDP_ON_CPU))
    else:
        checks.append(Check("info", field, "FSDP: the denoiser, trained text encoders and trained weights are "
                                           "sharded over the processes; model files are saved with full weights"))


def run_preflight(kind: str, values: dict[str, Any], accel: AccelerateSettings | None = None,
                  gpu_probe: Callable[[], list[GpuInfo]] | None = None, python: str = sys.executable,
                  family: str | None = None, check_trainer: bool = True) -> list[Check]:
    """All checks for launching `kind` with `values`. Errors mean: do not launch. Creates output/logging folders.

    gpu_probe returns the GPUs (default: nvidia-smi); family overrides detection from the model file.
    """
    accel = accel or AccelerateSettings()
    checks: list[Check] = []
    try:
        trainer = trainer_for(kind)
    except CommandError as e:
        return [Check("error", e.field, str(e))]
    try:
        merged = dict(values)
        if accel.mixed_precision:
            merged["mixed_precision"] = accel.mixed_precision
        norm = normalize_values(kind, merged)
    except CommandError as e:
        return [Check("error", e.field, str(e))]
    fsdp_field = _check_accelerate_config(accel, checks)
    if accel.extra_args:
        checks.append(Check("warning", "accelerate.extra_args",
                            f"extra `accelerate launch` arguments (from the form, a preset or an imported config): "
                            f"{' '.join(accel.extra_args)}; check that you want them"))
    if check_trainer:
        problem = python_problem(python) or trainer_importable(trainer, python)
        if problem:
            checks.append(Check("error", "trainer", problem))
    _check_paths(trainer, norm, checks)
    _check_dataset(trainer, norm, accel, checks)
    detected = detect_family(norm.get("pretrained_model_name_or_path"))
    fam = family or detected
    if fam is None:
        fam = guess_family(norm)
        checks.append(Check("info", "pretrained_model_name_or_path",
                            f"model family not detected; assuming {family_spec(fam).label}"))
    else:
        checks.append(Check("info", "pretrained_model_name_or_path", f"model family: {fam}"))
    spec = family_spec(fam)
    if norm.get("v_parameterization") and not norm.get("v2") and spec.supports_v_prediction:
        checks.append(Check("info", "v2", f"v_parameterization is for {spec.label}: v2 is implied"))
    refused = _check_family_run(kind, trainer, fam, norm, checks)
    _check_family(trainer, fam, norm, checks, skip=refused)
    gpus = (gpu_probe or probe_gpus)()
    _check_hardware(trainer, fam, norm, accel, gpus, checks)
    _check_fsdp(fsdp_field, accel, gpus, checks)
    sampling = norm.get("sample_every_n_steps") or norm.get("sample_every_n_epochs") or norm.get("sample_at_first")
    if sampling and not (values.get("sample_prompts_text") or "").strip() and not norm.get("sample_prompts"):
        checks.append(Check("warning", "sample_prompts_text", "samples are scheduled but there are no prompts"))
    return checks


def has_errors(checks: list[Check]) -> bool:
    """True when any check is an error (the GUI refuses to launch)."""
    return any(c.level == "error" for c in checks)
