"""Train a kohya-format LoRA on HunyuanImage-2.1: `python -m sd_scripts.hunyuan_image_train_network ...` or
`accelerate launch -m sd_scripts.hunyuan_image_train_network`.

Options follow kohya-ss/sd-scripts' hunyuan_image_train_network.py (see `--help`): the DiT file, `--text_encoder`
(Qwen2.5-VL), `--byt5`, `--vae`; `--config_file run.toml` reads them from a file. Models of another family are
refused, naming the script that trains them.
"""
import sys

from .training.entry import run_entry
from .training.methods import NetworkMethod


def main(argv=None) -> int:
    return run_entry("network", argv, NetworkMethod, prog="hunyuan_image_train_network")


if __name__ == "__main__":
    sys.exit(main())
