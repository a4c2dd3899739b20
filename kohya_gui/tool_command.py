"""Pure command building for the Utilities tab's tools: form values -> the checked values and the argv.

A tool job's kind is `tool:<name>` (`sd_scripts.tools.registry`); its values are kept in `<job>/tool.json` and the
argv is rebuilt from them (and the tool's declared options) when the job starts, as training jobs are from run.toml.
The argv is `[python, "-m", <tool module>, --option=value ..., --list_option item ..., --flag, "--", positional]`:
a scalar travels as one `--name=value` element (a value starting with '-' can never become an option), list items
that start with '-' are refused unless they are numbers, and positionals come after '--'. No shell ever sees a value.
"""
from __future__ import annotations

import json
import os
import shlex
import sys
from typing import Any, Callable

from sd_scripts.tools.registry import UnknownToolError, tool_entry, tool_options

from .command import AccelerateSettings, CommandError, RunCommand, _check_text

KIND_PREFIX = "tool:"
VALUES_FILE = "tool.json"
#: ToolOption.path kinds that name something the tool writes
OUTPUT_PATHS = ("out_file", "out_dir")


def is_tool_kind(kind: str) -> bool:
    return isinstance(kind, str) and kind.startswith(KIND_PREFIX)


def tool_kind(name: str) -> str:
    return KIND_PREFIX + name


def tool_name(kind: str) -> str:
    """'tool:resize_lora' -> 'resize_lora' (CommandError for a kind that is not a registered tool)."""
    name = kind[len(KIND_PREFIX):] if is_tool_kind(kind) else ""
    try:
        tool_entry(name)
    except UnknownToolError:
        raise CommandError("kind", f"unknown tool {kind!r}") from None
    return name


def _one(opt: Any, value: Any) -> Any:
    """One item of `opt` converted to its type (CommandError naming the option)."""
    if opt.type in (int, float):
        if isinstance(value, bool):
            raise CommandError(opt.name, f"expected a number, got {value!r}")
        try:
            number = float(str(value).strip()) if isinstance(value, str) else float(value)
        except (TypeError, ValueError):
            raise CommandError(opt.name, f"{value!r} is not a number") from None
        if opt.type is int:
            if not number.is_integer():
                raise CommandError(opt.name, f"{value!r} is not a whole number")
            return int(number)
        return number
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise CommandError(opt.name, f"expected text, got {value!r}")
    if opt.choices and not all(isinstance(c, str) for c in opt.choices):  # e.g. int choices given as text
        match = [c for c in opt.choices if str(c) == str(value).strip()]
        if not match:
            raise CommandError(opt.name, f"{value!r} is not one of {', '.join(map(str, opt.choices))}")
        return match[0]
    text = str(value).strip() if opt.path else str(value)
    _check_text(opt.name, text, multiline=False)
    if opt.choices and text not in opt.choices:
        raise CommandError(opt.name, f"{text!r} is not one of {', '.join(map(str, opt.choices))}")
    return text


def normalize_tool_values(name: str, values: dict[str, Any],
                          resolve: Callable[[str], str] | None = None) -> dict[str, Any]:
    """Check and convert form values for tool `name`: {option: value}, None for unset; bools as bools, lists as
    lists. Unknown keys, bad types, control characters, values not among the choices and missing required options
    raise CommandError naming the option. `resolve` maps each path value to the path to use (the GUI confines them
    to the file browser's roots; its ValueError is reported for the option)."""
    options = {opt.name: opt for opt in tool_options(name)}
    unknown = sorted(set(values) - set(options))
    if unknown:
        raise CommandError(unknown[0], f"not an option of {name}")
    out: dict[str, Any] = {}
    for opt_name, opt in options.items():
        raw = values.get(opt_name)
        if opt.type is bool:
            if raw not in (None, True, False, "", "true", "false"):
                raise CommandError(opt_name, f"expected true or false, got {raw!r}")
            out[opt_name] = raw in (True, "true")
            continue
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            value = None
        elif opt.nargs:
            if isinstance(raw, str):
                try:
                    items = shlex.split(raw)
                except ValueError as e:
                    raise CommandError(opt_name, f"cannot be split into items ({e}); check the quotes") from None
            elif isinstance(raw, (list, tuple)):
                items = list(raw)
            else:
                raise CommandError(opt_name, f"expected a list, got {raw!r}")
            value = [_one(opt, item) for item in items] or None
        else:
            value = _one(opt, raw)
        if value is not None and opt.path and resolve is not None:
            value = [_resolved(opt_name, v, resolve) for v in value] if isinstance(value, list) \
                else _resolved(opt_name, value, resolve)
        if value is not None and opt.type is str and opt.nargs:
            for item in value:
                if item.startswith("-"):
                    raise CommandError(opt_name, f"item {item!r} starts with '-' (it would be read as an option)")
        if value is None and opt.required:
            raise CommandError(opt_name, "is required")
        out[opt_name] = value
    positional = [o for o in options.values() if o.positional]
    for opt in positional:
        if out.get(opt.name) is None:
            raise CommandError(opt.name, "is required")
    return out


