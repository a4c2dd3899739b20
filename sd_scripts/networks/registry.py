"""Resolve a `network_module` option value (sd-scripts spelling) to the module implementing it (torch-free).

A network module exposes `create_network(*, unet, text_encoders, family, network_dim, network_alpha,
network_dropout, network_args, multiplier, train_unet, train_text_encoder)` and `create_network_from_weights(path, *,
unet, text_encoders, family, multiplier, train_unet, train_text_encoder)`; the network they return has `apply_to()`,
`prepare_optimizer_params(unet_lr, text_encoder_lr, default_lr)`, `load_weights(path)`, `set_multiplier(m)` and
`save_weights(path, dtype, metadata)`. A new adapter is its module plus one line below.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import NetworkError

#: network_module as sd-scripts / kohya_ss command lines say it -> our module
NETWORK_MODULES: dict[str, str] = {
    "networks.lora": "sd_scripts.networks.lora",
    "networks.loha": "sd_scripts.networks.loha",
    "networks.lokr": "sd_scripts.networks.lokr",
    "lycoris.kohya": "sd_scripts.networks.lycoris_kohya",
}
_OWN_PREFIX = "sd_scripts."


def network_module_names() -> tuple[str, ...]:
    """Every accepted spelling: sd-scripts' ('networks.loha') and our package path ('sd_scripts.networks.loha')."""
    return (*NETWORK_MODULES, *(_OWN_PREFIX + n for n in NETWORK_MODULES if n.startswith("networks.")))


def _known() -> dict[str, str]:
    from ..families import option_choices

    known = dict(NETWORK_MODULES)
    known.update({_OWN_PREFIX + n: t for n, t in NETWORK_MODULES.items() if n.startswith("networks.")})
    # a family's sd-scripts module name (FamilySpec.option_values['network_module']) is our LoRA network: the family
    # tells it its layers and names
    known.update({alias: NETWORK_MODULES["networks.lora"] for alias in option_choices("network_module")})
    return known


def canonical_network_module(name: str) -> str:
    """The name files record in ss_network_module: sd-scripts' spelling ('sd_scripts.networks.lora' ->
    'networks.lora'; 'lycoris.kohya' stays)."""
    name = str(name).strip()
    if name.startswith(_OWN_PREFIX) and name[len(_OWN_PREFIX):] in NETWORK_MODULES:
        return name[len(_OWN_PREFIX):]
    return name


def resolve_network_module(name: str) -> ModuleType:
    """'networks.lora' (as sd-scripts command lines say) or 'sd_scripts.networks.lora' -> our module."""
    known = _known()
    target = known.get(str(name).strip())
    if target is None:
        raise NetworkError(f"option 'network_module': {name!r} is not supported; use one of "
                           f"{', '.join(sorted(known))}")
    return importlib.import_module(target)
