"""Optimizers and learning-rate schedules from the `optimizer_*` and `lr_*` options.

- `create_optimizer`: AdamW (torch; fused on CUDA) or AdamW8bit (bitsandbytes, when installed and working on this
  machine). `optimizer_args` items are `key=value` with Python-literal values, as in sd-scripts:
  `weight_decay=0.01 betas=0.9,0.99` -> weight_decay=0.01, betas=(0.9, 0.99). Unknown keys are refused by name.
- `create_lr_scheduler`: diffusers' schedules (constant, constant_with_warmup, linear, cosine, cosine_with_restarts,
  polynomial). Warmup is a number of steps, or a fraction of all steps when a float below 1 (floor of the product,
  as sd-scripts does). Like sd-scripts, `constant` with a non-zero warmup is an error (sd-scripts raises
  "constant does not require num_warmup_steps"); ours says to pick constant_with_warmup or set the warmup to 0.
  `cosine` is diffusers' half cosine from the peak to 0; `num_cycles` only applies to cosine_with_restarts;
  `polynomial` decays to 1e-7 with exponent `power`.
"""
from __future__ import annotations

import ast
import functools
import inspect
from typing import Any, Iterable

import torch

from ..options import OptionError, parse_kv_args

OPTIMIZERS = ("AdamW", "AdamW8bit")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


