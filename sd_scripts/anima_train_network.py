"""Train a kohya-format LoRA on an Anima model: `python -m sd_scripts.anima_train_network ...` or
`accelerate launch -m sd_scripts.anima_train_network`.

Options follow kohya-ss/sd-scripts' anima_train_network.py (see `--help`): the DiT file as
--pretrained_model_name_or_path, --qwen3, --vae; `--network_module networks.lora_anima`. Models of another family are
refused, naming the script that trains them.
"""
import sys

from .training.entry import run_entry
from .training.methods import NetworkMethod


def main(argv=None) -> int:
    return run_entry("network", argv, NetworkMethod, prog="anima_train_network")


if __name__ == "__main__":
    sys.exit(main())
