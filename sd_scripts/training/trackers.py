"""Experiment trackers (TensorBoard, Weights & Biases) through accelerate, set up with sd-scripts' options.

- `log_with`: tensorboard | wandb | all; unset means tensorboard when `logging_dir` is given, else none.
- The run folder is `<logging_dir>/<log_prefix><YYYYmmddHHMMSS>`; TensorBoard writes under `<run folder>/<project>`,
  wandb keeps its files in the run folder (without logging_dir: wandb's default, ./wandb).
- `log_tracker_name` is the project (default after the trainer, as sd-scripts: network_train, dreambooth,
  finetuning, textual_inversion); `wandb_run_name` the wandb run's name.
- `log_tracker_config`: a TOML file, one table per tracker, passed to that tracker's init (e.g. [wandb] entity,
  tags, notes; [tensorboard] flush_secs, filename_suffix). Its values win over wandb_run_name.
- `log_config`: the run's options go to the trackers (secrets never; paths as file names only).
- `wandb_api_key` never travels on: it is exported as WANDB_API_KEY for wandb (training/entry.py), not passed to
  wandb.login (which would store it in ~/.netrc).

Scalars: TensorBoard gets them at their step; wandb gets `global_step` and `epoch` as fields of each record (its own
step only grows, so epoch scalars logged at step=epoch would be dropped), as sd-scripts logs them. The event stream
(training/events.py) is written by the loop independently of any tracker.
"""
from __future__ import annotations

import argparse
import logging
import os
import time
from typing import Any

from .. import options as option_schema
from ..options import OptionError

log = logging.getLogger("sd_scripts.train")

#: Project name per trainer when log_tracker_name is not given (sd-scripts' defaults).
DEFAULT_PROJECT = {"network": "network_train", "db": "dreambooth", "finetune": "finetuning",
                   "ti": "textual_inversion"}
TRACKERS_OF = {None: (), "tensorboard": ("tensorboard",), "wandb": ("wandb",), "all": ("tensorboard", "wandb")}


def tracker_names(args: argparse.Namespace) -> tuple[str, ...]:
    log_with = getattr(args, "log_with", None)
    if log_with is None and getattr(args, "logging_dir", None):
        log_with = "tensorboard"
    return TRACKERS_OF[log_with]


