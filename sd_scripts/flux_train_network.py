"""Train a FLUX.1 (dev, schnell) or Chroma LoRA: `accelerate launch -m sd_scripts.flux_train_network ...`.

Options follow kohya-ss/sd-scripts' flux_train_network.py (see `--help`): the denoiser as
--pretrained_model_name_or_path (a BFL single file with --clip_l / --t5xxl / --ae, or a diffusers folder), the
flow-matching options (--timestep_sampling, --model_prediction_type, --guidance_scale, ...), --network_module
networks.lora_flux with its network_args (train_blocks, split_qkv, train_t5xxl). The files load in ComfyUI and in
diffusers' FluxPipeline.load_lora_weights. A model of another family is refused naming the script to use.
"""
import sys

from .training.entry import run_entry
from .training.methods import NetworkMethod


def main(argv=None) -> int:
    return run_entry("network", argv, NetworkMethod, prog="flux_train_network")


if __name__ == "__main__":
    sys.exit(main())
