"""DreamBooth full fine-tuning: `python -m sd_scripts.train_db ...` or `accelerate launch -m sd_scripts.train_db`.

Options follow kohya-ss/sd-scripts' train_db.py (see `--help`); `--config_file run.toml` reads them from a file.
"""
import sys

from .training.entry import run_entry
from .training.full_methods import DreamBoothMethod


def main(argv=None) -> int:
    return run_entry("db", argv, DreamBoothMethod, prog="train_db")


if __name__ == "__main__":
    sys.exit(main())
