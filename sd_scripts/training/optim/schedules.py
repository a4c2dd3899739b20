"""Learning-rate schedules from `lr_scheduler` and its options, stepped once per optimizer step.

As sd-scripts' get_scheduler_fix:
- the named schedules are transformers' (linear, cosine, cosine_with_restarts, polynomial, constant,
  constant_with_warmup, inverse_sqrt, cosine_with_min_lr, cosine_warmup_with_min_lr, warmup_stable_decay) and
  diffusers' piecewise_constant (its `step_rules` from lr_scheduler_args, e.g. `step_rules="1:10,0.1:20,0.01"`);
- `lr_warmup_steps` / `lr_decay_steps`: a number of steps, or a fraction of all steps when below 1 (floored);
  warmup_stable_decay's stable part is what is left; `lr_scheduler_num_cycles` is the number of restarts of
  cosine_with_restarts, and half of it the cosine cycles of cosine_with_min_lr / warmup_stable_decay (so the default 1
  is a half cosine down to the minimum); `lr_scheduler_min_lr_ratio` the floor of those as a fraction of the peak;
  `lr_scheduler_power` the exponent of polynomial (which ends at 1e-7); `lr_scheduler_timescale` inverse_sqrt's
  (default: the warmup steps); `lr_scheduler_args` key=value items passed to the schedule;
- `lr_scheduler_type`: any scheduler class instead (`CosineAnnealingLR` from torch.optim.lr_scheduler, or
  `module.Class`) built with lr_scheduler_args only;
- constant, adafactor and lr_scheduler_type schedules have no warmup: a warmup is an error;
- Adafactor with relative_step always uses the `adafactor` schedule (it only reports Adafactor's own step size), and
  `adafactor` is refused with any other optimizer;
- a schedule-free optimizer has no schedule: the learning rates stay as given (its own `warmup_steps` optimizer
  argument warms up).
"""
from __future__ import annotations

from typing import Any, Iterable

import torch

from ...options import OptionError
from .optimizers import import_class, innermost, is_schedule_free, parse_optimizer_args, uses_relative_step
from .registry import LR_SCHEDULERS, REFUSED_SCHEDULERS


def warmup_steps(num_warmup_steps: int | float | None, num_training_steps: int) -> int:
    """Warmup (or decay) as a step count: an int as is; a float below 1 is a fraction of `num_training_steps`
    (floored, as sd-scripts)."""
    if num_warmup_steps is None:
        return 0
    if isinstance(num_warmup_steps, float) and num_warmup_steps < 1:
        return int(num_warmup_steps * num_training_steps)
    return int(num_warmup_steps)


