"""Command line of the GUI: flags, the refusal to expose an unauthenticated server, then launch.

Only the standard library is imported until the flags are parsed, so `--help` and refusals are instant; gradio and
the app are imported only when the server really starts.
"""
from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kohya_gui.py",
        description="Browser GUI to configure, launch and watch Stable Diffusion LoRA / DreamBooth / fine-tuning runs.")
    parser.add_argument("--listen", default="127.0.0.1",
                        help="Address to listen on (default 127.0.0.1; 0.0.0.0 exposes the GUI to the network and "
                             "needs --username and --password).")
    parser.add_argument("--server_port", type=int, default=0,
                        help="Port (default: 7860, or the next free one).")
    parser.add_argument("--share", action="store_true",
                        help="Make a public gradio.live link (needs --username and --password).")
    parser.add_argument("--username", default=None, help="User name for the login page.")
    parser.add_argument("--password", default=None,
                        help="Password for the login page (or set KOHYA_GUI_PASSWORD, which keeps it out of `ps`).")
    parser.add_argument("--inbrowser", action="store_true", help="Open the GUI in the default browser.")
    parser.add_argument("--headless", action="store_true", help="Never open a browser (for servers).")
    parser.add_argument("--config", default=None,
                        help="GUI defaults file (default: config.toml in the project folder when it exists).")
    parser.add_argument("--root_path", default=None, help="URL prefix when served behind a reverse proxy.")
    parser.add_argument("--jobs_dir", default=None,
                        help="Folder of the run folders (default: jobs/ in the project folder).")
    parser.add_argument("--insecure", action="store_true",
                        help="Allow listening beyond this machine or sharing WITHOUT a login (anyone who can reach "
                             "the port can run programs as you).")
    return parser


def is_loopback(host: str) -> bool:
    """True when `host` only accepts connections from this machine."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_error(args: argparse.Namespace) -> str | None:
    """The one-line refusal when the server would be reachable by others without credentials, else None."""
    if args.insecure or (args.username and args.password):
        return None
    if args.username or args.password:
        return "kohya_gui: --username and --password must be given together."
    if args.share:
        return ("kohya_gui: refusing --share without a login: a public link lets anyone start programs on this "
                "machine. Add --username and --password (or --insecure if you really mean it).")
    if not is_loopback(args.listen):
        return (f"kohya_gui: refusing to listen on {args.listen} without a login: anyone on the network could start "
                "programs on this machine. Add --username and --password, listen on 127.0.0.1, or pass --insecure.")
    return None


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill defaults that depend on the environment (password from the environment, config and jobs paths)."""
    if args.password is None:
        args.password = os.environ.get("KOHYA_GUI_PASSWORD") or None
    if args.config is None and (PROJECT_ROOT / "config.toml").is_file():
        args.config = str(PROJECT_ROOT / "config.toml")
    if args.jobs_dir is None:
        args.jobs_dir = str(PROJECT_ROOT / "jobs")
    return args


def main(argv: list[str] | None = None) -> int:
    args = resolve_args(build_parser().parse_args(argv))
    error = exposure_error(args)
    if error:
        print(error, file=sys.stderr)
        return 2
    if args.config and not os.path.isfile(args.config):
        print(f"kohya_gui: config file {args.config!r} does not exist; check --config.", file=sys.stderr)
        return 2
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline first: no phoning home at start
    from kohya_gui.app import launch  # gradio is imported here, after the flags are known

    return launch(args)
