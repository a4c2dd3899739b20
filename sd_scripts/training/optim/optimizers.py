"""Optimizers from `optimizer_type` / `optimizer_args` (and the older `use_8bit_adam` / `use_lion_optimizer`).

The names come from the table in registry.py; any other name is `torch.optim.<Name>` or `module.Class`, as in
sd-scripts. `optimizer_args` items are `key=value` with Python-literal values (`weight_decay=0.01 betas=0.9,0.99`
-> weight_decay=0.01, betas=(0.9, 0.99)); keys the class does not take are refused by name.

What sd-scripts does beyond building the class, done here too:
- Adafactor: `relative_step` defaults to True (and `warmup_init=True` turns it on); with it the optimizer computes its
  own step size, learning_rate only starts the `adafactor` schedule (transformers' AdafactorSchedule, which reports
  Adafactor's step size) and per-group learning rates (unet_lr / text_encoder_lr) are ignored, with a warning.
- D-Adaptation / Prodigy: a warning when learning_rate is 0.1 or less (they want about 1.0) or groups differ.
- Schedule-free optimizers (anything with train()/eval(), e.g. AdamWScheduleFree, prodigyplus.ProdigyPlusScheduleFree)
  are put in train mode; the loop switches them to eval mode (the averaged weights) around sampling and saving.
- bitsandbytes optimizers: the kernels are tried on the training device before the model loads, so a machine where
  they cannot run gets a clear error instead of a crash later. (bitsandbytes 0.50 runs all of them on the CPU; its
  paged ones page only on CUDA and behave like the plain ones elsewhere.)
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import importlib
import inspect
import logging
from typing import Any, Callable, Iterable, Iterator

import torch

from ...options import OptionError, parse_kv_args
from .registry import OPTIMIZER_NAMES, PACKAGE_OF_MODULE, OptimizerEntry, entry_for, resolve_optimizer_type

log = logging.getLogger("sd_scripts.train")


def parse_optimizer_args(optimizer_args: Iterable[str] | None, option: str = "optimizer_args") -> dict[str, Any]:
    """`["weight_decay=0.01", "betas=0.9,0.99"]` -> {"weight_decay": 0.01, "betas": (0.9, 0.99)} (ast.literal_eval)."""
    kwargs: dict[str, Any] = {}
    for key, text in parse_kv_args(optimizer_args, option).items():
        if not key:
            raise OptionError(f"option '{option}': {key}={text!r} has no name before '='")
        try:
            kwargs[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise OptionError(f"option '{option}': {key}={text} is not a Python literal; write numbers, "
                              f"True/False, a tuple like 0.9,0.99 or a quoted string") from None
    return kwargs


def import_class(path: str, option: str, default_module: str) -> type:
    """`Name` (from `default_module`) or `package.module.Name`; OptionError naming the option and what to install."""
    module_name, _, class_name = path.rpartition(".")
    module_name = module_name or default_module
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        package = PACKAGE_OF_MODULE.get(module_name.split(".")[0], module_name.split(".")[0])
        raise OptionError(f"option '{option}': {path} needs the Python package {package!r}, which is not installed "
                          f"({e}); install it with pip install {package}") from None
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        raise OptionError(f"option '{option}': {module_name} has no class {class_name!r}; check the spelling (it is "
                          f"case-sensitive)" + (f", or use one of {', '.join(OPTIMIZER_NAMES)}"
                                                if option == "optimizer_type" else ""))
    return cls


def optimizer_class(optimizer_type: str) -> tuple[type, OptimizerEntry | None]:
    """(class, table row or None) of an optimizer name; imports its library."""
    entry = entry_for(optimizer_type)
    if entry is None:
        cls = import_class(optimizer_type, "optimizer_type", "torch.optim")
        if not issubclass(cls, torch.optim.Optimizer) and not callable(getattr(cls, "step", None)):
            raise OptionError(f"option 'optimizer_type': {optimizer_type} is not an optimizer (it has no step())")
        return cls, None
    module_name, class_name = entry.target.split(":")
    return import_class(f"{module_name}.{class_name}", "optimizer_type", ""), entry


def _accepted_kwargs(cls: type) -> list[str] | None:
    """Keyword names the class's constructor takes, or None when it takes any (**kwargs)."""
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return [n for n in params if n not in ("self", "params")]


