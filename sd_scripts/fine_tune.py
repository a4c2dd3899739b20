"""Fine-tuning from a metadata JSON: `python -m sd_scripts.fine_tune ...` or `accelerate launch -m sd_scripts.fine_tune`.

Options follow kohya-ss/sd-scripts' fine_tune.py (see `--help`); `--config_file run.toml` reads them from a file.
Build the `--in_json` file with `python -m sd_scripts.tools.build_metadata`.
"""
import sys

from .training.entry import run_entry
from .training.full_methods import FineTuneMethod


def main(argv=None) -> int:
    return run_entry("finetune", argv, FineTuneMethod, prog="fine_tune")


if __name__ == "__main__":
    sys.exit(main())
