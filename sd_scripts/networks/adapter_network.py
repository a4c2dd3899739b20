"""A network of LyCORIS-library adapter modules (LoHa, LoKr, LoCon, IA3, OFT, ...) on a frozen base model.

The maths of each adapter is lycoris-lora's (`lycoris.modules`); this module only holds the modules under their file
names, so that `state_dict()` is the file (LyCORIS key format: `<name>.hada_w1_a`, `<name>.lokr_w1`, ...), and gives
them the interface the training method uses (the same as networks/lora.py's LoRANetwork: apply_to,
prepare_optimizer_params, save_weights, load_weights, set_multiplier). Both `networks.loha` / `networks.lokr` (our
targets) and `lycoris.kohya` (lycoris' own targets and presets) build one.

File names follow the family's LoRA naming (FORMATS.md 'LoRA file'): `lora_unet_` / `lora_te*_` + the layer's path in
the layout users' tools expect (e.g. SDXL's SAI paths), so files load in lycoris' loader, ComfyUI and A1111.
"""
from __future__ import annotations

import ast
import os
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from ..errors import NetworkError
from .targets import SWAP_HALVES, lora_name, text_encoder_name_map
from .weights_file import load_weights_file, save_weights_file


# ---- network_args
def _bool(value: Any) -> bool:
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off", "none", ""):
        return False
    raise ValueError(value)


def _pattern_list(value: Any) -> list[str]:
    """exclude_patterns / include_patterns: a Python list literal of regular expressions, or one expression."""
    text = str(value).strip()
    try:
        parsed = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        parsed = text
    items = parsed if isinstance(parsed, (list, tuple)) else [parsed]
    if not all(isinstance(p, str) for p in items):
        raise ValueError(value)
    return list(items)


BOOL, PATTERNS = _bool, _pattern_list


def parse_typed_args(network_args: Sequence[str] | dict[str, Any] | None, types: dict[str, Callable[[Any], Any]],
                     module: str) -> dict[str, Any]:
    """['factor=4', 'use_tucker=True'] -> {'factor': 4, 'use_tucker': True}: every key must be in `types`; a value
    that does not convert is an error naming the key (never a silently different setting)."""
    items: Iterable[tuple[str, Any]]
    if isinstance(network_args, dict):
        items = network_args.items()
    else:
        pairs = []
        for item in network_args or []:
            if "=" not in item:
                raise NetworkError(f"option 'network_args': {item!r} is not key=value (e.g. conv_dim=4)")
            key, value = item.split("=", 1)
            pairs.append((key.strip(), value.strip().strip('"').strip("'")))
        items = pairs
    out: dict[str, Any] = {}
    for key, value in items:
        if key not in types:
            raise NetworkError(f"option 'network_args': {key!r} is not a setting of {module}; supported: "
                               f"{', '.join(sorted(types))}")
        if value is None or (types[key] is not BOOL and str(value).strip().lower() in ("", "none")):
            out[key] = None
            continue
        try:
            out[key] = types[key](value)
        except (TypeError, ValueError):
            kind = {BOOL: "True or False", PATTERNS: "a list of regular expressions"}.get(
                types[key], getattr(types[key], "__name__", "valid value"))
            raise NetworkError(f"option 'network_args': {key}={value!r} for {module} is not {kind}") from None
    return out


# ---- file names of layers
class LayerNames:
    """The file name (`lora_unet_...`, `lora_te1_...`) of each layer of a denoiser and its text encoders, from the
    family's LoRA naming (Family.lora_naming: prefixes, unet_name_map, te_enabled)."""

    def __init__(self, unet: nn.Module | None, text_encoders: Sequence[nn.Module | None], naming: dict[str, Any],
                 family_label: str = "this model"):
        self._names: dict[int, str | None] = {}
        self._parts: dict[int, str] = {}  # id -> 'unet' / 'te'
        self._family_label = family_label
        name_map = naming.get("unet_name_map")
        if unet is not None:
            for path, module in _layers(unet):
                file_path = name_map(path) if name_map else path
                if isinstance(file_path, tuple):  # fused with other layers, or stored with its halves swapped
                    kind = "stores this layer's output halves swapped" if file_path[1:] == (SWAP_HALVES,) \
                        else "fuses this layer with others into one module"
                    self._names[id(module)] = NetworkError(
                        f"{path}: {family_label}'s LoRA file layout {kind}, which LyCORIS-format modules (one "
                        f"module per layer) cannot express: use this family's own network_module (LoRA)")
                    continue
                self._names[id(module)] = None if file_path is None else lora_name(naming["unet_prefix"], file_path)
                self._parts[id(module)] = "unet"
        prefixes = list(naming["te_prefixes"])
        for te, prefix in zip(text_encoders, prefixes):
            if te is None:
                continue
            te_map = text_encoder_name_map(te)
            for path, module in _layers(te):
                self._names.setdefault(id(module), lora_name(prefix, te_map(path) if te_map else path))
                self._parts.setdefault(id(module), "te")

    def name(self, layer: nn.Module) -> str | None:
        """The layer's file name; None when the family leaves it out; NetworkError when no file can name it."""
        name = self._names.get(id(layer))
        if isinstance(name, NetworkError):
            raise name
        return name

    def part(self, layer: nn.Module) -> str | None:
        return self._parts.get(id(layer))

    def layers_by_name(self, roots: Iterable[nn.Module | None]) -> dict[str, nn.Module]:
        """file name -> layer, for every nameable layer under `roots`."""
        out = {}
        for root in roots:
            if root is None:
                continue
            for _, module in _layers(root):
                name = self._names.get(id(module))
                if isinstance(name, str):
                    out.setdefault(name, module)
        return out


