"""kohya_ss's "LoRA type" choices -> our `network_module` and the `network_args` kohya_ss builds from its widgets.

Facts from bmaltais/kohya_ss (`kohya_gui/lora_gui.py`, train_model): which sd-scripts / LyCORIS network each type runs
and which config fields become which network_args. Types we do not train are refused with the reason. Torch-free.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

LYCORIS = "lycoris.kohya"


@dataclass(frozen=True)
class LoraType:
    """network_module, fixed network_args, and (kohya_ss config field, network_args key) pairs passed when set."""

    network_module: str | None  # None: the family's own LoRA network (networks.lora, networks.lora_flux, ...)
    fixed: tuple[str, ...] = ()
    fields: tuple[tuple[str, str], ...] = ()
    skip_unset: bool = False  # kohya_ss leaves defaults out (its native LoHa/LoKr), else it passes every field


def _f(*names: str) -> tuple[tuple[str, str], ...]:
    """kohya_ss field names that are also the network_args keys; 'field:key' where they differ."""
    return tuple(tuple(n.split(":")) if ":" in n else (n, n) for n in names)


_DROPOUTS = _f("rank_dropout", "module_dropout")
_LYCO_LOW_RANK = _f("LyCORIS_preset:preset", "conv_dim", "conv_alpha", "use_tucker", "rank_dropout", "bypass_mode",
                    "dora_wd", "module_dropout", "use_scalar", "rank_dropout_scale", "train_norm")

KOHYA_LORA_TYPES: dict[str, LoraType] = {
    "Standard": LoraType(None, fields=_DROPOUTS, skip_unset=True),
    "Kohya LoCon": LoraType(None, fields=_DROPOUTS + _f("conv_dim", "conv_alpha"), skip_unset=True),
    "Flux1": LoraType(None, fields=_DROPOUTS, skip_unset=True),
    "LoCon": LoraType(LYCORIS, ("algo=locon",), _LYCO_LOW_RANK),
    "LyCORIS/LoCon": LoraType(LYCORIS, ("algo=locon",), _LYCO_LOW_RANK),
    "LyCORIS/LoHa": LoraType(LYCORIS, ("algo=loha",), _LYCO_LOW_RANK),
    "LyCORIS/LoKr": LoraType(LYCORIS, ("algo=lokr",), _f(
        "LyCORIS_preset:preset", "conv_dim", "conv_alpha", "use_tucker", "rank_dropout", "bypass_mode", "dora_wd",
        "module_dropout", "factor", "use_cp", "use_scalar", "decompose_both", "rank_dropout_scale", "train_norm")),
    "LyCORIS/iA3": LoraType(LYCORIS, ("algo=ia3",), _f("LyCORIS_preset:preset", "conv_dim", "conv_alpha",
                                                      "train_on_input")),
    "LyCORIS/GLoRA": LoraType(LYCORIS, ("algo=glora",), _f(
        "LyCORIS_preset:preset", "conv_dim", "conv_alpha", "use_tucker", "rank_dropout", "module_dropout",
        "rank_dropout_scale", "train_norm")),
    "LyCORIS/Diag-OFT": LoraType(LYCORIS, ("algo=diag-oft",), _f(
        "LyCORIS_preset:preset", "conv_dim", "conv_alpha", "module_dropout", "use_tucker", "rank_dropout",
        "rank_dropout_scale", "constrain:constraint", "rescaled", "train_norm")),
    "LyCORIS/BOFT": LoraType(LYCORIS, ("algo=boft",), _f(
        "LyCORIS_preset:preset", "conv_dim", "conv_alpha", "module_dropout", "use_tucker", "rank_dropout",
        "rank_dropout_scale", "train_norm")),
    "LyCORIS/DyLoRA": LoraType(LYCORIS, ("algo=dylora",), _f(
        "LyCORIS_preset:preset", "conv_dim", "conv_alpha", "use_tucker", "unit:block_size", "rank_dropout",
        "module_dropout", "train_norm")),
    "LyCORIS/Native Fine-Tuning": LoraType(LYCORIS, ("algo=full",), _f(
        "LyCORIS_preset:preset", "rank_dropout", "module_dropout", "rank_dropout_scale", "train_norm")),
    "Kohya LoHa": LoraType("networks.loha", fields=_f("conv_dim", "conv_alpha", "use_tucker") + _DROPOUTS,
                           skip_unset=True),
    "Kohya LoKr": LoraType("networks.lokr", fields=_f("conv_dim", "conv_alpha", "use_tucker", "factor") + _DROPOUTS,
                           skip_unset=True),
}

#: kohya_ss types we do not train, with the reason
REFUSED_LORA_TYPES: dict[str, str] = {
    "Kohya DyLoRA": "sd-scripts' networks.dylora is not implemented here; LyCORIS/DyLoRA trains DyLoRA",
    "LoRA-FA": "sd-scripts' networks.lora_fa is not implemented here",
    "Flux1 OFT": "sd-scripts' networks.oft_flux is not implemented here",
    "HunyuanImage-2.1": "HunyuanImage-2.1 models are not supported",
    "Anima": "Anima models are not supported",
    "Lumina": "Lumina models are not supported",
}

#: kohya_ss widget fields that only ever become network_args (never a training option of their own)
NETWORK_ARG_FIELDS = frozenset(f for t in KOHYA_LORA_TYPES.values() for f, _ in t.fields) | {"unit"}


def _value(raw: Any) -> str:
    if isinstance(raw, bool):
        return str(raw)
    if isinstance(raw, float) and raw.is_integer():
        return str(int(raw))
    return str(raw)


def _unset(field_name: str, raw: Any) -> bool:
    if raw in (None, "", False):
        return True
    if field_name == "factor":
        return str(raw).strip() in ("-1", "-1.0")
    try:
        return float(raw) == 0
    except (TypeError, ValueError):
        return False


def network_for(lora_type: str, data: dict[str, Any]) -> tuple[str | None, list[str], list[str]]:
    """(network_module or None for the family's own LoRA, network_args, the config fields used) of a kohya_ss config.
    KeyError: a type that is not in KOHYA_LORA_TYPES (see REFUSED_LORA_TYPES)."""
    spec = KOHYA_LORA_TYPES[lora_type]
    args = list(spec.fixed)
    used = []
    for field_name, key in spec.fields:
        if field_name not in data:
            continue
        raw = data[field_name]
        if spec.skip_unset and _unset(field_name, raw):
            continue
        if raw is None or raw == "":
            continue
        used.append(field_name)
        args.append(f"{key}={_value(raw)}")
    return spec.network_module, args, used


def refusal(lora_type: str) -> str:
    reason = REFUSED_LORA_TYPES.get(lora_type, "kohya_ss has no such type")
    return f"LoRA_type {lora_type!r} is not supported ({reason}); supported: {', '.join(KOHYA_LORA_TYPES)}"
