"""Fine-tune a whole Lumina Image 2.0 denoiser: `accelerate launch -m sd_scripts.lumina_train ...`.

Options follow kohya-ss/sd-scripts' lumina_train.py: the model files as for lumina_train_network, captions from a
metadata JSON (--in_json), a --dataset_config, or the '<repeats>_<class tokens>' concept folders of
--train_data_dir. The trained denoiser is saved as a single file in the Alpha-VLLM layout sd-scripts writes (bare
keys; diffusers' Lumina2Transformer2DModel.from_single_file and ComfyUI read it), or with --save_model_as diffusers
as a Lumina2Pipeline folder.
"""
import sys

from .training.entry import run_entry
from .training.full_methods import FolderFineTuneMethod


def main(argv=None) -> int:
    return run_entry("finetune", argv, FolderFineTuneMethod, prog="lumina_train")


if __name__ == "__main__":
    sys.exit(main())
