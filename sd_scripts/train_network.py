"""Train a kohya-format LoRA: `python -m sd_scripts.train_network ...` or `accelerate launch -m sd_scripts.train_network`.

Options follow kohya-ss/sd-scripts' train_network.py (see `--help`); `--config_file run.toml` reads them from a file.
"""
import sys

from .training.entry import run_entry
from .training.methods import NetworkMethod


def main(argv=None) -> int:
    return run_entry("network", argv, NetworkMethod, prog="train_network")


if __name__ == "__main__":
    sys.exit(main())
