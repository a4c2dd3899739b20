"""JSON presets per training kind, and import of kohya_ss GUI configs.

A preset file (`presets/<kind>/*.json` bundled, `<user presets dir>/<kind>/*.json` saved by the user):

    {"schema_version": 1, "name": "SD1.5 LoRA", "kind": "lora", "description": "...", "needs_demo": false,
     "values": {"learning_rate": 0.0001, ...}}

`values` holds only what the preset changes from the schema defaults: option names, the GUI field
'sample_prompts_text' and 'accelerate.<setting>' keys. Files without `schema_version` (version 0: a flat dict of
values, sd-scripts spellings) are migrated on load. Secrets are never written. Unknown keys are reported by name.
The demo preset's paths contain `{demo_dir}`; loading it makes the tiny model and dataset there on first use (and,
for the fine-tune demo, the metadata JSON its `in_json` names).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import fields
from typing import Any

from sd_scripts import options as schema
from sd_scripts.families import all_families

from .command import (ACCEL_PREFIX, FAMILY_KEY, GUI_FIELDS, JOB_OPTIONS, KIND_TO_TRAINER, AccelerateSettings,
                      CommandError, _coerce, accelerate_flags, trainer_for)
from .atomic import atomic_write
from .lora_types import KOHYA_LORA_TYPES, NETWORK_ARG_FIELDS, network_for, refusal
from .secrets import is_secret, strip_secrets

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLED_DIR = os.path.join(REPO_ROOT, "presets")
SCHEMA_VERSION = 1
DEMO_PLACEHOLDER = "{demo_dir}"
#: Caption files of the demo dataset made by sd_scripts.tools.tiny_model.
DEMO_CAPTION_EXTENSION = ".txt"


class PresetError(ValueError):
    """A preset that cannot be found, read or prepared; the message names the file."""


class PresetValues(dict):
    """Loaded values (a plain dict) plus what the loader noticed: unknown_keys and notes."""

    def __init__(self, values: dict[str, Any], unknown_keys: list[str] | None = None,
                 notes: list[str] | None = None):
        super().__init__(values)
        self.unknown_keys = list(unknown_keys or [])
        self.notes = list(notes or [])


def user_presets_dir() -> str:
    """Where user presets live: $KOHYA_GUI_USER_PRESETS or <repo>/presets/user (git-ignored)."""
    return os.environ.get("KOHYA_GUI_USER_PRESETS") or os.path.join(BUNDLED_DIR, "user")


def default_demo_dir() -> str:
    """Where the demo preset's tiny model and dataset go: $KOHYA_GUI_DEMO_DIR or <repo>/demo (git-ignored)."""
    return os.environ.get("KOHYA_GUI_DEMO_DIR") or os.path.join(REPO_ROOT, "demo")


def _slug(name: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._ ()-]+", "_", name).strip(" .")
    if not slug:
        raise PresetError(f"preset name {name!r} has no usable characters")
    return slug


def _kind_dirs(kind: str, user_dir: str | None) -> list[tuple[str, bool]]:
    trainer_for(kind)
    return [(os.path.join(BUNDLED_DIR, kind), False), (os.path.join(user_dir or user_presets_dir(), kind), True)]


