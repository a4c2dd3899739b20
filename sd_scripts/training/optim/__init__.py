"""Optimizers and learning-rate schedules (the `optimizer_*` and `lr_*` options).

- `registry.py` (torch-free): the optimizer names sd-scripts knows, one row each, grouped by library, and the
  schedule names;
- `optimizers.py`: `create_optimizer`, the pre-flight `check_optimizer_options`, schedule-free train/eval switching;
- `schedules.py`: `create_lr_scheduler` / `scheduler_from_args`.

This package's `__init__` imports nothing heavy: the names below load their module on first use, so the torch-free
option schema can read `registry`.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "OPTIMIZER_NAMES": "registry", "LR_SCHEDULERS": "registry", "entry_for": "registry",
    "create_optimizer": "optimizers", "check_optimizer_options": "optimizers", "parse_optimizer_args": "optimizers",
    "bitsandbytes_problem": "optimizers", "resolve_optimizer_type": "registry", "is_schedule_free": "optimizers",
    "eval_weights": "optimizers", "set_train_mode": "optimizers", "uses_relative_step": "optimizers",
    "create_lr_scheduler": "schedules", "scheduler_from_args": "schedules", "warmup_steps": "schedules",
    "check_scheduler_options": "schedules",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
