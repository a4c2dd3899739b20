"""Train a kohya-format LoRA on an SD3 / SD3.5 model: `python -m sd_scripts.sd3_train_network ...` or
`accelerate launch -m sd_scripts.sd3_train_network`.

Options follow kohya-ss/sd-scripts' sd3_train_network.py (see `--help`); `--config_file run.toml` reads them from a
file. Models of another family are refused, naming the script that trains them.
"""
import sys

from .training.entry import run_entry
from .training.methods import NetworkMethod


def main(argv=None) -> int:
    return run_entry("network", argv, NetworkMethod, prog="sd3_train_network")


if __name__ == "__main__":
    sys.exit(main())
