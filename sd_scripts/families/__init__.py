"""The model-family registry (torch-free): which families exist, their facts, and which family a file or folder is.

A family is one package under `sd_scripts/families/` plus one line in `PACKAGES`. Its `__init__` is torch-free and
provides `SPECS` (one `FamilySpec` per family it registers), `detect_single_file(shapes, metadata)` and
`detect_folder(path)` (each returns a `Detected` or None when the model is not theirs); its `FamilySpec.family_class`
names the torch side (a `sd_scripts.families.base.Family` subclass). Nothing outside a family's package names that
family: the loop, the methods, the GUI and the tools ask this registry. See docs/DEVELOPING.md, "Adding a family".
"""
from __future__ import annotations

import importlib
import json
import os
import struct
from dataclasses import dataclass
from functools import lru_cache
from types import ModuleType
from typing import Mapping

from ..errors import ModelLoadError
from .spec import FamilySpec, MemoryFacts

__all__ = ["FamilySpec", "MemoryFacts", "Detected", "ModelProbe", "all_families", "family_spec", "family_names",
           "family_class", "detect_single_file", "detect_folder", "probe_model", "read_safetensors_header",
           "family_for_script", "tiny_builder", "tiny_variants", "default_family", "guess_family",
           "family_of_path", "families_for_script", "option_choices", "check_run", "tiny_files",
           "script_for", "kohya_ss_owner", "part_file_options"]

#: one line per family package
PACKAGES = (
    "sd_scripts.families.sd",  # SD 1.x, SD 2.x (incl. 768-v), SDXL
    "sd_scripts.families.sd3",  # SD3 medium, SD3.5 medium / large
    "sd_scripts.families.flux",  # FLUX.1 dev / schnell, Chroma
    "sd_scripts.families.lumina",  # Lumina Image 2.0 (Neta Lumina)
    "sd_scripts.families.hunyuan_image",  # HunyuanImage-2.1
    "sd_scripts.families.anima",  # Anima (Cosmos-Predict2 DiT + LLM adapter)
)


@dataclass(frozen=True)
class Detected:
    """What a family package recognised: the family and, where the files tell, whether it predicts v."""

    family: str
    v_prediction: bool | None = None
    variant: str | None = None  # where the files tell (e.g. FLUX.1 schnell): FamilySpec.variant_refused_options


@dataclass(frozen=True)
class ModelProbe:
    """What a path holds, as far as can be told without loading weights. family/v_prediction are None when the
    layout cannot be read without torch (a .ckpt)."""

    layout: str  # 'single_file' | 'diffusers'
    family: str | None
    v_prediction: bool | None
    variant: str | None = None


@lru_cache(maxsize=None)
def _packages() -> tuple[ModuleType, ...]:
    return tuple(importlib.import_module(name) for name in PACKAGES)


@lru_cache(maxsize=None)
def all_families() -> dict[str, FamilySpec]:
    """Every registered family by name, in registry order."""
    specs: dict[str, FamilySpec] = {}
    for package in _packages():
        for spec in package.SPECS:
            if spec.name in specs:
                raise RuntimeError(f"model family {spec.name!r} is registered twice")
            specs[spec.name] = spec
    return specs


def family_names() -> tuple[str, ...]:
    return tuple(all_families())


def family_spec(name: str) -> FamilySpec:
    """The FamilySpec of `name`; ValueError naming the known families otherwise."""
    try:
        return all_families()[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}: expected one of {list(all_families())}") from None


def family_class(name: str):
    """The torch side of a family (imports torch)."""
    return _import(family_spec(name).family_class)


def family_for_script(script: str) -> FamilySpec | None:
    """The family an sd-scripts script name is made for ('sdxl_train_network' -> SDXL); None for generic scripts."""
    return next((s for s in all_families().values() if script in s.scripts), None)


def families_for_script(script: str) -> tuple[str, ...]:
    """Every family an sd-scripts script name is made for (empty for the generic scripts)."""
    return tuple(s.name for s in all_families().values() if script in s.scripts)


def option_choices(option: str) -> tuple:
    """The values a family-specific option takes, over every family that declares them (registry order)."""
    values: list = []
    for spec in all_families().values():
        values += [v for v in spec.option_values.get(option, ()) if v not in values]
    return tuple(values)