class ConstantScheduler:
    """The schedule of a schedule-free optimizer: nothing to step; reports the groups' learning rates (for logs).
    Has the state_dict interface accelerate checkpoints."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    def step(self) -> None:
        pass

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def check_scheduler_options(name: str, *, scheduler_type: str | None = None, scheduler_args: Iterable[str] | None = None,
                            num_warmup_steps: int | float | None = 0, min_lr_ratio: float | None = None,
                            relative_step_adafactor: bool = False) -> None:
    """Checks that need no optimizer (before the model loads): the name, a custom class, its arguments, and a warmup
    given as steps to a schedule without one (a fraction is checked once the run's steps are known)."""
    if name not in LR_SCHEDULERS and not scheduler_type:
        raise OptionError(f"option 'lr_scheduler': {name!r} is not one of {', '.join(LR_SCHEDULERS)}")
    if name in REFUSED_SCHEDULERS and not scheduler_type:
        raise OptionError(f"option 'lr_scheduler': {name} cannot be used: {REFUSED_SCHEDULERS[name]}")
    parse_optimizer_args(scheduler_args, "lr_scheduler_args")
    if scheduler_type:
        import_class(scheduler_type, "lr_scheduler_type", "torch.optim.lr_scheduler")
    if num_warmup_steps is not None and num_warmup_steps < 0:
        raise OptionError(f"option 'lr_warmup_steps': {num_warmup_steps} is negative; use 0 or more")
    if name == "adafactor" and not relative_step_adafactor and not scheduler_type:
        raise OptionError("option 'lr_scheduler': the adafactor schedule works only with optimizer_type Adafactor "
                          "(with relative_step); pick another lr_scheduler")
    if isinstance(num_warmup_steps, int) and num_warmup_steps > 0:
        _refuse_warmup(num_warmup_steps, name, scheduler_type, relative_step_adafactor)
    if name in ("cosine_with_min_lr", "cosine_warmup_with_min_lr") and min_lr_ratio is None and not scheduler_type \
            and "min_lr" not in parse_optimizer_args(scheduler_args, "lr_scheduler_args"):
        raise OptionError(f"option 'lr_scheduler_min_lr_ratio': the {name} schedule needs it (the lowest learning "
                          f"rate as a fraction of the peak, e.g. 0.1)")


def _refuse_warmup(warmup: int | float, name: str, scheduler_type: str | None, relative_step_adafactor: bool) -> None:
    """sd-scripts refuses a warmup for the schedules that have none (constant, adafactor, lr_scheduler_type)."""
    if not warmup:
        return
    if scheduler_type:
        what, fix = f"lr_scheduler_type {scheduler_type}", ""
    elif relative_step_adafactor:
        what, fix = ("adafactor schedule (Adafactor with relative_step sets its own step size)",
                     ", or warm Adafactor up with optimizer_args warmup_init=True")
    elif name == "constant":
        what, fix = "'constant' lr_scheduler", ", or use lr_scheduler=constant_with_warmup"
    else:
        return
    raise OptionError(f"option 'lr_warmup_steps': the {what} has no warmup (warmup is {warmup} steps); set "
                      f"lr_warmup_steps to 0{fix}")


def create_lr_scheduler(name: str, optimizer: torch.optim.Optimizer, *, num_training_steps: int,
                        num_warmup_steps: int | float | None = 0, num_decay_steps: int | float | None = 0,
                        num_cycles: int = 1, power: float = 1.0, timescale: int | None = None,
                        min_lr_ratio: float | None = None, scheduler_type: str | None = None,
                        scheduler_args: Iterable[str] | None = None, initial_lr: float | None = None):
    """The schedule for `optimizer` (see the module docstring). `initial_lr` is the lr the adafactor schedule
    reports before Adafactor's first step (learning_rate)."""
    if is_schedule_free(optimizer):
        return ConstantScheduler(optimizer)
    check_scheduler_options(name, scheduler_type=scheduler_type, scheduler_args=scheduler_args,
                            num_warmup_steps=num_warmup_steps, min_lr_ratio=min_lr_ratio,
                            relative_step_adafactor=uses_relative_step(optimizer))
    kwargs = parse_optimizer_args(scheduler_args, "lr_scheduler_args")
    warmup = warmup_steps(num_warmup_steps, num_training_steps)
    decay = warmup_steps(num_decay_steps, num_training_steps)
    relative = uses_relative_step(optimizer)
    _refuse_warmup(warmup, name, scheduler_type, relative)
    try:
        if scheduler_type:
            cls = import_class(scheduler_type, "lr_scheduler_type", "torch.optim.lr_scheduler")
            return cls(optimizer, **kwargs)
        if relative:  # whatever lr_scheduler says, as sd-scripts (check_scheduler_options refused the rest)
            from transformers.optimization import AdafactorSchedule

            # on Adafactor itself: the schedule asks it for its step size (_get_lr), which wrappers do not forward
            return AdafactorSchedule(innermost(optimizer), initial_lr if initial_lr is not None else 0.0)
        if name == "piecewise_constant":
            from diffusers.optimization import get_piecewise_constant_schedule

            return get_piecewise_constant_schedule(optimizer, **kwargs)
        from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION, SchedulerType

        schedule = TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(name)]
        if name == "constant":
            return schedule(optimizer, **kwargs)
        if name == "constant_with_warmup":
            return schedule(optimizer, num_warmup_steps=warmup, **kwargs)
        if name == "inverse_sqrt":
            return schedule(optimizer, num_warmup_steps=warmup, timescale=timescale, **kwargs)
        common: dict[str, Any] = dict(num_warmup_steps=warmup, num_training_steps=num_training_steps)
        if name == "cosine_with_restarts":
            return schedule(optimizer, num_cycles=num_cycles, **common, **kwargs)
        if name == "polynomial":
            return schedule(optimizer, power=power, **common, **kwargs)
        if name in ("cosine_with_min_lr", "cosine_warmup_with_min_lr"):
            if "min_lr" not in kwargs:
                kwargs.setdefault("min_lr_rate", min_lr_ratio)
            return schedule(optimizer, num_cycles=num_cycles / 2, **common, **kwargs)
        if name in ("linear", "cosine"):
            return schedule(optimizer, **common, **kwargs)
        if name == "warmup_stable_decay":
            if warmup + decay > num_training_steps:
                raise OptionError(f"options 'lr_warmup_steps' and 'lr_decay_steps': {warmup} + {decay} steps are more "
                                  f"than the run's {num_training_steps}; shorten them")
            return schedule(optimizer, num_warmup_steps=warmup, num_stable_steps=num_training_steps - warmup - decay,
                            num_decay_steps=decay, num_cycles=num_cycles / 2,
                            min_lr_ratio=min_lr_ratio if min_lr_ratio is not None else 0.0, **kwargs)
    except (ValueError, TypeError) as e:  # e.g. polynomial with learning_rate at or below its 1e-7 end value
        option, value = ("lr_scheduler_type", scheduler_type) if scheduler_type else ("lr_scheduler", name)
        raise OptionError(f"option '{option}' {value}: {e} (check lr_scheduler_args and the lr_* options)") from None
    raise OptionError(f"option 'lr_scheduler': {name} is not supported")  # pragma: no cover - LR_SCHEDULERS covers all


def scheduler_from_args(args, optimizer: torch.optim.Optimizer, num_training_steps: int):
    """`create_lr_scheduler` with the run's lr_* options."""
    return create_lr_scheduler(
        args.lr_scheduler, optimizer, num_training_steps=num_training_steps, num_warmup_steps=args.lr_warmup_steps,
        num_decay_steps=args.lr_decay_steps, num_cycles=args.lr_scheduler_num_cycles, power=args.lr_scheduler_power,
        timescale=args.lr_scheduler_timescale, min_lr_ratio=args.lr_scheduler_min_lr_ratio,
        scheduler_type=args.lr_scheduler_type or None, scheduler_args=args.lr_scheduler_args,
        initial_lr=args.learning_rate)
