"""Shared entry-point wrapper: parse options, run the loop, turn user errors into one line and an event.

Exit codes: 0 completed or stopped (the model was saved), 1 failed (an `error` and a `done: failed` event are
written when an events file was given).
"""
from __future__ import annotations

import logging
import os
import sys
import traceback
from typing import Callable, Sequence

from ..errors import UserError
from ..options import OptionError, parse_args
from .console_log import setup_console_logging

REDACTED = "***"


def _events_file_from_argv(argv: Sequence[str]) -> str | None:
    for i, item in enumerate(argv):
        if item == "--events_file" and i + 1 < len(argv):
            return argv[i + 1]
        if item.startswith("--events_file="):
            return item.split("=", 1)[1]
    return None


def _fail(events_path: str | None, message: str, hint: str = "") -> int:
    print(f"error: {message}" + (f" ({hint})" if hint else ""), file=sys.stderr, flush=True)
    if events_path:
        try:
            from .events import EventWriter

            with EventWriter(events_path) as ev:
                ev.error(message, hint=hint)
                ev.done("failed", outputs=[])
        except OSError:
            pass
    return 1


def write_output_config(args, trainer: str) -> int:
    """output_config: the options given (no defaults, no secrets) written to --config_file, then exit 0."""
    from ..options import dump_toml

    values = {k: v for k, v in vars(args).items() if k != "output_config"}
    with open(args.config_file, "x", encoding="utf-8") as f:
        f.write(dump_toml(values, trainer))
    logging.getLogger("sd_scripts.train").info("wrote the options to %s", args.config_file)
    return 0


def export_secrets(args, argv: Sequence[str]) -> None:
    """Secret options (wandb_api_key, huggingface_token) go to their environment variables, where wandb and
    huggingface_hub read them (and child processes inherit them); a secret given on the command line is taken out of
    sys.argv, which wandb records, with a warning: the process list still shows it to other users."""
    from ..options import OPTIONS

    for opt in OPTIONS:
        value = getattr(args, opt.name, None)
        if not (opt.secret and opt.env and value):
            continue
        os.environ[opt.env] = value
        flags = (opt.flag, *("--" + a for a in opt.aliases))
        if any(item in flags or item.startswith(tuple(f + "=" for f in flags)) for item in argv):
            logging.getLogger("sd_scripts.train").warning(
                "option '%s' on the command line is visible to other users of this machine: set %s in the "
                "environment (or put it in the --config_file TOML) instead", opt.name, opt.env)
        sys.argv[:] = _scrub(sys.argv, flags)


def _scrub(argv: Sequence[str], flags: tuple[str, ...]) -> list[str]:
    out, hide = [], False
    for item in argv:
        if hide:
            out.append(REDACTED)
            hide = False
        elif item in flags:
            out.append(item)
            hide = True
        elif item.startswith(tuple(f + "=" for f in flags)):
            out.append(item.split("=", 1)[0] + "=" + REDACTED)
        else:
            out.append(item)
    return out


def run_entry(trainer: str, argv: Sequence[str] | None, make_method: Callable, prog: str) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(trainer, argv, prog=prog)
    except OptionError as e:
        return _fail(_events_file_from_argv(argv), str(e), e.hint)
    args.trainer_kind, args.trainer_script = trainer, prog  # which script runs: the family check names it
    try:
        setup_console_logging(args)
    except OSError as e:
        return _fail(args.events_file, f"option 'console_log_file': cannot write {args.console_log_file!r} "
                                       f"({e.strerror or e})", "choose a file in a folder you can write to")
    if args.output_config:
        return write_output_config(args, trainer)
    export_secrets(args, argv)
    from .loop import Trainer

    try:
        trainer_obj = Trainer(args, make_method(args))
    except UserError as e:
        return _fail(args.events_file, str(e), e.hint)
    try:
        trainer_obj.run()
        return 0
    except UserError as e:
        trainer_obj.fail(str(e), e.hint)
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        trainer_obj.fail("interrupted by a second Ctrl-C before the model could be saved", "")
        return 130
    except Exception as e:  # noqa: BLE001 - report every crash in the event stream, then show the traceback
        traceback.print_exc()
        trainer_obj.fail(f"{type(e).__name__}: {e}", "see the log for the traceback")
        return 1
