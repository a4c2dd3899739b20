"""Train an SDXL textual-inversion embedding: `accelerate launch -m sd_scripts.sdxl_train_textual_inversion ...`, the
command sd-scripts' sdxl_train_textual_inversion.py lines become (the embedding file holds clip_l and clip_g vectors).
The same trainer as train_textual_inversion, taking SDXL models only, as sd-scripts' script.
"""
import sys

from .training.entry import run_entry
from .training.ti_method import TextualInversionMethod


def main(argv=None) -> int:
    return run_entry("ti", argv, TextualInversionMethod, prog="sdxl_train_textual_inversion")


if __name__ == "__main__":
    sys.exit(main())
