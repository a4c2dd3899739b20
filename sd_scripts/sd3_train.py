"""Fine-tune a whole SD3 / SD3.5 model: `python -m sd_scripts.sd3_train ...` or `accelerate launch -m
sd_scripts.sd3_train`.

Options follow kohya-ss/sd-scripts' sd3_train.py (see `--help`); captions come from a metadata JSON (`--in_json`,
built with `python -m sd_scripts.tools.build_metadata`), a `--dataset_config`, or (as sd-scripts) the concept folders
of `--train_data_dir` / `--reg_data_dir`. Saves an SAI single file (MMDiT +
autoencoder) or a diffusers folder. Models of another family are refused, naming the script that trains them.
"""
import sys

from .training.entry import run_entry
from .training.full_methods import FolderFineTuneMethod


def main(argv=None) -> int:
    return run_entry("finetune", argv, FolderFineTuneMethod, prog="sd3_train")


if __name__ == "__main__":
    sys.exit(main())