def _layers(root: nn.Module):
    """(path, module) of every module under root, once each; a module registered under two names keeps the one
    users' files use (diffusers' samplers hold their conv as both `conv` and `Conv2d_0`: files say `conv`)."""
    seen: dict[int, str] = {}
    modules: dict[int, nn.Module] = {}
    for path, module in root.named_modules(remove_duplicate=False):
        if not path:
            continue
        if id(module) not in seen or seen[id(module)].endswith("Conv2d_0"):
            seen[id(module)] = path
            modules[id(module)] = module
    return [(seen[k], modules[k]) for k in seen]


# ---- the network
class AdapterNetwork(nn.Module):
    """LyCORIS-library modules registered under their file names. Building it changes nothing in the base model;
    `apply_to()` routes each wrapped layer's forward through its module."""

    def __init__(self, text_encoder_loras: Sequence[nn.Module], unet_loras: Sequence[nn.Module], *,
                 multiplier: float = 1.0, module: str):
        super().__init__()
        self.module_name = module
        self.text_encoder_loras = list(text_encoder_loras)
        self.unet_loras = list(unet_loras)
        if not self.text_encoder_loras and not self.unet_loras:
            raise NetworkError(f"{module}: no layer of this model is adapted: check network_args (preset, "
                               f"conv_dim, include/exclude patterns) and network_train_*_only")
        for lora in self.all_loras():
            if lora.lora_name in self._modules:
                raise NetworkError(f"{module}: two layers have the file name {lora.lora_name!r}")
            self.add_module(lora.lora_name, lora)
        self.set_multiplier(multiplier)

    def all_loras(self) -> list[nn.Module]:
        return self.text_encoder_loras + self.unet_loras

    def apply_to(self) -> None:
        for lora in self.all_loras():
            lora.apply_to()

    def unapply(self) -> None:
        for lora in reversed(self.all_loras()):
            lora.restore()

    def set_multiplier(self, multiplier: float | Sequence[float] | torch.Tensor) -> None:
        if not isinstance(multiplier, (int, float)):
            values = torch.as_tensor(multiplier, dtype=torch.float32).flatten()
            if values.numel() and not torch.all(values == values[0]):
                raise NetworkError(f"{self.module_name}: per-sample network_multiplier values are not supported by "
                                   f"LyCORIS modules; use one multiplier for all datasets")
            multiplier = float(values[0]) if values.numel() else 1.0
        self.multiplier = float(multiplier)
        for lora in self.all_loras():
            lora.multiplier = self.multiplier

    def prepare_optimizer_params(self, unet_lr: float | None, text_encoder_lr: float | Sequence[float] | None,
                                 default_lr: float) -> tuple[list[dict[str, Any]], list[str]]:
        """Parameter groups ('unet', 'textencoder') with their learning rates; empty parts are left out. One
        text-encoder rate (a list of several different rates is for networks.lora)."""
        if isinstance(text_encoder_lr, (list, tuple)):
            if len(set(text_encoder_lr)) > 1:
                raise NetworkError(f"option 'text_encoder_lr': {list(text_encoder_lr)} gives each text encoder its "
                                   f"own rate, which this network type does not do: give one value")
            text_encoder_lr = text_encoder_lr[0] if text_encoder_lr else None
        groups: list[dict[str, Any]] = []
        names: list[str] = []
        for loras, lr, name in ((self.unet_loras, unet_lr, "unet"),
                                (self.text_encoder_loras, text_encoder_lr, "textencoder")):
            params = [p for lora in loras for p in lora.parameters() if p.requires_grad]
            if params:
                groups.append({"params": params, "lr": default_lr if lr is None else lr})
                names.append(name)
        return groups, names

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.state_dict().items()}

    def save_weights(self, path: str | os.PathLike, dtype: torch.dtype | None = None,
                     metadata: dict[str, str] | None = None) -> None:
        tensors = {k: (v.to("cpu", dtype) if dtype is not None and v.is_floating_point() else v.to("cpu"))
                   .contiguous() for k, v in self.lora_state_dict().items()}
        save_weights_file(tensors, path, metadata)

    def load_weights(self, path: str | os.PathLike):
        """Load a LyCORIS-format file made for this network's shape (same algo, ranks and targets)."""
        tensors, _ = load_weights_file(path)
        own = self.state_dict()
        matched = {k: v for k, v in tensors.items() if k in own}
        if not any(not k.endswith(".alpha") for k in matched):  # alphas alone: another algo's file
            raise NetworkError(f"{path}: none of its {len(tensors)} tensors belongs to this {self.module_name} "
                               f"network: the file was made with another algo, model family or targets")
        for key, value in matched.items():
            if tuple(value.shape) != tuple(own[key].shape):
                raise NetworkError(f"{path}: {key} has shape {list(value.shape)} but this network needs "
                                   f"{list(own[key].shape)}: use the same network_dim / conv_dim / network_args "
                                   f"as the file, or dim_from_weights")
        return self.load_state_dict(matched, strict=False)


