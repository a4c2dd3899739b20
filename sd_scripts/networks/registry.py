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
    from ..families import option_choices

    # a family's sd-scripts module name (FamilySpec.option_values['network_module']) is this network too: the
    # family tells it its layers and names
    known = dict(NETWORK_MODULES, **{alias: NETWORK_MODULES["networks.lora"]
                                     for alias in option_choices("network_module")})
    target = known.get(str(name).strip())
    if target is None:
        raise NetworkError(f"option 'network_module': {name!r} is not supported; use one of "
                           f"{', '.join(sorted(known))}")
    return importlib.import_module(target)
