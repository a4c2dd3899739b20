"""Pure command building: GUI values -> the run TOML, the sample prompt file text and the launch argv.

Nothing here touches the file system or starts a process; `jobs.py` writes the files and runs the argv.

The argv is `[python, "-m", "accelerate.commands.launch", <accelerate flags>, "-m", <trainer module>,
"--config_file", <job>/run.toml, "--events_file", <job>/events.jsonl, "--control_dir", <job>]`. We run accelerate's
launcher as a module of the SAME python (not the `accelerate` script found on PATH), so the job uses exactly the
interpreter the pre-flight checked. Every user value travels inside the TOML (a JSON-quoted string) or as one argv
element: no shell ever sees it.
"""
from __future__ import annotations

import os
import re
import shlex
import sys
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from sd_scripts import options as schema

from .accelerate_args import ExtraArgsError, check_extra_args

#: GUI training kind -> trainer name of the schema (`sd_scripts.options.TRAINERS`).
KIND_TO_TRAINER: dict[str, str] = {"lora": "network", "dreambooth": "db", "finetune": "finetune", "ti": "ti"}
#: trainer name -> the module `accelerate launch -m` runs.
TRAINER_MODULES: dict[str, str] = {
    "network": "sd_scripts.train_network",
    "db": "sd_scripts.train_db",
    "finetune": "sd_scripts.fine_tune",
    "ti": "sd_scripts.train_textual_inversion",
}
#: The model family the form is set to (a registered family name): chooses the trainer script when the model file
#: does not tell (a family with its own scripts, FamilySpec.trainer_scripts, trains with them); never a trainer option.
FAMILY_KEY = "model_family"
#: GUI fields that are not schema options but that build_command understands.
GUI_FIELDS = ("sample_prompts_text", FAMILY_KEY)
#: Options set by the job itself (on the argv), never taken from values.
JOB_OPTIONS = ("events_file", "control_dir")
#: Free-text options that may hold several lines (everything else must be one line).
MULTILINE_OPTIONS = frozenset({"training_comment", "metadata_description"})
#: Prefix of accelerate settings inside flat value dicts (presets, kohya imports): "accelerate.num_processes".
ACCEL_PREFIX = "accelerate."

RUN_TOML = "run.toml"
PROMPTS_FILE = "prompts.txt"
EVENTS_FILE = "events.jsonl"


class CommandError(ValueError):
    """A value that cannot go into a command; `field` names the option or setting, the message says what to fix."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass
class AccelerateSettings:
    """Flags for `accelerate launch`. mixed_precision None means: use the run's `mixed_precision` option.

    With `config_file` (an accelerate / DeepSpeed / FSDP config made by `accelerate config`) only the settings that
    differ from these defaults are passed, so the file's own values are not overridden by our defaults.
    """

    num_processes: int = 1
    num_machines: int = 1
    machine_rank: int = 0
    main_process_ip: str | None = None
    main_process_port: int | None = None
    mixed_precision: str | None = None
    gpu_ids: str | None = None  # "0,1" or "all"
    num_cpu_threads_per_process: int = 2
    dynamo_backend: str = "no"
    multi_gpu: bool = False
    config_file: str | None = None
    extra_args: list[str] = field(default_factory=list)
    cpu: bool = False  # force CPU even when a GPU is present

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "AccelerateSettings":
        """Build from a dict (config.toml [accelerate_launch], a preset); unknown keys -> CommandError naming them."""
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CommandError(unknown[0], f"unknown accelerate setting (known: {', '.join(sorted(known))})")
        if isinstance(data.get("extra_args"), str):
            try:
                data["extra_args"] = shlex.split(data["extra_args"])
            except ValueError as e:
                raise CommandError("accelerate.extra_args", f"cannot be split into arguments ({e}); check the "
                                                            f"quotes") from None
        data = {k: (None if v == "" and k not in ("dynamo_backend",) else v) for k, v in data.items()}
        return cls(**{k: _accel_value(k, v) for k, v in data.items()})

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for job.json and presets)."""
        return asdict(self)


_ACCEL_INTS = ("num_processes", "num_machines", "machine_rank", "main_process_port", "num_cpu_threads_per_process")
_ACCEL_BOOLS = ("multi_gpu", "cpu")