def optimizer_kwargs(optimizer_type: str, optimizer_args: Iterable[str] | None) -> tuple[type, OptimizerEntry | None,
                                                                                         dict[str, Any]]:
    """(class, row, keyword arguments) with the row's defaults and fixed values; unknown keys refused by name."""
    cls, entry = optimizer_class(optimizer_type)
    kwargs = parse_optimizer_args(optimizer_args)
    if "lr" in kwargs:
        raise OptionError("option 'optimizer_args': set the learning rate with learning_rate (or unet_lr / "
                          "text_encoder_lr), not lr=")
    accepted = _accepted_kwargs(cls)
    unknown = [k for k in kwargs if accepted is not None and k not in accepted]
    if unknown:
        raise OptionError(f"option 'optimizer_args': {optimizer_type} has no argument "
                          f"{', '.join(map(repr, unknown))}; it accepts {', '.join(a for a in accepted if a != 'lr')}")
    if entry is not None:
        clash = [k for k, v in entry.fixed.items() if k in kwargs and kwargs[k] != v]
        if clash:
            raise OptionError(f"option 'optimizer_args': {entry.name} always uses "
                              f"{', '.join(f'{k}={entry.fixed[k]}' for k in clash)}; remove {', '.join(clash)}")
        kwargs = {**entry.defaults, **kwargs, **entry.fixed}
    if is_relative_step_adafactor_class(cls) and kwargs.get("warmup_init") and not kwargs.get("relative_step", True):
        log.info("Adafactor: warmup_init=True needs relative_step, which is turned on")
        kwargs["relative_step"] = True
    if is_relative_step_adafactor_class(cls):
        kwargs.setdefault("relative_step", True)  # sd-scripts' (and transformers') default
    return cls, entry, kwargs


def is_relative_step_adafactor_class(cls: type) -> bool:
    """transformers' Adafactor (the class whose relative_step sd-scripts handles)."""
    return cls.__name__ == "Adafactor" and cls.__module__.startswith("transformers")


def uses_relative_step(optimizer: torch.optim.Optimizer) -> bool:
    """Adafactor computing its own step size (learning_rate only starts the `adafactor` schedule)."""
    inner = innermost(optimizer)  # under accelerate's and the fused-backward wrappers
    return is_relative_step_adafactor_class(type(inner)) and bool(inner.defaults.get("relative_step"))


@functools.lru_cache(maxsize=None)
def bitsandbytes_problem(device_type: str = "cpu", class_name: str = "AdamW8bit") -> str | None:
    """None when bitsandbytes' `class_name` imports and takes one step on `device_type`; else the reason why not."""
    try:
        import bitsandbytes as bnb
    except Exception as e:  # noqa: BLE001 - ImportError, or a broken native library raising anything
        return f"bitsandbytes is not installed or cannot load ({type(e).__name__}: {e})"
    cls = getattr(bnb.optim, class_name, None)
    if cls is None:
        return f"this bitsandbytes ({getattr(bnb, '__version__', '?')}) has no {class_name}; upgrade bitsandbytes"
    try:
        # 4096 elements: the smallest tensor whose state bitsandbytes keeps in 8 bits (smaller ones stay 32-bit).
        param = torch.nn.Parameter(torch.ones(4096, device=device_type))
        kwargs = {"momentum": 0.9} if "SGD" in class_name else {}
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "paged optimizers are not supported on CPU"
            optimizer = cls([param], lr=1e-3, **kwargs)
            param.grad = torch.ones_like(param)
            optimizer.step()
        if not bool(torch.isfinite(param).all()):
            return f"bitsandbytes {class_name} produced non-finite values"
    except Exception as e:  # noqa: BLE001
        return f"bitsandbytes {class_name} does not run on {device_type} ({type(e).__name__}: {e})"
    return None


