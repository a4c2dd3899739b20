"""Resolve a `network_module` option value (sd-scripts spelling) to the module implementing it."""
from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import NetworkError

NETWORK_MODULES: dict[str, str] = {
    "networks.lora": "sd_scripts.networks.lora",
    "sd_scripts.networks.lora": "sd_scripts.networks.lora",
}


def resolve_network_module(name: str) -> ModuleType:
    """'networks.lora' (as sd-scripts command lines say) or 'sd_scripts.networks.lora' -> our LoRA module."""
    target = NETWORK_MODULES.get(str(name).strip())
    if target is None:
        raise NetworkError(f"option 'network_module': {name!r} is not supported; use one of "
                           f"{', '.join(sorted(NETWORK_MODULES))}")
    return importlib.import_module(target)
