"""Train a Lumina Image 2.0 LoRA: `accelerate launch -m sd_scripts.lumina_train_network ...`.

Options follow kohya-ss/sd-scripts' lumina_train_network.py (see `--help`): the denoiser as
--pretrained_model_name_or_path (an Alpha-VLLM / Neta Lumina single file with --gemma2 and --ae, or a diffusers
Lumina2Pipeline folder), the Gemma tokenizer from --tokenizer_cache_dir (or next to the Gemma-2 file), the
flow-matching options (--timestep_sampling, default shift; --discrete_flow_shift, default 6.0; --model_prediction_type,
default raw), --network_module networks.lora_lumina with its network_args (train_blocks, split_qkv, attn_dim,
mlp_dim, mod_dim, refiner_dim, embedder_dims). The files use sd-scripts' names; `python -m
sd_scripts.families.lumina.lora_files` converts one for diffusers' Lumina2Pipeline.load_lora_weights. A model of
another family is refused naming the script to use.
"""
import sys

from .training.entry import run_entry
from .training.methods import NetworkMethod


def main(argv=None) -> int:
    return run_entry("network", argv, NetworkMethod, prog="lumina_train_network")


if __name__ == "__main__":
    sys.exit(main())
