"""`--network_module lycoris.kohya`: LyCORIS adapters (LoCon, LoHa, LoKr, IA3, GLoRA, Diag-OFT, BOFT, DyLoRA, full)
made by the lycoris-lora library, with the network_args kohya_ss passes (algo=, preset=, conv_dim, factor, ...).

lycoris' own `lycoris.kohya.create_network` chooses the layers (its presets) and builds the modules; we only
- hand it a preset it can apply to a diffusers U-Net: lycoris 4's `full` preset targets the `TimestepEmbedding`
  class (for another model) AND the names `time_embedding.linear_1/2`, so on a diffusers U-Net the same layers are
  made twice ("duplicated lora name: lora_unet_time_embedding_linear_1"). A preset's target class whose layers the
  preset also targets by name is left out (the name targets keep them: the layers lycoris 3, which kohya_ss pins,
  adapted). Module options that `create_network` does not forward (`train_on_input`, `rank_dropout_scale`) reach the
  modules through the preset's per-class options;
- type the network_args (lycoris reads the text 'False' as true);
- name the modules as the family's files do (SDXL's SAI paths, CLIP's `text_model.`), and keep them in an
  AdapterNetwork (saving atomically with our metadata).
DiT families (FLUX.1 / Chroma, SD3: their LoRA layout fuses q/k/v into one layer, which one-module-per-layer LyCORIS
files cannot express) get LyCORIS' own naming: `lycoris_` + the diffusers module path of every layer in the family's
LoRA target blocks (lycoris' presets name BFL / SAI block classes, not diffusers'), as SimpleTuner writes and
ComfyUI reads for FLUX.1, and as lycoris' generic loader (`lycoris.wrapper.create_lycoris_from_weights`) loads;
text encoders keep the family's `lora_te*_` names.
"""
from __future__ import annotations

import os
import re
import tempfile
from fnmatch import fnmatch
from typing import Any, Sequence

from torch import nn

from ..errors import NetworkError
from .adapter_network import (BOOL, AdapterNetwork, LayerNames, network_from_file, parse_typed_args, rename_modules,
                              split_parts)

MODULE = "lycoris.kohya"
ALGOS = ("lora", "locon", "loha", "lokr", "ia3", "glora", "diag-oft", "boft", "dylora", "full")
#: network_args of lycoris.kohya (kohya_ss writes: algo, preset, conv_dim, conv_alpha, use_tucker/use_cp, use_scalar,
#: rank_dropout, module_dropout, rank_dropout_scale, train_norm, factor, decompose_both, bypass_mode, dora_wd,
#: constraint, rescaled, block_size, train_on_input)
NETWORK_ARG_TYPES: dict[str, Any] = {
    "algo": str, "preset": str, "conv_dim": int, "conv_alpha": float, "dropout": float, "rank_dropout": float,
    "module_dropout": float, "use_tucker": BOOL, "use_cp": BOOL, "use_conv_cp": BOOL, "disable_conv_cp": BOOL,
    "use_scalar": BOOL, "rank_dropout_scale": BOOL, "train_norm": BOOL, "decompose_both": BOOL, "factor": int,
    "block_size": int, "constraint": float, "rescaled": BOOL, "dora_wd": BOOL, "wd_on_output": BOOL,
    "full_matrix": BOOL, "bypass_mode": BOOL, "rs_lora": BOOL, "unbalanced_factorization": BOOL,
    "train_on_input": BOOL,
}
#: module options create_network does not forward: given to every adapted layer class through the preset
_MODULE_ONLY_OPTIONS = ("train_on_input", "rank_dropout_scale")
_LAYER_CLASSES = ("Linear", "Conv1d", "Conv2d", "Conv3d")
_CLASS_PRESET_ATTRS = ("ENABLE_CONV", "UNET_TARGET_REPLACE_MODULE", "UNET_TARGET_REPLACE_NAME",
                       "TEXT_ENCODER_TARGET_REPLACE_MODULE", "TEXT_ENCODER_TARGET_REPLACE_NAME", "MODULE_ALGO_MAP",
                       "NAME_ALGO_MAP", "USE_FNMATCH", "TARGET_EXCLUDE_NAME")
_PRESET_KEYS = ("enable_conv", "unet_target_module", "unet_target_name", "text_encoder_target_module",
                "text_encoder_target_name", "module_algo_map", "name_algo_map", "use_fnmatch", "exclude_name")


