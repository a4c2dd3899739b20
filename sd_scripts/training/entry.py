"""Shared entry-point wrapper: parse options, run the loop, turn user errors into one line and an event.

Exit codes: 0 completed or stopped (the model was saved), 1 failed (an `error` and a `done: failed` event are
written when an events file was given).
"""
from __future__ import annotations

import logging
import sys
import traceback
from typing import Callable, Sequence

from ..errors import UserError
from ..options import OptionError, parse_args


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


def run_entry(trainer: str, argv: Sequence[str] | None, make_method: Callable, prog: str) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(trainer, argv, prog=prog)
    except OptionError as e:
        return _fail(_events_file_from_argv(argv), str(e), e.hint)
    args.trainer_kind, args.trainer_script = trainer, prog  # which script runs: the family check names it
    logging.basicConfig(level=getattr(logging, args.console_log_level, logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
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