def training_device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_optimizer_options(args: argparse.Namespace, device_type: str | None = None) -> None:
    """Before the model loads: the optimizer exists, its library works on this machine, its optimizer_args are
    accepted (built once over a small tensor), and it fits fused_backward_pass. OptionError otherwise."""
    name = resolve_optimizer_type(args.optimizer_type, getattr(args, "use_8bit_adam", False),
                                  getattr(args, "use_lion_optimizer", False))
    cls, entry, kwargs = optimizer_kwargs(name, args.optimizer_args)
    device_type = device_type or training_device_type()
    if entry is not None and entry.bitsandbytes:
        problem = bitsandbytes_problem(device_type, cls.__name__)
        if problem:
            plain = entry.name.replace("Paged", "").replace("8bit", "").replace("32bit", "") or "AdamW"
            raise OptionError(f"option 'optimizer_type': {entry.name} needs bitsandbytes, which cannot run here "
                              f"({problem}); use optimizer_type={plain} instead")
    from ..fused_backward import fused_backward_wanted

    if fused_backward_wanted(args) and not (entry is not None and entry.per_parameter):
        raise OptionError(f"option 'fused_backward_pass' steps each parameter on its own inside backward; "
                          f"{name} {'' if entry else '(not one of the known optimizers) '}does not update parameters "
                          f"independently, so use Adafactor (as sd-scripts), AdamW, AdamW8bit, Lion or SGDNesterov "
                          f"with it, or turn fused_backward_pass off")
    lr = float(args.learning_rate or 0.0)
    probe = torch.nn.Parameter(torch.zeros(8))
    try:
        cls([probe], lr=None if _relative(cls, kwargs) else (lr or 1e-3), **kwargs)
    except (ValueError, TypeError, AssertionError) as e:
        raise OptionError(f"option 'optimizer_args' for {name}: {e}") from None
    if is_schedule_free_class(cls):
        return  # no schedule: lr_scheduler and its options are not used (a warning says so when set)
    from .schedules import check_scheduler_options

    check_scheduler_options(args.lr_scheduler, scheduler_type=args.lr_scheduler_type or None,
                            scheduler_args=args.lr_scheduler_args, num_warmup_steps=args.lr_warmup_steps,
                            min_lr_ratio=args.lr_scheduler_min_lr_ratio, relative_step_adafactor=_relative(cls, kwargs))


def is_schedule_free_class(cls: type) -> bool:
    return callable(getattr(cls, "train", None)) and callable(getattr(cls, "eval", None))


def _relative(cls: type, kwargs: dict) -> bool:
    return is_relative_step_adafactor_class(cls) and bool(kwargs.get("relative_step"))