# ---- building
def rename_modules(modules: Iterable[nn.Module], names: LayerNames) -> list[nn.Module]:
    """Give each library-made module the file name of the layer it wraps (modules of layers the family leaves out
    are dropped)."""
    out = []
    for module in modules:
        name = names.name(module.org_module[0])
        if name is not None:
            module.lora_name = name
            out.append(module)
    return out


def split_parts(modules: Iterable[nn.Module], names: LayerNames) -> tuple[list[nn.Module], list[nn.Module]]:
    te, unet = [], []
    for module in modules:
        (unet if names.part(module.org_module[0]) == "unet" else te).append(module)
    return te, unet


def modules_from_file(path: str | os.PathLike, names: LayerNames, roots: Sequence[nn.Module | None], *,
                      multiplier: float, module: str, parts: Sequence[str] = ("unet", "te")) -> list[nn.Module]:
    """One lycoris-library module per module of a LyCORIS-format file (lycoris.modules.get_module / make_module
    decide the algo and shapes from the tensors), on the layers under `roots` the file's names point at; only the
    `parts` ('unet', 'te') being trained."""
    from lycoris.modules import get_module, make_module

    tensors, _ = load_weights_file(path)
    file_names = sorted({k.split(".", 1)[0] for k in tensors if "." in k})
    layers = names.layers_by_name(roots)
    unknown = [n for n in file_names if n not in layers]
    if unknown:
        raise NetworkError(f"{path}: {len(unknown)} modules (e.g. {unknown[0]!r}) have no matching layer in this "
                           f"model: the file was made for another model family or layout")
    out = []
    for name in file_names:
        if names.part(layers[name]) not in parts:
            continue
        kind, params = get_module(tensors, name)
        if kind is not None and kind.__name__ == "IA3Module":
            made = _ia3_from_tensors(kind, name, layers[name], *params)
        else:
            made = make_module(kind, params, name, layers[name]) if kind is not None else None
        if made is None:
            raise NetworkError(f"{path}: {name} is not a module lycoris-lora can load ({module})")
        made.multiplier = multiplier
        out.append(made)
    if not out:
        raise NetworkError(f"{path}: has no modules for the part being trained (network_train_unet_only / "
                           f"network_train_text_encoder_only)")
    return out


def _ia3_from_tensors(kind, name: str, layer: nn.Module, weight: torch.Tensor, on_input: torch.Tensor | None):
    """lycoris-lora 4.1.3's IA3Module.make_module_from_state_dict takes the weight only (its loader passes the
    `on_input` flag too and fails) and always builds an output-side module: build it with the file's side."""
    made = kind(name, layer, 1.0, train_on_input=bool(on_input is not None and int(on_input)))
    with torch.no_grad():
        made.weight.copy_(weight.to(made.weight.dtype))
    return made