def check_run(family: str, *, trainer: str | None, script: str | None, values: Mapping[str, object],
              defaults: Mapping[str, object] | None = None, source: str = "the model",
              variant: str | None = None) -> str | None:
    """Why a run of `script` (trainer kind `trainer`) cannot train a model of `family` with these option values, as
    one line naming the script or option and the fix; None when it can. Torch-free (pre-flight uses it too).

    - a family-made script (flux_train_network, ...) given another family's model;
    - a generic script (train_network, ...) given a model whose family has its own script for that trainer;
    - a trainer the family does not support;
    - an option the family refuses (FamilySpec.refused_options; those of the model's `variant` too, e.g. a
      guidance value for FLUX.1-schnell), or, for strict families, another family's option.
    """
    spec = family_spec(family)
    if script and trainer:
        made_for = families_for_script(script)
        if made_for and family not in made_for:
            labels = " / ".join(family_spec(f).label for f in made_for)
            own = spec.trainer_scripts.get(trainer)
            fix = f"use {own}" if own else "use the generic script of this trainer (e.g. train_network)"
            return f"{source} is a {spec.label} model, but {script} trains {labels} models: {fix}"
        own = spec.trainer_scripts.get(trainer)
        if not made_for and own and own != script:
            return f"{source} is a {spec.label} model: train it with {own} instead of {script}"
    if trainer and trainer not in spec.trainers:
        return f"{spec.label} models cannot be trained with the {trainer} trainer; use one of " \
               f"{', '.join(sorted(spec.trainer_scripts.values()) or sorted(spec.trainers))}"
    defaults = defaults or {}

    def is_set(name: str) -> bool:
        value = values.get(name)
        return value not in (None, False, "", []) and value != defaults.get(name)

    for name, reason in spec.refused_options.items():
        if is_set(name):
            return f"option '{name}' cannot be used with {spec.label} models ({source}): {reason}; remove it"
    for name, reason in spec.variant_refused_options.get(variant or "", {}).items():
        if is_set(name):
            return f"option '{name}' cannot be used with {source}: {reason}; remove it"
    if spec.strict_options:
        from ..options import OPTIONS

        for opt in OPTIONS:
            if opt.family_specific and is_set(opt.name) and not spec.accepts_option(opt.name):
                owners = [s.label for s in all_families().values() if s.accepts_option(opt.name)]
                return (f"option '{opt.name}' is for {' / '.join(owners)} models; {source} is a {spec.label} model: "
                        f"remove it")
    return None


def default_family() -> str:
    """The family assumed when nothing tells (the first registered)."""
    return next(iter(all_families()))


def family_of_path(path: str | None) -> str | None:
    """The family of a model path, torch-free, or None when it cannot be told (missing, .ckpt, unknown)."""
    if not path:
        return None
    try:
        return probe_model(path).family
    except ModelLoadError:
        return None


def variant_of_path(path: str | None) -> str | None:
    """The model variant a path's files tell (Detected.variant), torch-free; None when unknown."""
    if not path:
        return None
    try:
        return probe_model(path).variant
    except ModelLoadError:
        return None


def guess_family(values: Mapping[str, object], kohya_config: Mapping[str, object] | None = None) -> str:
    """The family settings are meant for: the model file's; else a kohya_ss checkbox that names one; else a
    family-specific option that is set (e.g. v2); else the family whose native resolution is nearest the
    resolution (earlier registered wins ties).

    Options: the family that takes every set family-specific option and family-valued option (e.g. network_module
    networks.lora_flux); several do: the first registered; none does: the one taking most of them."""
    found = family_of_path(str(values.get("pretrained_model_name_or_path") or "") or None)
    if found:
        return found
    specs = list(all_families().values())
    for spec in specs:
        if kohya_config and any(kohya_config.get(flag) for flag in spec.kohya_ss_flags):
            return spec.name
    from ..options import BY_NAME

    def set_here(option: str) -> bool:  # set, and not to the schema default (guidance_scale 3.5 says nothing)
        value = values.get(option)
        return bool(value) and (option not in BY_NAME or value != BY_NAME[option].default)

    # the set options that only some families take: their family-specific options, and values of options whose
    # choices differ per family (FamilySpec.option_values, e.g. network_module networks.lora_flux)
    signals = {o for spec in specs for o in spec.options if set_here(o)}
    valued = {o for spec in specs for o in spec.option_values
              if set_here(o) and any(values.get(o) in s.option_values.get(o, ()) for s in specs)}

    def taken(spec: FamilySpec) -> int:
        return sum(1 for o in signals if spec.accepts_option(o)) + \
            sum(1 for o in valued if values.get(o) in spec.option_values.get(o, ()))

    if signals or valued:
        wanted = len(signals) + len(valued)
        best = max(specs, key=taken)  # the first registered of the best wins ties
        complete = [s for s in specs if taken(s) == wanted]
        return (complete[0] if complete else best).name
    try:
        from ..options import parse_resolution

        size = max(parse_resolution(values.get("resolution") or specs[0].default_resolution))
    except ValueError:
        return specs[0].name
    return min(specs, key=lambda s: abs(s.default_resolution - size)).name


def _import(target: str):
    module_name, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module_name), attribute)


def tiny_builder(name: str):
    """The function writing tiny random-weight models of family `name` (see sd_scripts.tools.tiny_model)."""
    spec = family_spec(name)
    if not spec.tiny_builder:
        raise ValueError(f"no tiny models for {spec.label}")
    return _import(spec.tiny_builder)