def _accel_value(name: str, value: Any) -> Any:
    """One accelerate setting with its type checked (presets and imported files may hold anything)."""
    where = f"accelerate.{name}"
    if value is None:
        return None
    if name in _ACCEL_INTS:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        elif isinstance(value, str) and value.strip().isdigit():
            value = int(value.strip())
        if not isinstance(value, int) or isinstance(value, bool):
            raise CommandError(where, f"expected a whole number, got {value!r}")
        return value
    if name in _ACCEL_BOOLS:
        if not isinstance(value, bool):
            raise CommandError(where, f"expected true or false, got {value!r}")
        return value
    if name == "extra_args":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise CommandError(where, f"expected a list of text arguments, got {value!r}")
        return list(value)
    if name == "gpu_ids" and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise CommandError(where, f"expected text, got {value!r}")
    _check_text(where, value, multiline=False)
    return value


@dataclass
class RunCommand:
    """What to write and run for one job: argv (no shell), the run TOML and, if any, the sample prompts file."""

    argv: list[str]
    toml_text: str
    toml_path: str
    prompts_text: str | None
    prompts_path: str | None
    trainer: str = ""
    values: dict[str, Any] = field(default_factory=dict)  # the normalised option values (secrets included)
    env: dict[str, str] = field(default_factory=dict)  # secrets for the trainer's environment (Option.env), never files


def trainer_for(kind: str) -> str:
    """'lora' -> 'network' etc.; also accepts a trainer name. CommandError for anything else."""
    if kind in KIND_TO_TRAINER:
        return KIND_TO_TRAINER[kind]
    if kind in TRAINER_MODULES:
        return kind
    raise CommandError("kind", f"unknown training kind {kind!r}; expected one of {sorted(KIND_TO_TRAINER)}")


def split_accelerate(values: dict[str, Any]) -> tuple[dict[str, Any], AccelerateSettings]:
    """Split 'accelerate.<setting>' keys (presets, kohya imports) from option values."""
    accel = {k[len(ACCEL_PREFIX):]: v for k, v in values.items() if k.startswith(ACCEL_PREFIX)}
    rest = {k: v for k, v in values.items() if not k.startswith(ACCEL_PREFIX)}
    return rest, AccelerateSettings.from_dict(accel)


#: Control characters no text value may hold (tab is fine; line breaks only in multi-line fields).
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _check_text(name: str, text: str, multiline: bool) -> None:
    if "\x00" in text:
        raise CommandError(name, "contains a NUL character; remove it")
    bad = _CONTROL.search(text)
    if bad:
        raise CommandError(name, f"contains the control character {bad.group()!r} (DEL or similar, invisible); "
                                 f"remove it")
    if not multiline and ("\n" in text or "\r" in text):
        raise CommandError(name, "must be a single line (it contains a line break)")