def _read(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise PresetError(f"preset {path} cannot be read: {e}") from None
    if not isinstance(data, dict):
        raise PresetError(f"preset {path} is not a JSON object")
    return data


def _index(kind: str, user_dir: str | None) -> dict[str, tuple[str, bool]]:
    """name -> (path, is_user); a user preset wins over a bundled one of the same name."""
    found: dict[str, tuple[str, bool]] = {}
    for folder, is_user in _kind_dirs(kind, user_dir):
        if not os.path.isdir(folder):
            continue
        for entry in sorted(os.listdir(folder)):
            if not entry.endswith(".json"):
                continue
            path = os.path.join(folder, entry)
            try:
                name = str(_read(path).get("name") or entry[:-5])
            except PresetError:
                name = entry[:-5]
            found[name] = (path, is_user)
    return found


def list_presets(kind: str, user_dir: str | None = None) -> list[str]:
    """Preset names for `kind`: bundled ones first (file order), then the user's."""
    index = _index(kind, user_dir)
    return [n for n, (_, user) in index.items() if not user] + [n for n, (_, user) in index.items() if user]


def migrate(data: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Bring a preset dict to SCHEMA_VERSION. Returns (preset, notes)."""
    notes = []
    version = data.get("schema_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise PresetError(f"preset key 'schema_version' must be a whole number, got {version!r}")
    if version == 0:  # a flat dict of values, maybe with sd-scripts spellings
        values = {schema.ALIASES.get(k, k): v for k, v in data.items() if k not in ("name", "kind", "description")}
        data = {"schema_version": 1, "name": data.get("name"), "kind": data.get("kind"),
                "description": data.get("description", ""), "values": values}
        notes.append("migrated from an unversioned preset")
        version = 1
    if version > SCHEMA_VERSION:
        notes.append(f"preset schema version {version} is newer than this GUI's {SCHEMA_VERSION}; some keys may "
                     f"be reported as unknown")
    return data, notes


def accelerate_problem(key: str, value: Any) -> str | None:
    """Why an 'accelerate.<setting>' value from a file cannot be used (wrong type, extra arguments outside the
    allow-list), or None."""
    try:
        AccelerateSettings.from_dict({key[len(ACCEL_PREFIX):]: value}).extra_args  # type and allow-list checks
        if key == ACCEL_PREFIX + "extra_args":
            accelerate_flags(AccelerateSettings.from_dict({"extra_args": value}), "no")
    except CommandError as e:
        return str(e)
    return None


def _clean_values(kind: str, raw: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Keep known keys (converted to their types); report the rest by name."""
    trainer = trainer_for(kind)
    accel_names = {f.name for f in fields(AccelerateSettings)}
    values: dict[str, Any] = {}
    unknown: list[str] = []
    for key, value in raw.items():
        name = schema.ALIASES.get(key, key)
        if name == FAMILY_KEY and value not in all_families():
            unknown.append(f"{key} (unknown model family {value!r}; known: {', '.join(all_families())})")
        elif name in GUI_FIELDS:
            if isinstance(value, str):
                values[name] = value
            else:
                unknown.append(f"{key} (invalid value: expected text, got {type(value).__name__})")
        elif name.startswith(ACCEL_PREFIX) and name[len(ACCEL_PREFIX):] in accel_names:
            problem = accelerate_problem(name, value)
            if problem:
                unknown.append(f"{key} (refused: {problem})")
            else:
                values[name] = value
        elif name in schema.BY_NAME and name not in JOB_OPTIONS:
            opt = schema.BY_NAME[name]
            if not opt.applies_to(trainer):
                unknown.append(f"{key} (does not apply to {kind})")
                continue
            try:
                values[name] = _coerce(opt, value)
            except CommandError:
                unknown.append(f"{key} (invalid value)")
        else:
            unknown.append(key)
    return values, unknown


def load_preset(kind: str, name: str, user_dir: str | None = None, demo_dir: str | None = None,
                make_demo: bool = True) -> PresetValues:
    """The full values of preset `name` for `kind`: schema defaults overlaid with the preset's keys.

    Older preset versions are migrated; unknown keys are in `.unknown_keys`. A demo preset's `{demo_dir}` paths are
    resolved, and (make_demo) its tiny model and dataset (and a fine-tune demo's metadata JSON) are made there on
    first use.
    """
    index = _index(kind, user_dir)
    if name not in index:
        raise PresetError(f"no {kind} preset named {name!r}; known: {', '.join(index) or 'none'}")
    path = index[name][0]
    stored = _read(path)
    try:
        data, notes = migrate(stored)
    except PresetError as e:
        raise PresetError(f"preset {path}: {e}") from None
    raw = data.get("values") or {}
    if not isinstance(raw, dict):
        raise PresetError(f"preset {path}: 'values' must be an object")
    if data.get("needs_demo"):
        demo = os.path.abspath(demo_dir or default_demo_dir())
        raw = {k: v.replace(DEMO_PLACEHOLDER, demo) if isinstance(v, str) else v for k, v in raw.items()}
        if make_demo:
            variant = data.get("demo_variant")
            notes += ensure_demo(demo, str(raw.get("pretrained_model_name_or_path") or ""),
                                 variant=variant if isinstance(variant, str) else None, values=raw)
            notes += ensure_demo_metadata(demo, raw)
    values, unknown = _clean_values(kind, raw)
    full = schema.defaults(trainer_for(kind))
    full.update(values)
    for job_option in JOB_OPTIONS:
        full.pop(job_option, None)
    return PresetValues(full, unknown, notes)


def preset_changes(kind: str, values: dict[str, Any]) -> dict[str, Any]:
    """Only the keys of `values` that differ from the schema defaults, without secrets and job-owned options."""
    trainer = trainer_for(kind)
    base = schema.defaults(trainer)
    accel_defaults = AccelerateSettings().to_dict()
    out: dict[str, Any] = {}
    for key, value in strip_secrets(dict(values)).items():
        if key in JOB_OPTIONS or is_secret(key):
            continue
        if key in GUI_FIELDS:
            if value not in (None, ""):
                out[key] = value
        elif key.startswith(ACCEL_PREFIX):
            setting = key[len(ACCEL_PREFIX):]
            if setting in accel_defaults and value != accel_defaults[setting] and value not in (None, ""):
                out[key] = value
        elif key in schema.BY_NAME:
            opt = schema.BY_NAME[key]
            value = _coerce(opt, value)
            if opt.applies_to(trainer) and value != base.get(key):
                out[key] = value
        else:
            raise PresetError(f"unknown key {key!r}: not an option of the schema")
    return out


def save_preset(kind: str, name: str, values: dict[str, Any], user_dir: str | None = None,
                description: str = "") -> str:
    """Write a user preset holding only the keys that differ from the defaults (secrets removed). Returns its path."""
    folder = os.path.join(user_dir or user_presets_dir(), kind)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, _slug(name) + ".json")
    data = {"schema_version": SCHEMA_VERSION, "name": name, "kind": kind, "description": description,
            "values": preset_changes(kind, values)}
    atomic_write(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n", mode=0o644)
    return path


def demo_files(model: str, variant: str | None = None) -> tuple[str, dict[str, str]]:
    """(tiny variant, {option: path}) of a demo preset's model path: the files
    `python -m sd_scripts.tools.tiny_model --family VARIANT --layout single --out <folder of model>` writes (the
    registry's `tiny_files`: the model, and the part files of families that have them). The variant is the preset's
    `demo_variant`, else the one whose model file has this name (`tiny-<variant>.safetensors` for one-file models).
    PresetError when the name fits no variant (or several, without demo_variant)."""
    from sd_scripts.families import tiny_files, tiny_variants

    name, folder = os.path.basename(model), os.path.dirname(model)
    files = {v: tiny_files(v) for v in tiny_variants()}
    if variant is not None and variant not in files:
        raise PresetError(f"demo preset key 'demo_variant': {variant!r} is not a tiny model; use one of "
                          f"{', '.join(sorted(files))}")
    fitting = [v for v, f in files.items() if f["pretrained_model_name_or_path"] == name]
    if variant is None and len(fitting) == 1:
        variant = fitting[0]
    if variant is None or variant not in fitting:
        if len(fitting) > 1 and variant is None:
            raise PresetError(f"demo preset model {model!r} is written by several tiny models: set the preset's "
                              f"'demo_variant' to one of {', '.join(fitting)}")
        expected = files[variant]["pretrained_model_name_or_path"] if variant else "tiny-<variant>.safetensors"
        raise PresetError(f"demo preset model {model!r}: expected {{demo_dir}}/<folder>/{expected} "
                          f"with a variant among {', '.join(sorted(files))}")
    return variant, {option: os.path.join(folder, file) for option, file in files[variant].items()}


def ensure_demo(demo_dir: str, model: str, python: str = sys.executable, timeout: float = 600,
                variant: str | None = None, values: dict[str, Any] | None = None) -> list[str]:
    """Make a demo preset's tiny model (see `demo_files`: its model path names the tiny model variant, see
    `python -m sd_scripts.tools.tiny_model --help`; families with part files write them next to it, and the preset's
    part options, in `values`, must name those files) and the demo dataset in `demo_dir` unless they exist. Returns
    notes; PresetError when a path does not fit or the tool fails (with the end of its output)."""
    variant, wanted = demo_files(model, variant)
    for option, path in wanted.items():
        given = (values or {}).get(option, path if option == "pretrained_model_name_or_path" else None)
        if values is not None and given != path:
            raise PresetError(f"demo preset option '{option}' must be {path} (the tiny {variant} model's file "
                              f"next to its model), not {given!r}: fix the preset")
    train = os.path.join(demo_dir, "dataset", "train")
    if all(os.path.isfile(path) for path in wanted.values()) and os.path.isdir(train):
        return []
    argv = [python, "-m", "sd_scripts.tools.tiny_model", "--family", variant, "--layout", "single",
            "--out", os.path.dirname(model)]
    if not os.path.isdir(train):
        argv += ["--dataset", os.path.join(demo_dir, "dataset")]
    _run_demo_tool(argv, list(wanted.values()), f"the demo model in {demo_dir}", timeout)
    return [f"made the demo {variant} model and dataset in {demo_dir}"]


def ensure_demo_metadata(demo_dir: str, values: dict[str, Any], python: str = sys.executable,
                         timeout: float = 300) -> list[str]:
    """The fine-tune demo's step: a demo preset whose `in_json` (metadata JSON) lies in `demo_dir` gets it built from
    the captions (DEMO_CAPTION_EXTENSION files) in its `train_data_dir`, unless it exists, with
    `python -m sd_scripts.tools.build_metadata`. Other presets: nothing. Returns notes; PresetError when the tool
    fails."""
    in_json, train = values.get("in_json"), values.get("train_data_dir")
    if not isinstance(in_json, str) or not in_json or not isinstance(train, str) or not train:
        return []
    in_json = os.path.abspath(in_json)
    if os.path.commonpath([in_json, os.path.abspath(demo_dir)]) != os.path.abspath(demo_dir):
        return []  # only ever write inside the demo folder
    if os.path.isfile(in_json):
        return []
    argv = [python, "-m", "sd_scripts.tools.build_metadata", "--train_data_dir", train, "--out", in_json,
            "--caption_extension", DEMO_CAPTION_EXTENSION, "--tag_extension", ""]
    _run_demo_tool(argv, in_json, f"the demo metadata {in_json}", timeout)
    return [f"made the demo metadata {in_json}"]


def _run_demo_tool(argv: list[str], product: str | list[str], what: str, timeout: float) -> None:
    """Run one of our tools (argument list, no shell); PresetError with the end of its output unless `product`
    (every one of them) exists afterwards."""
    products = [product] if isinstance(product, str) else product
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise PresetError(f"could not make {what}: {e}") from None
    if out.returncode != 0 or not all(os.path.exists(p) for p in products):
        tail = "\n".join((out.stdout + out.stderr).strip().splitlines()[-5:])
        raise PresetError(f"could not make {what} (exit {out.returncode}): {tail}")


# ------------------------------------------------------------------ kohya_ss GUI JSON import

#: kohya_ss GUI key -> our option (or 'accelerate.<setting>' / GUI field).
KOHYA_RENAMES = {
    "epoch": "max_train_epochs",
    "max_resolution": "resolution",
    "optimizer": "optimizer_type",
    "lora_network_weights": "network_weights",
    "sample_prompts": "sample_prompts_text",  # kohya_ss stores the prompt text itself
    "caption_extention": "caption_extension",
    "num_processes": "accelerate.num_processes",
    "num_machines": "accelerate.num_machines",
    "multi_gpu": "accelerate.multi_gpu",
    "gpu_ids": "accelerate.gpu_ids",
    "main_process_port": "accelerate.main_process_port",
    "num_cpu_threads_per_process": "accelerate.num_cpu_threads_per_process",
    "dynamo_backend": "accelerate.dynamo_backend",
    "extra_accelerate_launch_args": "accelerate.extra_args",
}
#: kohya_ss fields it passes to the trainer as network_args of the same name (sd-scripts' networks.lora: LoRA+ and
#: the U-Net block-wise ranks / learning-rate weights)
KOHYA_NETWORK_ARGS = ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio",
                      "block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas", "down_lr_weight",
                      "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold")
#: kohya_ss keys that only drive its own widgets (no training setting of their own); its model-family checkboxes
#: choose the GUI's family selector (FamilySpec.kohya_ss_flags), not a training option.
KOHYA_GUI_ONLY = frozenset({"model_list", "save_as_bool", "sd3_checkbox", "flux1_checkbox",
                            *(flag for spec in all_families().values() for flag in spec.kohya_ss_flags),
                            "LoRA_type", "lr_warmup", "xformers", "noise_offset_type", "lr_warmup_steps",
                            *NETWORK_ARG_FIELDS, *KOHYA_NETWORK_ARGS})
#: kohya LoRA types we train (kohya_gui/lora_types.py: network_module and network_args of each; kohya_ss's 'Flux1' is
#: its name for sd-scripts' networks.lora_flux, the family's own network_module).
SUPPORTED_LORA_TYPES = frozenset(KOHYA_LORA_TYPES)
#: kohya_ss values that mean the same as leaving the option unset (sd-scripts' own defaults): not imported, so that a
#: family that refuses the option (e.g. clip_skip for FLUX.1) is not given it.
#: kohya_ss fields that change nothing when they equal another field of the config (T5-XXL's dtype when it is the
#: run's mixed precision, which is what T5-XXL runs in here)
KOHYA_SAME_AS_FIELD = {"t5xxl_dtype": "mixed_precision"}
KOHYA_SAME_AS_UNSET = {"clip_skip": 1, "max_token_length": 75, "min_timestep": 0, "max_timestep": 1000}
NETWORK_ARGS_PREFIX = "network_args:"
#: kohya_ss's 'noise_offset_type' -> the noise keys it passes to sd-scripts with it; it saves the other type's keys
#: too but does not pass them, so they are not imported (bmaltais/kohya_ss kohya_gui/common_gui.py run_cmd)
KOHYA_NOISE_OFFSET_TYPES = {
    "Original": frozenset({"noise_offset", "noise_offset_random_strength", "adaptive_noise_scale"}),
    "Multires": frozenset({"multires_noise_iterations", "multires_noise_discount"}),
}


def _meaningful(value: Any) -> bool:
    return value not in (None, "", False, 0, 0.0, [], {}, "none", "None", "0", "False", "false")


def _kohya_family(data: dict[str, Any]) -> str:
    """The family a kohya_ss config is for: its model file's, its family checkbox, a family-specific option kohya_ss
    passes to every family (e.g. v2), else by resolution. (Fields of a family's own kohya_ss widgets are left out:
    kohya_ss saves them for every config.)"""
    from sd_scripts.families import guess_family

    owned = {k for s in all_families().values() for k in (*s.kohya_ss_keys, *s.kohya_ss_unsupported)}
    hints = {k: v for k, v in data.items()
             if k in schema.BY_NAME and schema.BY_NAME[k].family_specific and k not in owned}
    return guess_family({**hints, "pretrained_model_name_or_path": data.get("pretrained_model_name_or_path"),
                         "resolution": str(data.get("max_resolution") or "")}, data)


def import_kohya_json(path: str, kind: str | None = None,
                      report: dict[str, str] | None = None) -> tuple[dict[str, Any], list[str]]:
    """Read a kohya_ss GUI config JSON -> (values, unknown_keys).

    Same-named keys map directly; renamed ones via KOHYA_RENAMES (epoch -> max_train_epochs, max_resolution ->
    resolution, optimizer -> optimizer_type, sample_prompts text -> sample_prompts_text, accelerate settings ->
    'accelerate.*'); LoRA_type -> network_module + network_args as kohya_ss builds them (kohya_gui/lora_types.py:
    Standard/Kohya LoCon/Flux1 our LoRA or the family's own network, e.g. networks.lora_flux; LyCORIS/* and LoCon
    lycoris.kohya with algo=; Kohya LoHa/LoKr networks.loha/lokr); a type we do not train is a PresetError naming
    it; lr_warmup percent -> lr_warmup_steps
    fraction; xformers 'xformers'/'sdpa' -> flags. kohya's 0 / '' meaning "unset" become unset.

    The config's model family (its model file, else its kohya_ss checkbox, FamilySpec.kohya_ss_flags) decides the
    family-only keys (FamilySpec.kohya_ss_keys: e.g. flux1_cache_text_encoder_outputs -> cache_text_encoder_outputs,
    train_blocks -> network_args): they are imported for that family; another family's keys, the family's keys this
    trainer cannot honour (FamilySpec.kohya_ss_unsupported) and options the family refuses are reported with the
    reason. Keys we cannot honour are listed in unknown_keys when they carry a setting (empty/zero/false ones change
    nothing and are skipped). Secret keys are never imported. The family is in values[FAMILY_KEY].

    `report`, when given, receives what happened to every key: 'imported', 'unset' (no setting), 'gui' (kohya_ss
    widget state only), 'reported' (in unknown_keys).
    """
    from sd_scripts.families import family_spec

    data = _read(path)
    trainer = trainer_for(kind) if kind else None
    family = _kohya_family(data)
    spec = family_spec(family)
    values: dict[str, Any] = {FAMILY_KEY: family}
    unknown: list[str] = []
    report = {} if report is None else report
    sources: dict[str, str] = {}  # our option -> the kohya key it came from

    def reported(key: str, text: str) -> None:
        unknown.append(text)
        report[key] = "reported"

    lora_type = data.get("LoRA_type", "Standard") or "Standard"
    if trainer in (None, "network"):
        if lora_type not in SUPPORTED_LORA_TYPES:
            raise PresetError(f"{path}: {refusal(lora_type)}")
    elif lora_type != "Standard":
        reported("LoRA_type", f"LoRA_type ({lora_type!r}: a LoRA setting; does not apply to {kind})")
    accel_names = {f.name for f in fields(AccelerateSettings)}
    # a family's own field wins over a plain one naming the same option (sd3_clip_l over an old-style clip_l)
    preferred = {target: key for key, target in spec.kohya_ss_keys.items() if key != target and _meaningful(data.get(key))}
    net_args: list[str] = []
    noise_type = data.get("noise_offset_type") or "Original"
    unused_noise = {k for t, keys in KOHYA_NOISE_OFFSET_TYPES.items() if t != noise_type for k in keys}
    for key, raw in data.items():
        report.setdefault(key, "unset")
        if key in unused_noise:
            report[key] = "gui"  # the other noise_offset_type's field: kohya_ss does not pass it
            continue
        if key in KOHYA_FINETUNE_FIELDS or key in KOHYA_FINETUNE_STEPS or key in KOHYA_DYNAMO_FLAGS or \
                key in ("additional_parameters", "template"):
            continue  # _kohya_finetune_fields / _dynamo / _additional_parameters / _ti_template below
        if is_secret(key):
            if _meaningful(raw):
                reported(key, f"{key} (secret, not imported)")
            continue
        if key in spec.kohya_ss_unsupported:
            if raw == data.get(KOHYA_SAME_AS_FIELD.get(key, ""), object()):
                report[key] = "gui"  # the same as what happens here anyway
            elif _meaningful(raw):
                reported(key, f"{key} (not supported for {spec.label}: {spec.kohya_ss_unsupported[key]})")
            continue
        owners = [s for s in all_families().values() if key in s.kohya_ss_keys or key in s.kohya_ss_unsupported]
        if key in spec.kohya_ss_keys:
            name = spec.kohya_ss_keys[key]
            if name.startswith(NETWORK_ARGS_PREFIX):
                if _meaningful(raw) and str(raw).lower() != "all" and trainer in (None, "network"):
                    net_args.append(f"{name[len(NETWORK_ARGS_PREFIX):]}={str(raw).lower() if isinstance(raw, bool) else raw}")
                    report[key] = "imported"
                elif _meaningful(raw) and str(raw).lower() != "all":
                    reported(key, f"{key} (a LoRA network_args setting; does not apply to {kind})")
                continue
            if name in preferred and preferred[name] != key:
                if _meaningful(raw) and raw != data.get(preferred[name]):
                    reported(key, f"{key} (not used: the config's {preferred[name]} sets {name})")
                continue
        elif owners:
            name = key
            opt = schema.BY_NAME.get(key)
            default = opt.default if opt is not None else None
            if _meaningful(raw) and raw != default:
                labels = " / ".join(o.label for o in owners)
                reported(key, f"{key} (a kohya_ss {labels} field; this config is for {spec.label} models, so "
                              f"kohya_ss does not use it either)")
            continue
        elif key in KOHYA_TE_LR_KEYS and trainer in (None, "network"):
            continue  # one text_encoder_lr per text encoder: _kohya_text_encoder_lrs
        else:
            name = KOHYA_RENAMES.get(key, schema.ALIASES.get(key, key))
            if key in KOHYA_GUI_ONLY and name == key:
                report[key] = "gui"
                continue
        if name in GUI_FIELDS:
            if _meaningful(raw):
                values[name] = str(raw)
                report[key] = "imported"
            continue
        if name.startswith(ACCEL_PREFIX):
            setting = name[len(ACCEL_PREFIX):]
            if setting in accel_names and _meaningful(raw):
                problem = accelerate_problem(name, raw)
                if problem:
                    reported(key, f"{key} (refused: {problem})")
                else:
                    values[name] = raw
                    report[key] = "imported"
            continue
        opt = schema.BY_NAME.get(name)
        if opt is None or name in JOB_OPTIONS:
            if _meaningful(raw):
                reported(key, key)
            continue
        if trainer and not opt.applies_to(trainer):
            if _meaningful(raw) and raw != opt.default:
                reported(key, f"{key} (does not apply to {kind})")
            continue
        if (isinstance(raw, bool) and opt.type is not bool and not raw) or \
                (opt.type is str and isinstance(raw, str) and raw.strip().lower() == "false"):
            continue  # kohya_ss writes false (or "False") for an empty text field
        try:
            value = _coerce(opt, raw)
        except CommandError:
            reported(key, f"{key} (invalid value {raw!r})")
            continue
        out_of_range = isinstance(value, (int, float)) and not isinstance(value, bool) and value and (
            (opt.minimum is not None and value < opt.minimum) or (opt.maximum is not None and value > opt.maximum))
        if out_of_range:
            limits = " and ".join(f"{word} {bound:g}" for word, bound in (("at least", opt.minimum),
                                                                         ("at most", opt.maximum)) if bound is not None)
            reported(key, f"{key} (invalid value {raw!r}: must be {limits}; sd-scripts refuses it too)")
            continue
        if value is None or opt.type is not bool and not opt.nargs and value == 0 and (
                opt.default is None or (opt.minimum is not None and opt.minimum >= 1)):
            continue  # kohya's "unset"
        if name in KOHYA_SAME_AS_UNSET and value == KOHYA_SAME_AS_UNSET[name]:
            continue
        if opt.choices and not opt.nargs and value not in opt.choices:
            reported(key, f"{key} ({value!r} is not one of our choices)")
            continue
        if value != opt.default:
            values[name] = value
            sources[name] = key
            report[key] = "imported"
    _kohya_specials(data, values, lora_type, trainer, net_args, report)
    if trainer in (None, "network"):
        _kohya_text_encoder_lrs(data, values, report, reported)
    _kohya_finetune_fields(data, values, report)
    _kohya_dynamo(data, values, report)
    _kohya_ti_template(data, values, trainer, report, reported)
    _kohya_additional_parameters(data, values, trainer, report, reported)
    _family_refusals(spec, values, sources, unknown, report)
    return values, unknown


#: kohya_ss's fine-tune tab: where its metadata JSON is (in_json = train_dir / the caption or latent metadata file, as
#: kohya_ss builds it), and the preparation steps it runs before training (here: python -m
#: sd_scripts.tools.build_metadata); the steps' own settings are not training options.
KOHYA_FINETUNE_FIELDS = ("image_folder", "train_dir", "caption_metadata_filename", "latent_metadata_filename",
                         "use_latent_files")
KOHYA_FINETUNE_STEPS = ("full_path", "batch_size", "generate_caption_database", "generate_image_buckets",
                        "create_caption", "create_buckets")


def _kohya_finetune_fields(data: dict[str, Any], values: dict[str, Any], report: dict[str, str]) -> None:
    if _meaningful(data.get("image_folder")) and not values.get("train_data_dir"):
        values["train_data_dir"] = str(data["image_folder"])
    train_dir = data.get("train_dir")
    name = data.get("latent_metadata_filename") if str(data.get("use_latent_files", "")).lower() in ("yes", "true") \
        else data.get("caption_metadata_filename")
    if _meaningful(train_dir) and _meaningful(name) and not values.get("in_json"):
        values["in_json"] = os.path.join(str(train_dir), str(name))
    for key in KOHYA_FINETUNE_FIELDS:
        if key in data:
            report[key] = "imported" if _meaningful(data[key]) else "unset"
    for key in KOHYA_FINETUNE_STEPS:
        if key in data:
            report[key] = "gui"


#: kohya_ss's accelerate compile settings beside dynamo_backend -> `accelerate launch` flags (they mean nothing
#: without a backend; "default" is accelerate's own mode)
KOHYA_DYNAMO_FLAGS = {"dynamo_mode": "--dynamo_mode", "dynamo_use_fullgraph": "--dynamo_use_fullgraph",
                      "dynamo_use_dynamic": "--dynamo_use_dynamic"}


def _kohya_dynamo(data: dict[str, Any], values: dict[str, Any], report: dict[str, str]) -> None:
    compiling = str(data.get("dynamo_backend") or "no").lower() != "no"
    for key, flag in KOHYA_DYNAMO_FLAGS.items():
        if key not in data:
            continue
        raw = data[key]
        if not compiling or not _meaningful(raw) or raw == "default":
            report[key] = "gui"  # accelerate's compile widgets, with nothing to compile (or its default mode)
            continue
        extra = list(values.get(ACCEL_PREFIX + "extra_args") or [])
        values[ACCEL_PREFIX + "extra_args"] = extra + ([flag] if isinstance(raw, bool) else [flag, str(raw)])
        report[key] = "imported"


#: kohya_ss textual-inversion tab's "template" -> our flags (kohya_ss passes --use_object_template /
#: --use_style_template; "caption" uses the captions)
KOHYA_TI_TEMPLATES = {"object template": "use_object_template", "style template": "use_style_template"}


def _kohya_ti_template(data: dict[str, Any], values: dict[str, Any], trainer: str | None,
                       report: dict[str, str], reported: Any) -> None:
    if "template" not in data:
        return
    template = str(data.get("template") or "caption").strip().lower()
    if template == "caption":
        report["template"] = "unset"
    elif template in KOHYA_TI_TEMPLATES and trainer in (None, "ti"):
        values[KOHYA_TI_TEMPLATES[template]] = True
        report["template"] = "imported"
    else:
        reported("template", f"template ({data['template']!r}: a textual-inversion setting; does not apply here)")


def additional_parameters(text: str, trainer: str | None) -> tuple[dict[str, Any], list[str]]:
    """kohya_ss's "Additional parameters" free text -> (option values, problems): split as a POSIX shell would (no
    shell runs), each `--name value...`, `--name=value` or `--flag` checked against the option schema; an unknown
    or misplaced option is a problem naming it. Later items win, as on sd-scripts' command line."""
    import shlex

    try:
        tokens = shlex.split(text or "")
    except ValueError as e:
        return {}, [f"cannot be split like a command line ({e}): check the quotes"]
    values: dict[str, Any] = {}
    problems: list[str] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        i += 1
        if not token.startswith("--"):
            problems.append(f"{token!r} is not an option (options start with --)")
            continue
        name, eq, inline = token[2:].partition("=")
        name = schema.ALIASES.get(name, name)
        opt = schema.BY_NAME.get(name)
        items = [inline] if eq else []
        while not eq and i < len(tokens) and not tokens[i].startswith("--"):
            items.append(tokens[i])
            i += 1
        if opt is None or name in JOB_OPTIONS:
            problems.append(f"--{name} is not an option of these trainers")
            continue
        if trainer and not opt.applies_to(trainer):
            problems.append(f"--{name} does not apply to this trainer")
            continue
        if opt.type is bool and not eq and not items:
            values[name] = True
            continue
        if not opt.nargs and len(items) != 1:
            problems.append(f"--{name} takes one value, got {len(items)}")
            continue
        try:
            values[name] = _coerce(opt, items if opt.nargs else items[0])
        except CommandError as e:
            problems.append(f"--{name}: {e}")
    return values, problems


def _kohya_additional_parameters(data: dict[str, Any], values: dict[str, Any], trainer: str | None,
                                 report: dict[str, str], reported: Any) -> None:
    text = data.get("additional_parameters")
    if not _meaningful(text):
        return
    extra, problems = additional_parameters(str(text), trainer)
    values.update(extra)
    if problems:
        reported("additional_parameters", f"additional_parameters ({'; '.join(problems)})")
    else:
        report["additional_parameters"] = "imported"


#: kohya_ss fields that give text encoders their own learning rates: DreamBooth / fine-tune SDXL's te1 / te2 and the
#: LoRA tab's T5-XXL rate (kohya_ss passes text_encoder_lr as [text_encoder_lr, t5xxl_lr]).
KOHYA_TE_LR_KEYS = ("learning_rate_te1", "learning_rate_te2", "t5xxl_lr")


def _kohya_text_encoder_lrs(data: dict[str, Any], values: dict[str, Any], report: dict[str, str],
                            reported: Any) -> None:
    """learning_rate_te1 / learning_rate_te2 -> text_encoder_lr [te1, te2] (one rate per text encoder; 0 leaves an
    encoder untrained, as kohya_ss); t5xxl_lr -> text_encoder_lr [text_encoder_lr, t5xxl_lr] as kohya_ss builds it
    (it refuses t5xxl_lr without text_encoder_lr). A config's own text_encoder_lr wins over te1 / te2."""
    te, t5 = data.get("text_encoder_lr"), data.get("t5xxl_lr")
    te1, te2 = data.get("learning_rate_te1"), data.get("learning_rate_te2")
    rates = None
    if _meaningful(t5):
        if _meaningful(te):
            rates = [float(te), float(t5)]
            report["t5xxl_lr"] = "imported"
        else:
            reported("t5xxl_lr", "t5xxl_lr (kohya_ss needs text_encoder_lr with it: set text_encoder_lr)")
    if _meaningful(te1) or _meaningful(te2):
        if _meaningful(te):
            for key in ("learning_rate_te1", "learning_rate_te2"):
                if _meaningful(data.get(key)):
                    reported(key, f"{key} (not used: the config's text_encoder_lr sets text_encoder_lr)")
        else:
            rates = [float(te1 or 0.0), float(te2 or 0.0)]
            for key in ("learning_rate_te1", "learning_rate_te2"):
                if key in data:
                    report[key] = "imported"
    if rates is not None:
        values["text_encoder_lr"] = rates


def _family_refusals(spec, values: dict[str, Any], sources: dict[str, str], unknown: list[str],
                     report: dict[str, str]) -> None:
    """Take out what the config's family refuses (the trainer would stop on it: FamilySpec.refused_options, and
    other families' options for strict families), reporting each with the reason."""
    for name in list(values):
        opt = schema.BY_NAME.get(name)
        if opt is None:
            continue
        reason = spec.refused_options.get(name)
        if reason is None and spec.strict_options and opt.family_specific and not spec.accepts_option(name):
            owners = " / ".join(s.label for s in all_families().values() if s.accepts_option(name))
            reason = f"an option of {owners} models"
        if reason is None:
            continue
        key = sources.get(name, name)
        del values[name]
        unknown.append(f"{key} (not used for {spec.label} models: {reason})")
        report[key] = "reported"


def _kohya_specials(data: dict[str, Any], values: dict[str, Any], lora_type: str, trainer: str | None,
                    family_args: list[str], report: dict[str, str]) -> None:
    from sd_scripts.families import family_spec

    if trainer in (None, "network"):
        module, type_args, used = network_for(lora_type, data)
        for key in used:
            report[key] = "imported"
        if module is not None and family_args:
            # kohya_ss passes the family's LoRA network_args (split_qkv, train_blocks, ...) only with the family's
            # own LoRA type, never to another network (LyCORIS, 'Flux1 OFT', ...)
            dropped = {arg.split("=", 1)[0] for arg in family_args}
            for key, name in family_spec(values[FAMILY_KEY]).kohya_ss_keys.items():
                if name.startswith(NETWORK_ARGS_PREFIX) and name[len(NETWORK_ARGS_PREFIX):] in dropped and \
                        report.get(key) == "imported":
                    report[key] = "gui"
            family_args = []
        net_args = list(values.get("network_args") or []) + type_args + family_args
        for key in KOHYA_NETWORK_ARGS:  # LoRA+ and block-wise fields: network_args of networks.lora
            if _meaningful(data.get(key)):
                net_args.append(f"{key}={data[key]}")
                report[key] = "imported"
        if net_args:
            values["network_args"] = net_args
        own = family_spec(values[FAMILY_KEY]).option_values.get("network_module", ())
        if module is not None:  # LoHa / LoKr / LyCORIS (kohya_gui/lora_types.py)
            values["network_module"] = module
        elif own:  # kohya_ss runs the family's sd-scripts network (networks.lora_flux, networks.lora_sd3)
            values["network_module"] = own[0]
    warmup_steps = data.get("lr_warmup_steps")
    if _meaningful(warmup_steps):
        values["lr_warmup_steps"] = _coerce(schema.BY_NAME["lr_warmup_steps"], warmup_steps)
        report["lr_warmup_steps"] = "imported"
    elif _meaningful(data.get("lr_warmup")):
        values["lr_warmup_steps"] = float(data["lr_warmup"]) / 100.0
        report["lr_warmup"] = "imported"
    attention = data.get("xformers")
    if attention in (True, "xformers"):
        values["xformers"] = True
        report["xformers"] = "imported"
    elif attention == "sdpa":
        values["sdpa"] = True
        report["xformers"] = "imported"
    if lora_type in SUPPORTED_LORA_TYPES and "LoRA_type" in data:
        report["LoRA_type"] = "imported"