def create_optimizer(optimizer_type: str, optimizer_args: list[str] | None, param_groups: Iterable,
                     learning_rate: float, *, warn: Callable[[str], None] | None = None) -> torch.optim.Optimizer:
    """The optimizer named by `optimizer_type` (case-insensitive) over `param_groups` (tensors or group dicts;
    a group's own "lr" wins over `learning_rate`). `warn` receives advice (sd-scripts' warnings)."""
    warn = warn or log.warning
    groups = list(param_groups)
    cls, entry, kwargs = optimizer_kwargs(optimizer_type or "AdamW", optimizer_args)
    params = _params_of(groups)
    if entry is not None and entry.bitsandbytes:
        problem = bitsandbytes_problem(_device_type(params), cls.__name__)
        if problem:
            raise OptionError(f"option 'optimizer_type': {entry.name} needs bitsandbytes, which is not available on "
                              f"this machine ({problem}); use optimizer_type=AdamW")
        if entry.paged and _device_type(params) != "cuda":
            warn(f"{entry.name}: paged optimizer state pages to CPU memory only on CUDA; here it works like the "
                 f"plain optimizer")
        if _device_type(params) == "cpu":
            warn(f"{entry.name} runs on the CPU, but bitsandbytes' CPU kernels are 20 to 60 times slower than "
                 f"torch's AdamW (benchmarks/optimizer_step.py); on a CPU, AdamW is the faster choice")
    if cls is torch.optim.AdamW and "fused" not in kwargs and "foreach" not in kwargs and _fused_ok(params):
        kwargs["fused"] = True
    lr: float | None = learning_rate
    if _relative(cls, kwargs):
        lr = None
        if any(isinstance(g, dict) and g.get("lr") not in (None, learning_rate) for g in groups):
            warn("Adafactor with relative_step computes its own step size: unet_lr / text_encoder_lr are ignored "
                 "(learning_rate only starts the adafactor schedule); set optimizer_args relative_step=False "
                 "scale_parameter=False warmup_init=False to use them")
        groups = [{k: v for k, v in g.items() if k != "lr"} if isinstance(g, dict) else g for g in groups]
    elif cls.__name__ == "Adafactor" and entry is not None:
        log.info("Adafactor without relative_step: sd-scripts suggests lr_scheduler=constant_with_warmup and "
                 "max_grad_norm=0")
    if entry is not None and entry.adaptive:
        group_lrs = {g.get("lr", learning_rate) for g in groups if isinstance(g, dict)} or {learning_rate}
        first = next(iter(g.get("lr", learning_rate) for g in groups if isinstance(g, dict)), learning_rate)
        if first <= 0.1:
            warn(f"{entry.name} estimates the step size itself: learning_rate is a multiplier and should be about 1.0 "
                 f"(it is {first})")
        if len(group_lrs) > 1:
            warn(f"{entry.name}: unet_lr and text_encoder_lr differ; with D-Adaptation / Prodigy sd-scripts warns that "
                 f"only the first learning rate takes effect: set them equal")
    try:
        optimizer = cls(groups, lr=lr, **kwargs)
    except (ValueError, TypeError, AssertionError) as e:
        raise OptionError(f"option 'optimizer_args' for {optimizer_type}: {e}") from None
    if is_schedule_free(optimizer):
        optimizer.train()
    log.info("optimizer: %s.%s %s", cls.__module__, cls.__name__, kwargs or "")
    return optimizer


def _params_of(param_groups: list) -> list[torch.Tensor]:
    params: list[torch.Tensor] = []
    for group in param_groups:
        if isinstance(group, dict):
            params.extend(group["params"])
        else:
            params.append(group)
    return params


def _device_type(params: list[torch.Tensor]) -> str:
    return params[0].device.type if params else "cpu"


def _fused_ok(params: list[torch.Tensor]) -> bool:
    """Fused AdamW (one kernel for all parameters) when every parameter is a float tensor on one CUDA or CPU device.

    On the CPU the fused kernel is several times faster than the per-tensor loop for the many small LoRA tensors.
    """
    if not params:
        return False
    devices = {p.device.type for p in params}
    return len(devices) == 1 and devices <= {"cuda", "cpu"} and all(
        p.dtype in (torch.float32, torch.float16, torch.bfloat16) for p in params)


# ---------------------------------------------------------------- schedule-free: train / eval weights
def innermost(optimizer):
    """The optimizer under accelerate's and the fused-backward wrappers."""
    seen = optimizer
    while hasattr(seen, "optimizer") and seen.optimizer is not seen:
        seen = seen.optimizer
    return seen


def is_schedule_free(optimizer) -> bool:
    """An optimizer whose parameters hold different weights while training and for use (train() / eval())."""
    return is_schedule_free_class(type(innermost(optimizer)))


def in_train_mode(optimizer) -> bool:
    inner = innermost(optimizer)
    return all(g.get("train_mode", True) for g in inner.param_groups)


def set_train_mode(optimizer) -> None:
    """Parameters back to the training point (no-op for ordinary optimizers and when already there)."""
    if is_schedule_free(optimizer) and not in_train_mode(optimizer):
        innermost(optimizer).train()


@contextlib.contextmanager
def eval_weights(optimizer) -> Iterator[None]:
    """While entered, a schedule-free optimizer's parameters hold the averaged weights that are sampled and saved
    (sd-scripts' optimizer_eval_fn / optimizer_train_fn around sampling and saving). Nested use is harmless."""
    switch = optimizer is not None and is_schedule_free(optimizer) and in_train_mode(optimizer)
    if switch:
        innermost(optimizer).eval()
    try:
        yield
    finally:
        if switch:
            innermost(optimizer).train()
