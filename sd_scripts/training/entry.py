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


#: the scripts that train every family whose FamilySpec.generic_scripts is True, per trainer
GENERIC_SCRIPTS = {"network": "train_network", "db": "train_db", "finetune": "fine_tune",
                   "ti": "train_textual_inversion"}


def check_script(prog: str, trainer: str, args) -> None:
    """Refuse, before any heavy work, a model or a family-specific option this script does not train, naming the
    script that does: a family's own script (`FamilySpec.trainer_scripts`) takes only that family's models and
    options; the generic scripts take the families with `generic_scripts`, and no option only the others have."""
    from ..families import all_families, family_for_script, family_of_path, family_spec
    from ..options import OPTIONS

    own = family_for_script(prog)
    generic = GENERIC_SCRIPTS.get(trainer, prog)
    set_options = [o for o in OPTIONS if o.family_specific and getattr(args, o.name, o.default) not in
                   (None, False, o.default)]
    for option in set_options:
        if own is not None and not own.accepts_option(option.name):
            raise OptionError(f"option '{option.name}' does not apply to {own.label} models, which {prog} trains: "
                              f"remove it")
        takers = [s for s in all_families().values() if s.accepts_option(option.name)]
        if own is None and takers and not any(s.generic_scripts for s in takers):
            where = " or ".join(sorted({s.script_for(trainer, generic) or s.label for s in takers}))
            raise OptionError(f"option '{option.name}' is for {takers[0].label} models, which {prog} does not "
                              f"train: use {where}")
    path = getattr(args, "pretrained_model_name_or_path", None)
    found = family_of_path(path)
    if found is None or (own is not None and own.name == found):
        return
    model = family_spec(found)
    if own is None and model.generic_scripts:
        return
    right = model.script_for(trainer, generic)
    fix = f"use python -m sd_scripts.{right}" if right else f"no script trains {model.label} models this way"
    if own is None:
        raise OptionError(f"{path}: this is a {model.label} model, which {prog} does not train: {fix}")
    raise OptionError(f"{path}: this is a {model.label} model, but {prog} trains {own.label} models: {fix}")


def run_entry(trainer: str, argv: Sequence[str] | None, make_method: Callable, prog: str) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(trainer, argv, prog=prog)
        check_script(prog, trainer, args)
    except OptionError as e:
        return _fail(_events_file_from_argv(argv), str(e), e.hint)
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
