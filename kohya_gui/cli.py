"""Command line of the GUI: flags, the refusal to expose an unauthenticated server, then launch.

Only the standard library is imported until the flags are parsed, so `--help` and refusals are instant; gradio and
the app are imported only when the server really starts.
"""
from __future__ import annotations

import argparse
import ipaddress
import os
import sys

LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")
PASSWORD_ENV = "KOHYA_GUI_PASSWORD"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kohya_gui.py",
        description="Browser GUI to configure, launch and watch Stable Diffusion LoRA / DreamBooth / fine-tuning runs.")
    parser.add_argument("--listen", default=None,
                        help="Address to listen on (default: [gui] listen of config.toml, else 127.0.0.1; 0.0.0.0 "
                             "exposes the GUI to the network and needs --username and --password).")
    parser.add_argument("--server_port", type=int, default=0,
                        help="Port (default: [gui] server_port of config.toml, else 7860 or the next free one).")
    parser.add_argument("--share", action="store_true",
                        help="Make a public gradio.live link (needs --username and --password).")
    parser.add_argument("--username", default=None, help="User name for the login page.")
    parser.add_argument("--password", default=None,
                        help="Password for the login page (or set KOHYA_GUI_PASSWORD, which keeps it out of `ps`).")
    parser.add_argument("--inbrowser", action="store_true", help="Open the GUI in the default browser.")
    parser.add_argument("--headless", action="store_true", help="Never open a browser (for servers).")
    parser.add_argument("--config", default=None,
                        help="GUI defaults file (default: config.toml in the project folder when it exists). "
                             "Unknown keys are reported at start and on the page.")
    parser.add_argument("--root_path", default=None, help="URL prefix when served behind a reverse proxy.")
    parser.add_argument("--jobs_dir", default=None,
                        help="Folder of the run folders (default: [gui] jobs_dir of config.toml, else jobs/ in the "
                             "project folder).")
    parser.add_argument("--allowed_hosts", default="",
                        help="Extra host names (comma separated) the GUI answers to, e.g. the name a reverse proxy "
                             "or DNS uses; other Host headers are refused (DNS-rebinding protection).")
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
    listen = gradio_bind_address(args.listen)
    if not is_loopback(listen):
        shown = listen or "all interfaces (an empty address)"
        return (f"kohya_gui: refusing to listen on {shown} without a login: anyone on the network could start "
                "programs on this machine. Add --username and --password, listen on 127.0.0.1, or pass --insecure.")
    return None


def gradio_bind_address(listen: str | None) -> str:
    """The address Gradio will really bind for `listen`, by Gradio's own rule (`server_name or
    os.getenv("GRADIO_SERVER_NAME", "127.0.0.1")`): an empty --listen / config value falls back to the environment,
    which container images often set to 0.0.0.0. The result is passed to Gradio explicitly."""
    return listen or os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1")


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Flags win; what they leave unset comes from config.toml's [gui] section (loaded into args.gui_config)."""
    from kohya_gui.gui_config import GUI_KEYS, load_gui_config  # schema only: no gradio, no torch

    env_password = os.environ.pop(PASSWORD_ENV, None)  # read once; jobs and TensorBoard never inherit it
    if args.password is None:
        args.password = env_password or None
    config = args.gui_config = load_gui_config(args.config)
    if args.listen is None:
        args.listen = str(config.gui("listen"))
    args.listen = gradio_bind_address(args.listen)
    if not args.server_port and config.gui("server_port") != GUI_KEYS["server_port"][0]:
        args.server_port = int(config.gui("server_port"))  # else 0: gradio takes 7860 or the next free port
    args.inbrowser = args.inbrowser or bool(config.gui("inbrowser"))
    if args.jobs_dir is None:
        args.jobs_dir = config.path_setting("jobs_dir")
    return args


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.config and not os.path.isfile(args.config):
        print(f"kohya_gui: config file {args.config!r} does not exist; check --config.", file=sys.stderr)
        return 2
    args = resolve_args(args)
    error = exposure_error(args)
    if error:
        print(error, file=sys.stderr)
        return 2
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline first: no phoning home at start
    from kohya_gui.app import launch  # gradio is imported here, after the flags are known

    return launch(args)
