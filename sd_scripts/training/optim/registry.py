"""The optimizer names sd-scripts' `--optimizer_type` knows, one table row each, grouped by the library that has it.

Torch-free (the option schema and the GUI read it). A row says where the class lives (`module:Class`, imported only
when used), which pip package provides it, and the facts the trainer needs about it:
- `fixed`: keyword arguments always passed (SGDNesterov is SGD with nesterov=True);
- `defaults`: keyword arguments passed unless optimizer_args sets them (SGDNesterov's momentum 0.9, which nesterov
  needs);
- `bitsandbytes`: the class runs bitsandbytes kernels, so the trainer checks they run on the training device;
- `paged`: state pages to CPU memory under GPU memory pressure (CUDA only; on the CPU it is a plain optimizer);
- `adaptive`: D-Adaptation / Prodigy estimate the step size themselves; learning_rate is a multiplier (about 1.0);
- `per_parameter`: each parameter is updated from its own gradient and state only, so fused_backward_pass may step
  parameters one at a time inside the backward pass.

Any other name is looked up as sd-scripts does: `torch.optim.<Name>` without a dot, else `module.Class`
(e.g. `pytorch_optimizer.CAME`, `prodigyplus.ProdigyPlusScheduleFree`). Names are matched case-insensitively.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class OptimizerEntry:
    name: str  # as sd-scripts spells it
    target: str  # "module:Class"
    package: str  # pip package that provides it
    fixed: dict = field(default_factory=dict)
    defaults: dict = field(default_factory=dict)
    bitsandbytes: bool = False
    paged: bool = False
    adaptive: bool = False
    per_parameter: bool = True
    aliases: tuple = ()
    state_bytes: float = 8.0  # optimizer state per trained fp32 parameter (benchmarks/optimizer_step.py measures it)


_E = OptimizerEntry
_BNB = dict(package="bitsandbytes", bitsandbytes=True)
_DADAPT = dict(package="dadaptation", adaptive=True, per_parameter=False)
_SF = dict(package="schedulefree", per_parameter=False)  # the step count and weight sum live in the group

ENTRIES: tuple[OptimizerEntry, ...] = (
    # torch
    _E("AdamW", "torch.optim:AdamW", "torch"),
    _E("SGDNesterov", "torch.optim:SGD", "torch", fixed={"nesterov": True}, defaults={"momentum": 0.9}, state_bytes=4),
    # bitsandbytes
    _E("AdamW8bit", "bitsandbytes.optim:AdamW8bit", **_BNB, state_bytes=2),
    _E("SGDNesterov8bit", "bitsandbytes.optim:SGD8bit", fixed={"nesterov": True}, defaults={"momentum": 0.9}, **_BNB, state_bytes=1),
    _E("Lion8bit", "bitsandbytes.optim:Lion8bit", **_BNB, state_bytes=1),
    _E("PagedAdamW", "bitsandbytes.optim:PagedAdamW", paged=True, **_BNB),
    _E("PagedAdamW8bit", "bitsandbytes.optim:PagedAdamW8bit", paged=True, **_BNB, state_bytes=2),
    _E("PagedAdamW32bit", "bitsandbytes.optim:PagedAdamW32bit", paged=True, **_BNB),
    _E("PagedLion8bit", "bitsandbytes.optim:PagedLion8bit", paged=True, **_BNB, state_bytes=1),
    # lion-pytorch
    _E("Lion", "lion_pytorch:Lion", "lion-pytorch", state_bytes=4),
    # dadaptation (DAdaptation is sd-scripts' name for the preprint's Adam)
    _E("DAdaptation", "dadaptation.experimental:DAdaptAdamPreprint", aliases=("DAdaptAdamPreprint",), **_DADAPT, state_bytes=12),
    _E("DAdaptAdaGrad", "dadaptation:DAdaptAdaGrad", **_DADAPT, state_bytes=12),
    _E("DAdaptAdam", "dadaptation:DAdaptAdam", **_DADAPT, state_bytes=12),
    _E("DAdaptAdan", "dadaptation:DAdaptAdan", **_DADAPT, state_bytes=20),
    _E("DAdaptAdanIP", "dadaptation.experimental:DAdaptAdanIP", **_DADAPT, state_bytes=20),
    _E("DAdaptLion", "dadaptation:DAdaptLion", **_DADAPT),
    _E("DAdaptSGD", "dadaptation:DAdaptSGD", **_DADAPT, state_bytes=12),
    # prodigyopt
    _E("Prodigy", "prodigyopt:Prodigy", "prodigyopt", adaptive=True, per_parameter=False, state_bytes=14),
    # transformers
    _E("Adafactor", "transformers.optimization:Adafactor", "transformers", state_bytes=1),
    # schedulefree
    _E("RAdamScheduleFree", "schedulefree:RAdamScheduleFree", **_SF),
    _E("AdamWScheduleFree", "schedulefree:AdamWScheduleFree", **_SF),
    _E("SGDScheduleFree", "schedulefree:SGDScheduleFree", **_SF, state_bytes=4),
)

BY_KEY: dict[str, OptimizerEntry] = {n.lower(): e for e in ENTRIES for n in (e.name, *e.aliases)}
OPTIMIZER_NAMES: tuple[str, ...] = tuple(e.name for e in ENTRIES)
#: `module.Class` names of installed libraries the GUI offers next to the table's (any other is typed in)
OPTIMIZER_EXAMPLES: tuple[str, ...] = ("pytorch_optimizer.CAME", "prodigyplus.ProdigyPlusScheduleFree",
                                       "bitsandbytes.optim.AdEMAMix8bit", "bitsandbytes.optim.PagedAdEMAMix8bit")

#: pip packages of the libraries that provide optimizers by `module.Class` name (for the "not installed" message).
PACKAGE_OF_MODULE = {"pytorch_optimizer": "pytorch-optimizer", "prodigyplus": "prodigy-plus-schedule-free",
                     "came_pytorch": "came-pytorch", "lion_pytorch": "lion-pytorch", "prodigyopt": "prodigyopt",
                     "dadaptation": "dadaptation", "schedulefree": "schedulefree", "bitsandbytes": "bitsandbytes",
                     "transformers": "transformers"}


def resolve_optimizer_type(optimizer_type: str | None, use_8bit_adam: bool = False,
                           use_lion_optimizer: bool = False) -> str:
    """The optimizer name the options mean: use_8bit_adam -> AdamW8bit, use_lion_optimizer -> Lion (sd-scripts'
    older flags), refused together with each other or with a different optimizer_type; empty -> AdamW."""
    from ...options import OptionError  # (the schema imports this module while it is being built)

    given = (optimizer_type or "").strip()
    if use_8bit_adam and use_lion_optimizer:
        raise OptionError("options 'use_8bit_adam' and 'use_lion_optimizer' exclude each other: keep one, or set "
                          "optimizer_type instead")
    for flag, on, meant in (("use_8bit_adam", use_8bit_adam, "AdamW8bit"),
                            ("use_lion_optimizer", use_lion_optimizer, "Lion")):
        if on:
            if given.lower() not in ("", "adamw", meant.lower()):  # AdamW is the schema's default
                raise OptionError(f"options '{flag}' and 'optimizer_type' ({given}) both choose the optimizer: "
                                  f"remove {flag} (it means optimizer_type={meant})")
            return meant
    return given or "AdamW"


def entry_for(optimizer_type: str) -> OptimizerEntry | None:
    """The table row of a name (case-insensitive), or None for a torch.optim / `module.Class` name."""
    return BY_KEY.get((optimizer_type or "AdamW").lower())


def state_bytes_per_param(optimizer_type: str | None, use_8bit_adam: bool = False,
                          use_lion_optimizer: bool = False) -> float:
    """Optimizer state bytes per trained parameter, for memory estimates (8, AdamW's, for names not in the table)."""
    name = "AdamW8bit" if use_8bit_adam else "Lion" if use_lion_optimizer else optimizer_type
    entry = entry_for(name or "AdamW")
    return entry.state_bytes if entry else 8.0


def name_problem(optimizer_type: str) -> str | None:
    """Torch-free check of the form of an optimizer_type value (the class itself is looked up by the trainer)."""
    if entry_for(optimizer_type):
        return None
    parts = str(optimizer_type).split(".")
    if all(p.isidentifier() for p in parts):
        return None
    return (f"{optimizer_type!r} is neither one of {', '.join(OPTIMIZER_NAMES)} nor a torch.optim class name nor "
            f"'module.Class' (e.g. pytorch_optimizer.CAME)")


# ---- learning-rate schedules (lr_scheduler): transformers' get_scheduler set as sd-scripts uses it, diffusers'
# piecewise_constant, and Adafactor's own.
LR_SCHEDULERS: tuple[str, ...] = (
    "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial", "inverse_sqrt",
    "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay", "piecewise_constant", "adafactor",
    "reduce_lr_on_plateau")
#: schedules that are accepted (sd-scripts names them) but cannot run in a training loop without an evaluation metric
REFUSED_SCHEDULERS = {
    "reduce_lr_on_plateau": "it lowers the learning rate when a validation metric stops improving, and sd-scripts' "
                            "training loops (and ours) step the schedule without a metric; pick another lr_scheduler",
}
