"""Defaults that depend on the training method and the model family (the one table of them in the GUI).

kohya_ss used 1e-6 for every method and family; a LoRA needs about 100x more, and SDXL full training a little more
than SD1. The GUI puts these in the widgets when a tab opens and when the family changes (unless the user changed the
value), so the schema's single default is never shown for a method it does not suit.
"""
from __future__ import annotations

from typing import Any

from sd_scripts.models.families import FAMILIES, family_info

# training kind (the GUI's, see command.KIND_TO_TRAINER) -> family -> learning rate
LEARNING_RATES: dict[str, dict[str, float]] = {
    "lora": {"sd1": 1e-4, "sd2": 1e-4, "sdxl": 1e-4},
    "dreambooth": {"sd1": 1e-6, "sd2": 1e-6, "sdxl": 1e-5},
    "finetune": {"sd1": 1e-6, "sd2": 1e-6, "sdxl": 1e-5},
    "ti": {"sd1": 5e-3, "sd2": 5e-3, "sdxl": 5e-3},  # embeddings only (A1111's default)
}

DEFAULT_FAMILY = "sd1"
#: the options family_defaults sets
FAMILY_DEPENDENT = ("learning_rate", "resolution")
FAMILY_CHOICES = [(f"{info.label} ({name})", name) for name, info in FAMILIES.items()]


def family_defaults(kind: str, family: str, v_parameterization: bool = False) -> dict[str, Any]:
    """Option values whose sensible default depends on (kind, family)."""
    info = family_info(family)
    return {
        "learning_rate": LEARNING_RATES[kind][family],
        "resolution": str(info.default_resolution_for(v_parameterization)),
    }