def _coerce(opt: schema.Option, value: Any) -> Any:
    """A GUI widget value -> the option's type. '' means unset (except for str options whose default is '')."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip() == "" and not (opt.type is str and opt.default == ""):
        return None
    if isinstance(value, dict) or (isinstance(value, (list, tuple)) and not opt.nargs):
        raise CommandError(opt.name, f"expected a single {getattr(opt.type, '__name__', 'value')}, got {value!r}")
    if opt.nargs:
        if isinstance(value, str):
            try:
                items = shlex.split(value)
            except ValueError as e:
                raise CommandError(opt.name, f"cannot be split into items ({e}); check the quotes") from None
        elif isinstance(value, (list, tuple)) and all(isinstance(v, (str, int, float)) for v in value):
            items = [str(v) for v in value]
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and opt.type in (int, float):
            items = [str(value)]  # one number for a list of numbers (text_encoder_lr = 5e-5)
        else:
            raise CommandError(opt.name, f"expected a list of text items, got {value!r}")
        for item in items:
            _check_text(opt.name, item, multiline=False)
        if opt.type is not str:  # a list of numbers (base_weights_multiplier)
            try:
                return [opt.type(item) for item in items] or None
            except ValueError:
                raise CommandError(opt.name, f"expected numbers separated by spaces, got {value!r}") from None
        return items or None
    if opt.type is bool:
        if isinstance(value, bool):
            return value
        try:
            return schema._bool_from_text(value)
        except Exception:  # noqa: BLE001
            raise CommandError(opt.name, f"expected true or false, got {value!r}") from None
    if opt.type is str:
        text = str(value)
        _check_text(opt.name, text, multiline=opt.name in MULTILINE_OPTIONS)
        return text
    if isinstance(value, bool):
        raise CommandError(opt.name, f"expected a number, got {value!r}")
    try:
        if opt.type is int:
            number = float(value)
            if not number.is_integer():
                raise ValueError("a whole number is needed")
            return int(number)
        return opt.type(value if not isinstance(value, str) else value.strip())
    except (TypeError, ValueError) as e:
        raise CommandError(opt.name, f"{value!r} is not a valid {getattr(opt.type, '__name__', 'number')}: {e}") \
            from None


def normalize_values(kind: str, values: dict[str, Any]) -> dict[str, Any]:
    """Check and convert GUI values for `kind`: every schema option of the trainer with its default filled in.

    Unknown keys, values of options that do not apply to the trainer (unless unset/default), bad types, NUL
    characters, line breaks in single-line fields and schema validation errors raise CommandError naming the field.
    GUI_FIELDS and 'accelerate.*' keys are ignored here.
    """
    trainer = trainer_for(kind)
    applicable = {o.name for o in schema.options_for(trainer)}
    out = schema.defaults(trainer)
    for key, raw in values.items():
        if key in GUI_FIELDS or key.startswith(ACCEL_PREFIX):
            continue
        name = schema.ALIASES.get(key, key)
        opt = schema.BY_NAME.get(name)
        if opt is None:
            raise CommandError(key, "unknown option (not in the option schema); check its spelling")
        value = _coerce(opt, raw)
        if name not in applicable:
            if value is None or value == opt.default:
                continue
            raise CommandError(name, f"does not apply to the {kind} trainer; clear it")
        out[name] = value
    errors = schema.validate(out, trainer)
    if errors:
        first = errors[0]
        field_name = first.split("'")[1] if first.count("'") >= 2 else "values"
        raise CommandError(field_name, "; ".join(errors))
    return out


def accelerate_flags(accel: AccelerateSettings, mixed_precision: str) -> list[str]:
    """The `accelerate launch` flags (before `-m module`) for these settings."""
    base = AccelerateSettings()
    with_file = bool(accel.config_file)

    def wanted(name: str) -> bool:
        return not with_file or getattr(accel, name) != getattr(base, name)

    flags: list[str] = []
    if accel.config_file:
        _check_text("accelerate.config_file", accel.config_file, multiline=False)
        flags += ["--config_file", accel.config_file]
    # Several processes always go through accelerate's multi-process launcher: with `--cpu` accelerate would
    # silently start ONE process. Without GPUs the trainer then runs data parallel on the CPU over gloo.
    multi = accel.multi_gpu or (accel.num_processes > 1 and not with_file)
    if accel.cpu and not multi:
        flags.append("--cpu")
    if multi:
        flags.append("--multi_gpu")
    for name in ("num_processes", "num_machines", "num_cpu_threads_per_process"):
        value = getattr(accel, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise CommandError(f"accelerate.{name}", f"must be a whole number of at least 1, got {value!r}")
        if wanted(name):
            flags += [f"--{name}", str(value)]
    if not with_file or accel.mixed_precision is not None:
        flags += ["--mixed_precision", mixed_precision]
    if wanted("dynamo_backend"):
        _check_text("accelerate.dynamo_backend", str(accel.dynamo_backend), multiline=False)
        flags += ["--dynamo_backend", str(accel.dynamo_backend)]
    if accel.gpu_ids not in (None, ""):
        _check_text("accelerate.gpu_ids", str(accel.gpu_ids), multiline=False)
        flags += ["--gpu_ids", str(accel.gpu_ids).replace(" ", "")]
    if accel.num_machines > 1 or accel.machine_rank:
        flags += ["--machine_rank", str(int(accel.machine_rank))]
    if accel.main_process_ip not in (None, ""):
        _check_text("accelerate.main_process_ip", str(accel.main_process_ip), multiline=False)
        flags += ["--main_process_ip", str(accel.main_process_ip)]
    if accel.main_process_port not in (None, "", 0):
        flags += ["--main_process_port", str(int(accel.main_process_port))]
    try:
        flags += check_extra_args(list(accel.extra_args or []))
    except ExtraArgsError as e:
        raise CommandError("accelerate.extra_args", str(e)) from None
    return flags


def prompts_file_text(text: str | None) -> str | None:
    """The sample prompt file's content, or None when there are no prompts. NUL characters are refused."""
    if text is None:
        return None
    if not isinstance(text, str):
        raise CommandError("sample_prompts_text", f"must be text, got {type(text).__name__}")
    _check_text("sample_prompts_text", text, multiline=True)
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    if not any(line.strip() and not line.lstrip().startswith("#") for line in lines):
        return None
    return "\n".join(lines).strip("\n") + "\n"