def tiny_files(variant: str) -> dict[str, str]:
    """{option: file name} of what `python -m sd_scripts.tools.tiny_model --family VARIANT --layout single` writes
    into its --out folder: the model under 'pretrained_model_name_or_path' and, for families with separate part
    files, each part under its option (e.g. the text encoders). ValueError for an unknown variant."""
    if variant not in tiny_variants():
        raise ValueError(f"unknown tiny model {variant!r}: expected one of {', '.join(sorted(tiny_variants()))}")
    spec = family_spec(tiny_variants()[variant][0])
    files = spec.tiny_files.get(variant)
    return dict(files) if files else {"pretrained_model_name_or_path": f"tiny-{variant}.safetensors"}


def part_file_options() -> tuple[str, ...]:
    """Every family's part-file loading options (FamilySpec.part_files), once each, in registry order: what the tools
    that load a whole model offer (each option is declared in sd_scripts/options.py)."""
    return tuple(dict.fromkeys(o for spec in all_families().values() for o in spec.part_files))


def script_for(family: str, trainer: str) -> str | None:
    """The sd-scripts script name that trains `family` with `trainer` when the family has its own
    (FamilySpec.trainer_scripts, e.g. a LoRA of a DiT family), else None (the generic script of the trainer)."""
    return family_spec(family).trainer_scripts.get(trainer)


def kohya_ss_owner(key: str) -> str | None:
    """The family whose kohya_ss-only config key `key` is (FamilySpec.kohya_ss_keys / kohya_ss_unsupported)."""
    return next((s.name for s in all_families().values()
                 if key in s.kohya_ss_keys or key in s.kohya_ss_unsupported), None)


def tiny_variants() -> dict[str, tuple[str, bool]]:
    """Tiny-model names for the command line -> (family, v_prediction)."""
    return {variant: (spec.name, bool(kwargs.get("v_prediction", False)))
            for spec in all_families().values() for variant, kwargs in spec.tiny_variants.items()}


# ------------------------------------------------------------------ detection
def _known() -> str:
    return ", ".join(s.label for s in all_families().values())


def detect_single_file(shapes: Mapping[str, tuple], metadata: Mapping[str, str] | None = None,
                       source: str = "the model") -> Detected:
    """The family of a single-file checkpoint from its tensor names and shapes (a safetensors header gives them
    without reading weights). ModelLoadError naming `source` when no family recognises it."""
    for package in _packages():
        found = package.detect_single_file(shapes, metadata or {})
        if found is not None:
            return found
    raise ModelLoadError(f"{source}: not a checkpoint of a supported model family ({_known()}); pass a full model "
                         f"file or a diffusers folder")


def detect_folder(path: str) -> Detected:
    """The family of a diffusers folder from its configs. ModelLoadError naming the folder otherwise."""
    for package in _packages():
        found = package.detect_folder(path)
        if found is not None:
            return found
    raise ModelLoadError(f"{path}: not a diffusers folder of a supported model family ({_known()}): it needs "
                         f"model_index.json and the configs of its parts; pass such a folder or a single file")


def json_config(path: str) -> dict | None:
    """A JSON object read from a model folder's config file, or None when it is missing or not an object (folder
    detection asks each family and must not raise for someone else's folder)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def read_safetensors_header(path: str) -> tuple[dict[str, tuple], dict[str, str]]:
    """(tensor name -> shape, metadata) of a .safetensors file, reading only its header."""
    with open(path, "rb") as f:
        head = f.read(8)
        (n,) = struct.unpack("<Q", head) if len(head) == 8 else (0,)
        if n < 2 or n > 100_000_000:
            raise ValueError("no safetensors header")
        header = json.loads(f.read(n))
    metadata = header.pop("__metadata__", None) or {}
    shapes = {k: tuple(v.get("shape", ())) for k, v in header.items() if isinstance(v, dict)}
    return shapes, metadata


def probe_model(path: str) -> ModelProbe:
    """Family and prediction type of a single file or diffusers folder, torch-free. ModelLoadError when the path is
    missing or is not a model of a supported family."""
    if not os.path.exists(path):
        raise ModelLoadError(f"{path}: no such file or folder; check the model path")
    if os.path.isdir(path):
        found = detect_folder(path)
        return ModelProbe("diffusers", found.family, found.v_prediction, found.variant)
    if not path.lower().endswith(".safetensors"):
        return ModelProbe("single_file", None, None)
    try:
        shapes, metadata = read_safetensors_header(path)
    except (OSError, ValueError, struct.error):
        raise ModelLoadError(f"{path}: not a readable .safetensors file; download it again or pass the right "
                             f"file") from None
    found = detect_single_file(shapes, metadata, path)
    return ModelProbe("single_file", found.family, found.v_prediction, found.variant)
