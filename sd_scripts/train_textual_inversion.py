"""Train a textual-inversion embedding: `python -m sd_scripts.train_textual_inversion ...` or
`accelerate launch -m sd_scripts.train_textual_inversion ...`.

Options follow kohya-ss/sd-scripts' train_textual_inversion.py (token_string, init_word, num_vectors_per_token,
weights, use_object_template, use_style_template; see `--help`); `--config_file run.toml` reads them from a file.
"""
import sys

from .training.entry import run_entry
from .training.ti_method import TextualInversionMethod


def main(argv=None) -> int:
    return run_entry("ti", argv, TextualInversionMethod, prog="train_textual_inversion")


if __name__ == "__main__":
    sys.exit(main())
