"""Defaults that depend on the training method and the model family: asked of the family (its FamilySpec), never
kept in a table here.

kohya_ss used 1e-6 for every method and family; a LoRA needs about 100x more, and SDXL full training a little more
than SD1. The GUI puts these in the widgets when a tab opens and when the family changes (unless the user changed the
value), so the schema's single default is never shown for a method it does not suit.
"""
from __future__ import annotations

from typing import Any

from sd_scripts.families import all_families, default_family, family_spec

from ..command import trainer_for

DEFAULT_FAMILY = default_family()
#: the options family_defaults sets
FAMILY_DEPENDENT = ("learning_rate", "resolution")
FAMILY_CHOICES = [(f"{spec.label} ({name})", name) for name, spec in all_families().items()]


def learning_rate(kind: str, family: str) -> float | None:
    """The family's default learning rate for a GUI training kind ('lora', 'dreambooth', 'finetune', 'ti'); None
    when the family is not trained that way (FamilySpec.trainers: pre-flight refuses such a run)."""
    return family_spec(family).learning_rates.get(trainer_for(kind))


def family_defaults(kind: str, family: str, v_parameterization: bool = False) -> dict[str, Any]:
    """Option values whose sensible default depends on (kind, family); no learning rate for a kind the family
    cannot be trained with."""
    spec = family_spec(family)
    out: dict[str, Any] = {"resolution": str(spec.default_resolution_for(v_parameterization))}
    rate = learning_rate(kind, family)
    if rate is not None:
        out["learning_rate"] = rate
    return out


def option_shown(opt, family: str) -> bool:
    """Whether the form shows (and sends) option `opt` for `family`: the family takes it (Option.families), and it is
    not one of the options every family has that this family refuses (FamilySpec.refused_options, e.g. clip_skip for
    FLUX.1). A refused option of the family's own (one not implemented yet) stays shown: pre-flight names it."""
    if family not in opt.families:
        return False
    return opt.family_specific or opt.name not in family_spec(family).refused_options