def _resolved(option: str, path: str, resolve: Callable[[str], str]) -> str:
    try:
        return resolve(path)
    except ValueError as e:
        raise CommandError(option, str(e)) from None


def _text(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def tool_argv(name: str, values: dict[str, Any], python: str = sys.executable) -> list[str]:
    """The argv of tool `name` for normalised `values` (see the module doc)."""
    argv = [python, "-m", tool_entry(name).module]
    positionals: list[str] = []
    for opt in tool_options(name):
        value = values.get(opt.name)
        if value is None or value is False:
            continue
        if opt.positional:
            positionals += [_text(v) for v in value] if isinstance(value, list) else [_text(value)]
        elif opt.type is bool:
            argv.append("--" + opt.name)
        elif isinstance(value, list):
            argv += ["--" + opt.name, *(_text(v) for v in value)]
        else:
            argv.append(f"--{opt.name}={_text(value)}")
    if positionals:
        argv += ["--", *positionals]
    return argv


def output_paths(name: str, values: dict[str, Any]) -> list[str]:
    """The paths the tool writes (its out_file / out_dir options that are set)."""
    out = []
    for opt in tool_options(name):
        value = values.get(opt.name)
        if opt.path in OUTPUT_PATHS and value:
            out += [str(v) for v in value] if isinstance(value, list) else [str(value)]
    return out


def build_tool_command(kind: str, values: dict[str, Any], accel: AccelerateSettings | None, job_dir: str,
                       python: str = sys.executable) -> RunCommand:
    """Tool form values -> RunCommand (the values file in place of a run TOML). Pure: writes nothing. `accel` is
    ignored (tools are not launched through accelerate); the signature is build_command's."""
    name = tool_name(kind)
    normalized = normalize_tool_values(name, values)
    job_dir = os.path.abspath(job_dir)
    _check_text("job_dir", job_dir, multiline=False)
    return RunCommand(argv=tool_argv(name, normalized, python), toml_text=json.dumps(normalized, indent=2),
                      toml_path=os.path.join(job_dir, VALUES_FILE), prompts_text=None, prompts_path=None,
                      trainer=kind, values=normalized)


def path_problems(name: str, values: dict[str, Any]) -> list[CommandError]:
    """What is wrong with the paths of normalised `values` on this machine, before a job is queued: inputs that do
    not exist (or are not a file / folder as the option needs), outputs whose folder is missing or not writable.
    The one function here that looks at the file system (existence and permission checks only)."""
    problems = []
    for opt in tool_options(name):
        value = values.get(opt.name)
        for path in (value if isinstance(value, list) else [value] if value else []):
            path = str(path)
            if opt.path == "file" and not os.path.isfile(path):
                problems.append(CommandError(opt.name, f"{path} is not a file; check the path"))
            elif opt.path == "dir" and not os.path.isdir(path):
                problems.append(CommandError(opt.name, f"{path} is not a folder; check the path"))
            elif opt.path == "file_or_dir" and not os.path.exists(path):
                problems.append(CommandError(opt.name, f"{path} does not exist; check the path"))
            elif opt.path in OUTPUT_PATHS:
                folder = path if opt.path == "out_dir" and os.path.isdir(path) else os.path.dirname(path)
                if os.path.isdir(path) and opt.path == "out_file":
                    problems.append(CommandError(opt.name, f"{path} is a folder; name the file to write"))
                elif not os.path.isdir(folder):
                    problems.append(CommandError(opt.name, f"the folder {folder} does not exist; create it or "
                                                           f"choose another"))
                elif not os.access(folder, os.W_OK):
                    problems.append(CommandError(opt.name, f"the folder {folder} is not writable by the GUI's "
                                                           f"user; choose another"))
    return problems


def read_tool_values(job_dir: str) -> dict[str, Any]:
    """The values a tool job was queued with (ValueError when the file is not a JSON object)."""
    with open(os.path.join(job_dir, VALUES_FILE), encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{VALUES_FILE} holds {type(data).__name__}, not an object")
    return data