def network_on_targets(*, unet: nn.Module | None, text_encoders: Sequence[nn.Module], family: str,
                       network_dim: int | None, network_alpha: float | None, conv_dim: int | None,
                       conv_alpha: float | None, make: Callable[..., nn.Module], multiplier: float, module: str,
                       train_unet: bool = True, train_text_encoder: bool = True,
                       exclude_patterns: Sequence[str] | None = None,
                       include_patterns: Sequence[str] | None = None) -> AdapterNetwork:
    """The layers networks.lora adapts (targets.py: transformer blocks and text-encoder attention/MLP; with conv_dim
    also ResNet blocks and samplers), one `make(lora_name, layer, rank, alpha)` module each. Patterns (sd-scripts'
    exclude_patterns / include_patterns) are full matches on the layer's path in the file's layout; an included path
    is kept even when excluded."""
    import re

    from .lora import family_naming
    from .targets import text_encoder_targets, unet_targets

    naming = family_naming(family, unet)
    block_classes = naming.get("unet_block_classes")
    if block_classes is not None and unet is not None and any(
            t.part is not None or t.swap_halves
            for t in unet_targets(unet, naming["unet_prefix"], name_map=naming.get("unet_name_map"),
                                  block_classes=block_classes)):
        raise NetworkError(f"{module}: this model family's LoRA file layout fuses several layers into one module "
                           f"(e.g. qkv), which LyCORIS-format files cannot express; use the family's own "
                           f"network_module")
    dim = 4 if network_dim is None else int(network_dim)
    alpha = 1.0 if network_alpha is None else float(network_alpha)
    if conv_dim is not None and conv_alpha is None:
        conv_alpha = 1.0
    try:
        excludes = [re.compile(p) for p in exclude_patterns or []]
        includes = [re.compile(p) for p in include_patterns or []]
    except re.error as e:
        raise NetworkError(f"option 'network_args': exclude_patterns / include_patterns: invalid regular expression "
                           f"({e})") from None

    def kept(file_path: str) -> bool:
        return not any(p.fullmatch(file_path) for p in excludes) or any(p.fullmatch(file_path) for p in includes)

    def build(targets, prefix: str, path_of) -> list[nn.Module]:
        out = []
        for target in targets:
            if not kept(path_of(target.module_path)):
                continue
            if target.is_conv_kxk:
                rank, a = conv_dim, conv_alpha
            else:
                rank, a = dim, alpha
            if rank:
                out.append(make(target.lora_name, target.module, rank, a))
        return out

    te_loras: list[nn.Module] = []
    if train_text_encoder:
        enabled = list(naming.get("te_enabled") or [True] * len(text_encoders))
        for te, prefix, on in zip(text_encoders, naming["te_prefixes"], enabled):
            if te is not None and on:
                te_map = text_encoder_name_map(te)
                te_loras += build(text_encoder_targets(te, prefix, naming.get("te_block_classes")), prefix,
                                  te_map or (lambda p: p))
    unet_loras: list[nn.Module] = []
    if unet is not None and train_unet:
        name_map = naming.get("unet_name_map") or (lambda p: p)
        targets = unet_targets(unet, naming["unet_prefix"], include_conv=conv_dim is not None,
                               name_map=naming.get("unet_name_map"), block_classes=block_classes)
        unet_loras = build(targets, naming["unet_prefix"], name_map)
    return AdapterNetwork(te_loras, unet_loras, multiplier=multiplier, module=module)


def network_from_file(path: str | os.PathLike, *, unet: nn.Module | None, text_encoders: Sequence[nn.Module],
                      family: str, multiplier: float, module: str, train_unet: bool = True,
                      train_text_encoder: bool = True,
                      naming: Callable[[dict], dict] | None = None) -> AdapterNetwork:
    """A network shaped like a LyCORIS-format file (each module's algo and shapes from its tensors), loaded.
    `naming`: adjusts the family's LoRA naming (lycoris.kohya's names for DiT families)."""
    from .lora import family_naming

    naming_dict = family_naming(family, unet)
    if naming is None and naming_dict.get("unet_file_name_map"):  # every layer a file of the family may name
        naming_dict["unet_name_map"] = naming_dict["unet_file_name_map"]
    naming = naming(naming_dict) if naming else naming_dict
    names = LayerNames(unet, text_encoders, naming)
    parts = (["unet"] if train_unet else []) + (["te"] if train_text_encoder else [])
    modules = modules_from_file(path, names, [unet, *text_encoders], multiplier=multiplier, module=module,
                                parts=parts)
    te_loras, unet_loras = split_parts(modules, names)
    return AdapterNetwork(te_loras, unet_loras, multiplier=multiplier, module=module)
