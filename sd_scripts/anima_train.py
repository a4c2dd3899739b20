"""Fine-tune a whole Anima DiT (with its LLM adapter): `python -m sd_scripts.anima_train ...` or `accelerate launch -m
sd_scripts.anima_train`.

Options follow kohya-ss/sd-scripts' anima_train.py (see `--help`), with its per-part learning rates
(--self_attn_lr, --cross_attn_lr, --mlp_lr, --mod_lr, --llm_adapter_lr; 0 freezes a part). Captions come from a
metadata JSON (`--in_json`), a `--dataset_config`, or the concept folders of `--train_data_dir`. Saves the DiT as the
`net.`-prefixed single file users load (ComfyUI, sd-scripts). Models of another family are refused.
"""
import sys

from .training.entry import run_entry
from .training.full_methods import FolderFineTuneMethod


def main(argv=None) -> int:
    return run_entry("finetune", argv, FolderFineTuneMethod, prog="anima_train")


if __name__ == "__main__":
    sys.exit(main())
