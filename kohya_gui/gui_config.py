"""config.toml: the GUI's defaults, checked against the option schema (unknown keys are reported, never dropped).

Sections:
- `[gui]`: launcher and job settings (GUI_KEYS).
- `[accelerate_launch]`: AccelerateSettings fields.
- one section per schema group (`[model]`, `[folders]`, ... see sd_scripts.options.GROUPS): option defaults for
  every training kind. An option may sit in any group section (sections are flattened, as in the run TOML).
- `[lora]`, `[dreambooth]`, `[finetune]`, `[ti]`: per-kind defaults that win over the group sections (a LoRA wants a
  learning rate a hundred times a fine-tune's, so no single default fits all kinds).

`write_default_config()` generates the committed, commented config.toml from the schema; a test keeps it current.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any

from sd_scripts import options as schema

from .command import KIND_TO_TRAINER, AccelerateSettings, CommandError, normalize_values

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import toml as tomllib  # type: ignore

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_PATH = os.path.join(REPO_ROOT, "config.toml")

#: [gui] keys with their defaults and help.
GUI_KEYS: dict[str, tuple[Any, str]] = {
    "jobs_dir": ("jobs", "Folder of job folders (relative paths are relative to the repository)."),
    "user_presets_dir": ("presets/user", "Where 'Save preset' writes (bundled presets stay read-only)."),
    "demo_dir": ("demo", "Where the demo preset makes its tiny model and dataset on first use."),
    "python": ("", "Python interpreter that runs jobs (empty: the GUI's own)."),
    "stop_grace_s": (30, "Seconds a stopping run gets to save before its process tree is killed."),
    "listen": ("127.0.0.1", "Address the web server binds to."),
    "server_port": (7860, "Port of the web server."),
    "inbrowser": (False, "Open the browser on start."),
    "default_kind": ("lora", "Tab shown first: lora, dreambooth, finetune or ti."),
    "browse_roots": ([], "Folders the server-side file browser may show and dataset zips may be extracted into "
                         "(empty: your home folder)."),
    "max_upload_mb": (4096, "Largest unpacked size of an uploaded dataset zip, in MiB."),
}

#: Built-in per-kind defaults (kohya_ss used 1e-6 for everything; that starves a LoRA).
# Learning rates are not here: they depend on the family too (components/defaults.py, the one table of them).
KIND_DEFAULTS: dict[str, dict[str, Any]] = {
    "lora": {"network_dim": 16, "network_alpha": 8.0, "max_train_epochs": 10,
             "save_every_n_epochs": 1, "caption_extension": ".txt", "cache_latents": True, "enable_bucket": True,
             "output_name": "my_lora"},
    "dreambooth": {"max_train_epochs": 10, "caption_extension": ".txt",
                   "cache_latents": True, "enable_bucket": True, "gradient_checkpointing": True,
                   "output_name": "my_model"},
    "finetune": {"max_train_epochs": 10, "caption_extension": ".txt",
                 "cache_latents": True, "enable_bucket": True, "gradient_checkpointing": True,
                 "output_name": "my_finetune"},
    "ti": {"max_train_steps": 1500, "caption_extension": ".txt", "cache_latents": True,
           "output_name": "my_embedding"},
}

ACCEL_SECTION = "accelerate_launch"
GUI_SECTION = "gui"


@dataclass
class GuiConfig:
    """A loaded config.toml: values by section and every problem found (unknown keys by name, bad values)."""

    values: dict[str, dict[str, Any]] = field(default_factory=dict)
    unknown_keys: list[str] = field(default_factory=list)  # "section.key"
    problems: list[str] = field(default_factory=list)  # other messages (bad values, unreadable file)
    path: str | None = None

    def gui(self, key: str) -> Any:
        """A [gui] value (or its default)."""
        return self.values.get(GUI_SECTION, {}).get(key, GUI_KEYS[key][0])

    def path_setting(self, key: str) -> str:
        """A [gui] folder setting as an absolute path (relative ones are relative to the repository)."""
        value = str(self.gui(key))
        return value if os.path.isabs(value) else os.path.join(REPO_ROOT, value)

    def accelerate(self) -> AccelerateSettings:
        """AccelerateSettings from [accelerate_launch]."""
        return AccelerateSettings.from_dict(self.values.get(ACCEL_SECTION, {}))

    def defaults_for(self, kind: str) -> dict[str, Any]:
        """Option values a new `kind` form starts with: schema < built-in kind defaults < group sections < [kind]."""
        trainer = KIND_TO_TRAINER[kind]
        allowed = {o.name for o in schema.options_for(trainer)}
        out = schema.defaults(trainer)
        out.update({k: v for k, v in KIND_DEFAULTS.get(kind, {}).items() if k in allowed})
        for group in schema.GROUPS:
            out.update({k: v for k, v in self.values.get(group, {}).items() if k in allowed})
        out.update({k: v for k, v in self.values.get(kind, {}).items() if k in allowed})
        return out


def load_gui_config(path: str | None = None) -> GuiConfig:
    """Read and check config.toml. A missing file gives the defaults; nothing unknown is silently dropped."""
    path = path or DEFAULT_PATH
    cfg = GuiConfig(path=path)
    if not os.path.exists(path):
        return cfg
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except Exception as e:  # noqa: BLE001 - any parse error is the user's file
        cfg.problems.append(f"{path} is not valid TOML: {e}")
        return cfg
    accel_keys = {f.name for f in fields(AccelerateSettings)}
    for section, table in data.items():
        if not isinstance(table, dict):
            cfg.unknown_keys.append(section)
            cfg.problems.append(f"{path}: '{section}' must be a [section]; top-level keys are not used")
            continue
        kept: dict[str, Any] = {}
        for key, value in table.items():
            name = schema.ALIASES.get(key, key)
            if section == GUI_SECTION:
                ok = key in GUI_KEYS
            elif section == ACCEL_SECTION:
                ok = key in accel_keys
            elif section in schema.GROUPS or section in KIND_TO_TRAINER:
                ok = name in schema.BY_NAME
            else:
                cfg.unknown_keys.append(f"{section}")
                cfg.problems.append(f"{path}: unknown section [{section}]")
                break
            if not ok:
                cfg.unknown_keys.append(f"{section}.{key}")
                cfg.problems.append(f"{path}: unknown key '{key}' in [{section}]; check its spelling")
                continue
            if section not in (GUI_SECTION, ACCEL_SECTION) and schema.BY_NAME[name].secret:
                env = schema.BY_NAME[name].env
                cfg.problems.append(f"{path}: '{key}' in [{section}] is a secret and is not read from config.toml; "
                                    f"set {env} in the environment the GUI runs in" if env else
                                    f"{path}: '{key}' in [{section}] is a secret and is not read from config.toml")
                continue
            kept[name if section not in (GUI_SECTION, ACCEL_SECTION) else key] = value
        else:
            cfg.values[section] = kept
    _check_values(cfg)
    return cfg


def _check_values(cfg: GuiConfig) -> None:
    for section, table in cfg.values.items():
        if section in schema.GROUPS or section in KIND_TO_TRAINER:
            for name, value in table.items():
                trainer = next((t for t in schema.TRAINERS if schema.BY_NAME[name].applies_to(t)), "network")
                kind = next(k for k, t in KIND_TO_TRAINER.items() if t == trainer)
                try:
                    normalize_values(section if section in KIND_TO_TRAINER else kind, {name: value})
                except CommandError as e:
                    cfg.problems.append(f"{cfg.path}: [{section}] {e}")
    try:
        cfg.accelerate()
    except (CommandError, TypeError) as e:
        cfg.problems.append(f"{cfg.path}: [{ACCEL_SECTION}] {e}")


# ------------------------------------------------------------------ the committed, commented file

def _literal(value: Any) -> str:
    return schema._toml_literal(value)


def _comment_lines(text: str) -> list[str]:
    import textwrap

    return ["# " + line for line in textwrap.wrap(text, 110)]


def default_config_text() -> str:
    """The commented config.toml documenting every option, generated from the schema."""
    out = ["# kohya studio GUI defaults. Generated from sd_scripts/options.py by",
           "#   python -m kohya_gui.gui_config --write",
           "# Uncomment a line to change a default. Unknown keys are reported when the GUI starts, never ignored.",
           "# Per-kind sections ([lora], [dreambooth], [finetune], [ti]) at the end win over the group sections.", ""]
    out += [f"[{GUI_SECTION}]"]
    for key, (default, help_text) in GUI_KEYS.items():
        out += _comment_lines(help_text) + [f"# {key} = {_literal(default)}"]
    out += ["", f"[{ACCEL_SECTION}]", "# Flags of `accelerate launch` (multi-GPU, multi-node, DeepSpeed/FSDP via "
                                      "config_file)."]
    for f in fields(AccelerateSettings):
        default = [] if f.name == "extra_args" else f.default
        shown = "(unset)" if default is None else _literal(default)
        out.append(f"# {f.name} = {shown}")
    for group, title in schema.GROUPS.items():
        opts = [o for o in schema.OPTIONS if o.group == group and o.name not in ("events_file", "control_dir")
                and not o.secret]
        secrets = [o for o in schema.OPTIONS if o.group == group and o.secret]
        if not opts:
            continue
        out += ["", f"# ---- {title}", f"[{group}]"]
        for opt in opts:
            trainers = "" if opt.trainers == schema.ALL_TRAINERS else f" [{', '.join(sorted(opt.trainers))} only]"
            families = "" if opt.families == schema.ALL_FAMILIES else f" [{', '.join(sorted(opt.families))} models]"
            choices = f" Choices: {', '.join(str(c) for c in opt.choices if c is not None)}." if opt.choices else ""
            out += _comment_lines(f"{opt.help}{choices}{trainers}{families}")
            shown = "(unset)" if opt.default is None else _literal(opt.default)
            out.append(f"# {opt.name} = {shown}")
        for opt in secrets:
            out += _comment_lines(f"{opt.name}: a secret, never read from this file (nor written to presets or job "
                                  f"files): set {opt.env} in the environment the GUI runs in, or type it in the form.")
    for kind, defaults in KIND_DEFAULTS.items():
        out += ["", f"[{kind}]", f"# Built-in defaults of the {kind} tab (uncomment to change)."]
        out += [f"# {k} = {_literal(v)}" for k, v in defaults.items()]
    return "\n".join(out) + "\n"


def write_default_config(path: str = DEFAULT_PATH) -> str:
    """Write default_config_text() to `path`; returns the path."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(default_config_text())
    return path


if __name__ == "__main__":
    import sys

    if "--write" in sys.argv:
        print(write_default_config())
    else:
        cfg = load_gui_config(sys.argv[1] if len(sys.argv) > 1 else None)
        print("\n".join(cfg.problems) or "config OK")
