"""The trainer's console log: console_log_level, console_log_file (the log goes to that file instead of the console),
console_log_simple (the message only, without time, level and logger name), as sd-scripts' options mean them.

Only handlers installed here, and plain console handlers, are replaced: handlers other code adds (a test's capture,
a file handler) stay.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

_MARK = "_sd_scripts_console_handler"
FULL_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
SIMPLE_FORMAT = "%(message)s"


def setup_console_logging(args: argparse.Namespace) -> logging.Handler:
    """Install the run's log handler on the root logger; returns it."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _MARK, False) or type(handler) is logging.StreamHandler:
            root.removeHandler(handler)
            if getattr(handler, _MARK, False) and isinstance(handler, logging.FileHandler):
                handler.close()
    path = getattr(args, "console_log_file", None)
    if path:
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        handler = logging.FileHandler(path, mode="w", encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    fmt = SIMPLE_FORMAT if getattr(args, "console_log_simple", False) else FULL_FORMAT
    handler.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
    setattr(handler, _MARK, True)
    root.addHandler(handler)
    root.setLevel(getattr(logging, getattr(args, "console_log_level", None) or "INFO"))
    return handler


def remove_console_logging() -> None:
    """Take our handler off again (in-process runs, tests)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _MARK, False):
            root.removeHandler(handler)
            handler.close()