def parse_args(network_args: Sequence[str] | dict[str, Any] | None) -> dict[str, Any]:
    args = parse_typed_args(network_args, NETWORK_ARG_TYPES, MODULE)
    algo = (args.get("algo") or "lora").lower()
    if algo not in ALGOS:
        raise NetworkError(f"option 'network_args': algo={algo!r} is not a LyCORIS algo; use one of "
                           f"{', '.join(ALGOS)}")
    args["algo"] = algo
    return args


def load_preset(name: str | None) -> dict[str, Any]:
    """A built-in lycoris preset by name or a preset TOML file (kohya_ss: 'path_to_config_file.toml'), as a dict
    with every preset key (lycoris applies presets to class attributes: a key left out would keep the last run's)."""
    from lycoris.config import PRESET
    from lycoris.utils.preset import read_preset

    name = name or "full"
    if name in PRESET:
        preset = dict(PRESET[name])
    else:
        if not os.path.isfile(name):
            raise NetworkError(f"option 'network_args': preset={name!r} is neither a LyCORIS preset "
                               f"({', '.join(PRESET)}) nor an existing preset .toml file")
        preset = read_preset(name)
        if preset is None:
            raise NetworkError(f"option 'network_args': preset file {name!r} is not a valid LyCORIS preset TOML")
    defaults = {"enable_conv": True, "unet_target_module": [], "unet_target_name": [],
                "text_encoder_target_module": [], "text_encoder_target_name": [], "module_algo_map": {},
                "name_algo_map": {}, "use_fnmatch": False, "exclude_name": []}
    return {key: preset.get(key, defaults[key]) for key in _PRESET_KEYS}


def _is_file(preset: str | None) -> bool:
    from lycoris.config import PRESET

    return bool(preset) and preset not in PRESET


def _matches(pattern: str, name: str, use_fnmatch: bool) -> bool:
    return fnmatch(name, pattern) if use_fnmatch else re.match(pattern, name) is not None


def classes_named_twice(root: nn.Module | None, target_classes: Sequence[str], target_names: Sequence[str],
                        use_fnmatch: bool = False) -> set[str]:
    """Target classes some of whose layers in `root` the preset also targets by module path (lycoris would make two
    modules of one name for them)."""
    if root is None or not target_names:
        return set()
    paths = [p for p, _ in root.named_modules() if p]
    named = {p for p in paths if any(p == t or _matches(t, p, use_fnmatch) for t in target_names)}
    twice = set()
    for path, module in root.named_modules():
        cls = type(module).__name__
        if path and cls in target_classes and cls not in twice:
            if any(p == path or p.startswith(path + ".") for p in named):
                twice.add(cls)
    return twice


def effective_preset(preset: dict[str, Any], unet: nn.Module | None, text_encoders: Sequence[nn.Module],
                     module_options: dict[str, Any]) -> dict[str, Any]:
    """The preset lycoris is given: target classes also named by path left out, module-only options added to
    every layer class's options (the preset's own per-class options win)."""
    out = {k: (list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v) for k, v in preset.items()}
    fn = bool(out["use_fnmatch"])
    for part, roots in (("unet", [unet]), ("text_encoder", list(text_encoders))):
        classes, names = out[f"{part}_target_module"], out[f"{part}_target_name"]
        twice = set().union(*(classes_named_twice(r, classes, names, fn) for r in roots))
        out[f"{part}_target_module"] = [c for c in classes if c not in twice]
    if module_options:
        algo_map = out["module_algo_map"]
        for cls in _LAYER_CLASSES:
            algo_map[cls] = {**module_options, **algo_map.get(cls, {})}
    return out


LYCORIS_PREFIX = "lycoris"  # lycoris' own (non-kohya) module-name prefix


def lycoris_naming(naming: dict[str, Any]) -> dict[str, Any]:
    """The family's LoRA naming, or for a family with its own target blocks (a DiT whose LoRA layout fuses layers)
    lycoris' native names for the denoiser: `lycoris_<diffusers path>`."""
    if naming.get("unet_block_classes") is None:
        return naming
    return dict(naming, unet_prefix=LYCORIS_PREFIX, unet_name_map=None)


