"""Fine-tune a whole SDXL model: `accelerate launch -m sd_scripts.sdxl_train ...`, the command sd-scripts' sdxl_train.py
lines become. Captions from --in_json, a --dataset_config, or the '<repeats>_<class tokens>' concept folders of
--train_data_dir / --reg_data_dir; both text encoders train with --train_text_encoder (--learning_rate_te1 /
--learning_rate_te2 per encoder, 0 keeps one frozen). SDXL models only, as sd-scripts' script.
"""
import sys

from .training.entry import run_entry
from .training.full_methods import FolderFineTuneMethod


def main(argv=None) -> int:
    return run_entry("finetune", argv, FolderFineTuneMethod, prog="sdxl_train")


if __name__ == "__main__":
    sys.exit(main())