def run_family(values: dict[str, Any]) -> str:
    """The model family a run is for: the model file's (read torch-free from its header or configs), else the form's
    FAMILY_KEY, else the family the options point to (sd_scripts.families.guess_family). CommandError for a
    FAMILY_KEY that is not a registered family."""
    from sd_scripts.families import all_families, family_of_path, guess_family

    chosen = values.get(FAMILY_KEY)
    if chosen not in (None, "") and chosen not in all_families():
        raise CommandError(FAMILY_KEY, f"unknown model family {chosen!r}; choose one of {', '.join(all_families())}")
    model = values.get("pretrained_model_name_or_path")
    return family_of_path(model if isinstance(model, str) and model else None) or chosen or guess_family(values)


def trainer_module(trainer: str, family: str | None = None) -> str:
    """The module `accelerate launch -m` runs: the family's own script for this trainer when it has one
    (FamilySpec.trainer_scripts, e.g. a DiT family's LoRA script), else the generic trainer module."""
    from sd_scripts.families import script_for

    script = script_for(family, trainer) if family else None
    return f"sd_scripts.{script}" if script else TRAINER_MODULES[trainer]


def build_command(kind: str, values: dict[str, Any], accel: AccelerateSettings, job_dir: str,
                  python: str = sys.executable) -> RunCommand:
    """GUI values -> RunCommand. Pure: writes nothing.

    `values` are schema option values (unknown key -> CommandError, a ValueError, naming it) plus the GUI field
    'sample_prompts_text'. When that text holds prompts, it goes to <job_dir>/prompts.txt and `sample_prompts` points
    there (the file is written before launch by the job manager). `events_file` and `control_dir` are always the
    job's. accel.mixed_precision, when set, overrides the option so that accelerate and the trainer agree. The
    trainer module is the run family's own script when it has one (`run_family`, `trainer_module`).
    """
    trainer = trainer_for(kind)
    module = trainer_module(trainer, run_family(values))
    accel = accel or AccelerateSettings()
    values = dict(values)
    if accel.mixed_precision is not None:
        values["mixed_precision"] = accel.mixed_precision
    normalized = normalize_values(kind, values)
    for name in JOB_OPTIONS:
        normalized[name] = None
    job_dir = os.path.abspath(job_dir)
    _check_text("job_dir", job_dir, multiline=False)
    prompts_text = prompts_file_text(values.get("sample_prompts_text"))
    prompts_path = None
    if prompts_text is not None:
        prompts_path = os.path.join(job_dir, PROMPTS_FILE)
        normalized["sample_prompts"] = prompts_path
    toml_path = os.path.join(job_dir, RUN_TOML)
    toml_text = schema.dump_toml(normalized, trainer)
    argv = [python, "-m", "accelerate.commands.launch",
            *accelerate_flags(accel, normalized["mixed_precision"]),
            "-m", module,
            "--config_file", toml_path,
            "--events_file", os.path.join(job_dir, EVENTS_FILE),
            "--control_dir", job_dir]
    return RunCommand(argv=argv, toml_text=toml_text, toml_path=toml_path, prompts_text=prompts_text,
                      prompts_path=prompts_path, trainer=trainer, values=normalized, env=secret_env(normalized))


def secret_env(values: dict[str, Any]) -> dict[str, str]:
    """The secret options' values by environment variable (WANDB_API_KEY, HF_TOKEN): how they reach the trainer.
    dump_toml leaves them out of the run TOML and nothing puts them on the argv."""
    return {opt.env: str(values[opt.name]) for opt in schema.OPTIONS
            if opt.secret and opt.env and values.get(opt.name)}


def format_command(cmd: RunCommand | list[str]) -> str:
    """A copy-pasteable, shell-quoted command line ('Print command'). Only for display; jobs never use a shell."""
    argv = cmd.argv if isinstance(cmd, RunCommand) else list(cmd)
    return shlex.join(argv)