def read_tracker_config(path: str, names: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """log_tracker_config's TOML -> {tracker: init kwargs}; errors name the option and the file."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    where = f"option 'log_tracker_config': {path!r}"
    if not os.path.isfile(path):
        raise OptionError(f"{where} does not exist: give the TOML file of the trackers' settings")
    try:
        data = option_schema.read_toml(path)
    except OptionError as e:
        raise OptionError(f"{where}: {e}") from None
    for key, value in data.items():
        if not isinstance(value, dict):
            raise OptionError(f"{where}: '{key}' must be a table of one tracker's settings, e.g. [wandb] with "
                              "entity = \"...\"")
        if key not in LOGGER_TYPE_TO_CLASS:
            raise OptionError(f"{where}: [{key}] is not a tracker; use tables named after trackers "
                              f"({', '.join(names or ('tensorboard', 'wandb'))})")
    return data


def check_options(args: argparse.Namespace) -> list[str]:
    """Before any heavy work: errors (OptionError) for options that cannot work; returns warnings."""
    names = tracker_names(args)
    warnings = []
    if "wandb" in names:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise OptionError("option 'log_with' needs wandb, which is not installed: pip install wandb") from None
    if getattr(args, "log_tracker_config", None):
        unused = sorted(set(read_tracker_config(args.log_tracker_config, names)) - set(names))
        if unused:
            warnings.append(f"option 'log_tracker_config': [{', '.join(unused)}] not used: log_with is "
                            f"{args.log_with or ('tensorboard' if names else 'unset')}")
    if not names:
        for name in ("log_tracker_name", "log_tracker_config", "log_config", "wandb_run_name"):
            if getattr(args, name, None):
                warnings.append(f"option '{name}' has no effect without a tracker: set logging_dir and/or log_with")
    elif getattr(args, "wandb_run_name", None) and "wandb" not in names:
        warnings.append("option 'wandb_run_name' has no effect unless log_with is wandb or all")
    return warnings


def loggable_config(args: argparse.Namespace) -> dict[str, Any]:
    """log_config: every option of the run as a tracker-friendly value; secrets left out, paths as file names."""
    trainer = getattr(args, "trainer_kind", None)
    out: dict[str, Any] = {}
    for opt in option_schema.options_for(trainer):
        if opt.secret or not hasattr(args, opt.name):
            continue
        value = getattr(args, opt.name)
        if opt.path and isinstance(value, str) and value:
            value = os.path.basename(os.path.normpath(value))
        elif isinstance(value, (list, tuple)):
            value = str(list(value))
        elif value is not None and not isinstance(value, (bool, int, float, str)):
            value = str(value)
        out[opt.name] = value
    return out


class Trackers:
    """The run's trackers: what accelerate is told to create, their init, and scalar logging with routing."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.names = tracker_names(args)
        self.run_dir = None
        self.accelerator = None
        if args.logging_dir:
            self.run_dir = os.path.join(args.logging_dir, (args.log_prefix or "") + time.strftime("%Y%m%d%H%M%S"))

    @property
    def log_with(self) -> list[str] | None:
        return list(self.names) or None

    def project_config(self):
        from accelerate.utils import ProjectConfiguration

        if self.run_dir is None:
            return None
        return ProjectConfiguration(project_dir=self.args.logging_dir, logging_dir=self.run_dir)

    @property
    def active(self) -> bool:
        return bool(self.accelerator is not None and self.accelerator.trackers)

    def init_kwargs(self) -> dict[str, dict[str, Any]]:
        a = self.args
        kwargs: dict[str, dict[str, Any]] = {}
        if "wandb" in self.names:
            wandb_kwargs = kwargs.setdefault("wandb", {})
            if a.wandb_run_name:
                wandb_kwargs["name"] = a.wandb_run_name
            if self.run_dir:
                os.makedirs(self.run_dir, exist_ok=True)
                wandb_kwargs["dir"] = self.run_dir
        if a.log_tracker_config:
            for name, settings in read_tracker_config(a.log_tracker_config, self.names).items():
                kwargs.setdefault(name, {}).update(settings)
        return kwargs

    def start(self, accelerator) -> None:
        """Create the trackers (main process; accelerate ignores the call elsewhere)."""
        self.accelerator = accelerator
        if not self.names or not accelerator.is_main_process:
            return
        a = self.args
        project = a.log_tracker_name or DEFAULT_PROJECT.get(getattr(a, "trainer_kind", None), "network_train")
        try:
            accelerator.init_trackers(project, config=loggable_config(a) if a.log_config else None,
                                      init_kwargs=self.init_kwargs())
        except Exception as e:  # noqa: BLE001 - wandb's own errors (no API key, bad entity) are the user's to fix
            if not type(e).__module__.startswith("wandb"):
                raise
            raise OptionError(f"option 'log_with': Weights & Biases could not start the run ({e}). Set "
                              "WANDB_API_KEY (or wandb_api_key), run `wandb login`, or set WANDB_MODE=offline; "
                              "check log_tracker_config's [wandb] settings") from None
        if "wandb" in self.names:
            run = accelerator.get_tracker("wandb", unwrap=True)
            for metric in ("global_step", "epoch"):
                run.define_metric(metric, hidden=True)

    def log(self, scalars: dict[str, float], *, step: int, global_step: int, epoch: int) -> None:
        """TensorBoard at `step`; wandb with global_step and epoch as fields (its step only grows)."""
        if not self.active:
            return
        for tracker in self.accelerator.trackers:
            if tracker.name == "wandb":
                tracker.log({**scalars, "global_step": global_step, "epoch": epoch})
            else:
                tracker.log(scalars, step=step)

    def log_samples(self, paths: list[str], prompts: list[str]) -> None:
        """Sample images to wandb (as sd-scripts does), committed with the next scalars."""
        if not self.active or "wandb" not in self.names:
            return
        import wandb

        tracker = self.accelerator.get_tracker("wandb")
        for i, (path, prompt) in enumerate(zip(paths, prompts)):
            tracker.log({f"sample_{i}": wandb.Image(path, caption=prompt)}, commit=False)