def _create_with_lycoris(unet, text_encoders, network_dim, network_alpha, multiplier, args, preset) -> list[nn.Module]:
    import lycoris.kohya as lycoris_kohya

    kwargs = {k: v for k, v in args.items() if v is not None and k not in _MODULE_ONLY_OPTIONS and k != "preset"}
    # lycoris applies a preset to its network class's attributes: put them back afterwards, so nothing else in this
    # process (another network, lycoris' own loader) runs with our preset
    cls = lycoris_kohya.LycorisNetworkKohya
    saved = {k: getattr(cls, k) for k in _CLASS_PRESET_ATTRS}
    try:
        return _create_in(lycoris_kohya, unet, text_encoders, network_dim, network_alpha, multiplier, kwargs, preset)
    finally:
        for key, value in saved.items():
            setattr(cls, key, value)


def _create_in(lycoris_kohya, unet, text_encoders, network_dim, network_alpha, multiplier, kwargs, preset):
    import toml

    with tempfile.TemporaryDirectory(prefix="lycoris_preset_") as folder:
        preset_path = os.path.join(folder, "preset.toml")
        with open(preset_path, "w", encoding="utf-8") as f:
            toml.dump(preset, f)
        te_arg = None if not text_encoders else (text_encoders[0] if len(text_encoders) == 1 else list(text_encoders))
        try:
            net = lycoris_kohya.create_network(multiplier, network_dim, network_alpha, None, te_arg, unet,
                                               warn_on_unmatched=False, preset=preset_path, **kwargs)
        except (AssertionError, ValueError, TypeError) as e:
            raise NetworkError(f"{MODULE}: lycoris-lora could not build the network ({e}); check network_args") \
                from None
    return list(net.text_encoder_loras) + list(net.unet_loras)


def create_network(*, unet: nn.Module | None, text_encoders: Sequence[nn.Module], family: str,
                   network_dim: int | None, network_alpha: float | None, network_dropout: float | None = None,
                   network_args: Sequence[str] | dict[str, Any] | None = None, multiplier: float = 1.0,
                   train_unet: bool = True, train_text_encoder: bool = True) -> AdapterNetwork:
    """A new LyCORIS network (defaults as lycoris.kohya: rank 4, conv_dim = network_dim, preset full)."""
    from .lora import family_naming

    args = parse_args(network_args)
    if network_dropout is not None and args.get("dropout") is None:
        args["dropout"] = network_dropout  # sd-scripts hands --network_dropout to lycoris as neuron dropout
    naming = family_naming(family, unet)
    enabled = list(naming.get("te_enabled") or [True] * len(text_encoders))
    tes = [te for te, on in zip(text_encoders, enabled) if te is not None and on] if train_text_encoder else []
    unet_arg = unet if train_unet else None
    preset = load_preset(args.get("preset"))
    own_blocks = naming.get("unet_block_classes")
    if own_blocks is not None and not _is_file(args.get("preset")):
        # a built-in preset names BFL / SAI / other models' classes: the family's own LoRA target blocks instead
        preset["unet_target_module"], preset["unet_target_name"] = list(own_blocks), []
    naming = lycoris_naming(naming)
    preset = effective_preset(preset, unet_arg, tes,
                              {k: args[k] for k in _MODULE_ONLY_OPTIONS if args.get(k) is not None})
    if unet_arg is None:
        preset["unet_target_module"], preset["unet_target_name"] = [], []
    modules = _create_with_lycoris(unet_arg if unet_arg is not None else nn.Module(), tes,
                                   4 if network_dim is None else network_dim,
                                   1.0 if network_alpha is None else network_alpha, multiplier, args, preset)
    names = LayerNames(unet, text_encoders, naming)
    te_loras, unet_loras = split_parts(rename_modules(modules, names), names)
    return AdapterNetwork(te_loras, unet_loras, multiplier=multiplier, module=MODULE)


def create_network_from_weights(path: str | os.PathLike, *, unet: nn.Module | None,
                                text_encoders: Sequence[nn.Module], family: str, multiplier: float = 1.0,
                                train_unet: bool = True, train_text_encoder: bool = True) -> AdapterNetwork:
    """A network shaped like a LyCORIS-format file (algo, ranks and layers from its tensors), weights loaded."""
    return network_from_file(path, unet=unet, text_encoders=text_encoders, family=family, multiplier=multiplier,
                             module=MODULE, train_unet=train_unet, train_text_encoder=train_text_encoder,
                             naming=lycoris_naming)