def parse_optimizer_args(optimizer_args: Iterable[str] | None) -> dict[str, Any]:
    """`["weight_decay=0.01", "betas=0.9,0.99"]` -> {"weight_decay": 0.01, "betas": (0.9, 0.99)} (ast.literal_eval)."""
    kwargs: dict[str, Any] = {}
    for key, text in parse_kv_args(optimizer_args, "optimizer_args").items():
        if not key:
            raise OptionError(f"option 'optimizer_args': {key}={text!r} has no name before '='")
        try:
            kwargs[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise OptionError(f"option 'optimizer_args': {key}={text} is not a Python literal; write numbers, "
                              f"True/False, a tuple like 0.9,0.99 or a quoted string") from None
    return kwargs


def _params_of(param_groups: list) -> list[torch.Tensor]:
    params: list[torch.Tensor] = []
    for group in param_groups:
        if isinstance(group, dict):
            params.extend(group["params"])
        else:
            params.append(group)
    return params


def _check_kwargs(optimizer_class: type, kwargs: dict[str, Any], optimizer_type: str) -> None:
    """Refuse keys the optimizer does not take, naming them and listing the accepted ones."""
    accepted = [n for n in inspect.signature(optimizer_class.__init__).parameters if n not in ("self", "params")]
    if "lr" in kwargs:
        raise OptionError("option 'optimizer_args': set the learning rate with learning_rate (or unet_lr / "
                          "text_encoder_lr), not lr=")
    unknown = [k for k in kwargs if k not in accepted]
    if unknown:
        raise OptionError(f"option 'optimizer_args': {optimizer_type} has no argument {', '.join(map(repr, unknown))}; "
                          f"it accepts {', '.join(a for a in accepted if a != 'lr')}")


@functools.lru_cache(maxsize=None)
def bitsandbytes_problem(device_type: str = "cpu") -> str | None:
    """None when bitsandbytes' AdamW8bit imports and takes one step on `device_type`; else the reason why not."""
    try:
        import bitsandbytes as bnb  # noqa: F401
    except Exception as e:  # noqa: BLE001 - ImportError, or a broken native library raising anything
        return f"bitsandbytes is not installed or cannot load ({type(e).__name__}: {e})"
    try:
        # 4096 elements: the smallest tensor whose state bitsandbytes keeps in 8 bits (smaller ones stay 32-bit).
        param = torch.nn.Parameter(torch.ones(4096, device=device_type))
        optimizer = bnb.optim.AdamW8bit([param], lr=1e-3)
        param.grad = torch.ones_like(param)
        optimizer.step()
        if not bool(torch.isfinite(param).all()):
            return "bitsandbytes AdamW8bit produced non-finite values"
    except Exception as e:  # noqa: BLE001
        return f"bitsandbytes AdamW8bit does not run on {device_type} ({type(e).__name__}: {e})"
    return None


def _device_type(params: list[torch.Tensor]) -> str:
    return params[0].device.type if params else "cpu"


def create_optimizer(optimizer_type: str, optimizer_args: list[str] | None, param_groups: Iterable,
                     learning_rate: float) -> torch.optim.Optimizer:
    """The optimizer named by `optimizer_type` (case-insensitive) over `param_groups` (tensors or group dicts;
    a group's own "lr" wins over `learning_rate`)."""
    groups = list(param_groups)
    params = _params_of(groups)
    kwargs = parse_optimizer_args(optimizer_args)
    name = (optimizer_type or "AdamW").lower()
    if name == "adamw":
        _check_kwargs(torch.optim.AdamW, kwargs, "AdamW")
        if "fused" not in kwargs and "foreach" not in kwargs and _fused_ok(params):
            kwargs["fused"] = True
        optimizer_class: type = torch.optim.AdamW
    elif name == "adamw8bit":
        problem = bitsandbytes_problem(_device_type(params))
        if problem:
            raise OptionError(f"option 'optimizer_type': AdamW8bit needs bitsandbytes, which is not available on this "
                              f"machine ({problem}); use optimizer_type=AdamW")
        import bitsandbytes as bnb

        optimizer_class = bnb.optim.AdamW8bit
        _check_kwargs(optimizer_class, kwargs, "AdamW8bit")
    else:
        raise OptionError(f"option 'optimizer_type': {optimizer_type!r} is not one of {', '.join(OPTIMIZERS)}")
    try:
        return optimizer_class(groups, lr=learning_rate, **kwargs)
    except (ValueError, TypeError) as e:
        raise OptionError(f"option 'optimizer_args' for {optimizer_type}: {e}") from None


def _fused_ok(params: list[torch.Tensor]) -> bool:
    """Fused AdamW (one kernel for all parameters) when every parameter is a float tensor on one CUDA or CPU device.

    On the CPU the fused kernel is several times faster than the per-tensor loop for the many small LoRA tensors.
    """
    if not params:
        return False
    devices = {p.device.type for p in params}
    return len(devices) == 1 and devices <= {"cuda", "cpu"} and all(
        p.dtype in (torch.float32, torch.float16, torch.bfloat16) for p in params)


def warmup_steps(num_warmup_steps: int | float | None, num_training_steps: int) -> int:
    """Warmup as a step count: an int as is; a float below 1 is a fraction of `num_training_steps` (floored)."""
    if num_warmup_steps is None:
        return 0
    if isinstance(num_warmup_steps, float) and num_warmup_steps < 1:
        return int(num_warmup_steps * num_training_steps)
    return int(num_warmup_steps)


def create_lr_scheduler(name: str, optimizer: torch.optim.Optimizer, *, num_training_steps: int,
                        num_warmup_steps: int | float = 0, num_cycles: int = 1,
                        power: float = 1.0) -> torch.optim.lr_scheduler.LambdaLR:
    """A diffusers learning-rate schedule, stepped once per optimizer step."""
    from diffusers.optimization import get_scheduler

    if name not in LR_SCHEDULERS:
        raise OptionError(f"option 'lr_scheduler': {name!r} is not one of {', '.join(LR_SCHEDULERS)}")
    if num_warmup_steps is not None and num_warmup_steps < 0:
        raise OptionError(f"option 'lr_warmup_steps': {num_warmup_steps} is negative; use 0 or more")
    warmup = warmup_steps(num_warmup_steps, num_training_steps)
    if name == "constant" and warmup:
        raise OptionError(f"option 'lr_warmup_steps': the 'constant' lr_scheduler has no warmup (warmup is {warmup} "
                          f"steps); use lr_scheduler=constant_with_warmup, or set lr_warmup_steps to 0")
    try:
        return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=num_training_steps,
                             num_cycles=num_cycles, power=power)
    except ValueError as e:  # e.g. polynomial with learning_rate at or below its 1e-7 end value
        raise OptionError(f"option 'lr_scheduler' {name}: {e}") from None
