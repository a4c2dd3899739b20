"""Fine-tune a whole FLUX.1 / Chroma denoiser: `accelerate launch -m sd_scripts.flux_train ...`.

Options follow kohya-ss/sd-scripts' flux_train.py: the model files as for flux_train_network, captions from a metadata
JSON (--in_json, built with `python -m sd_scripts.tools.build_metadata`), a --dataset_config, or (as sd-scripts) the
'<repeats>_<class tokens>' concept folders of --train_data_dir / --reg_data_dir. The trained denoiser is
saved as a single file in the Black Forest Labs layout (what flux1-dev.safetensors holds; diffusers'
FluxTransformer2DModel.from_single_file and ComfyUI read it), or with --save_model_as diffusers as a pipeline folder.
"""
import sys

from .training.entry import run_entry
from .training.full_methods import FolderFineTuneMethod


def main(argv=None) -> int:
    return run_entry("finetune", argv, FolderFineTuneMethod, prog="flux_train")


if __name__ == "__main__":
    sys.exit(main())
