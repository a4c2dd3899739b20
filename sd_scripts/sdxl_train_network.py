"""Train an SDXL LoRA: `accelerate launch -m sd_scripts.sdxl_train_network ...`, the command sd-scripts' (and kohya_ss's)
sdxl_train_network.py lines become. The same trainer as train_network; this name takes SDXL models only (another
family's model is refused, naming the script that trains it), as sd-scripts' script does.
"""
import sys

from .training.entry import run_entry
from .training.methods import NetworkMethod


def main(argv=None) -> int:
    return run_entry("network", argv, NetworkMethod, prog="sdxl_train_network")


if __name__ == "__main__":
    sys.exit(main())
