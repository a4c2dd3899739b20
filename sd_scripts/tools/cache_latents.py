"""Fill the latent cache ahead of training (sd-scripts' tools/cache_latents.py).

    python -m sd_scripts.tools.cache_latents --pretrained_model_name_or_path MODEL
        (--train_data_dir DIR | --dataset_config D.toml | --config_file run.toml) [--resolution 512]
        [--enable_bucket ...] [--vae_batch_size N] [--mixed_precision bf16] [--no_half_vae] [--skip_cache_check]
        [--flip_aug] [--alpha_mask] [--sdxl | --flux | ...] [--skip_existing]

Every option of the LoRA trainer is accepted (the same schema), so the command line of a run works as it is. The
model is loaded, the dataset built as the trainer builds it, and each image's latents written next to it by the
trainer's own caching step (`<stem>_<WWWW>x<HHHH><suffix>.npz`, the family's suffix, with the keys and checks of
sd_scripts/data/latent_cache.py). A later run with `--cache_latents --cache_latents_to_disk` reuses them without
encoding. Only the VAE is moved to the device.
"""
from __future__ import annotations

import sys

from .cache_common import SKIP_EXISTING, cache_run, kind_options

PROG = "python -m sd_scripts.tools.cache_latents"
#: the tool's own options; the others are the LoRA trainer's (sd_scripts.options, trainer 'network')
TOOL_OPTIONS = (SKIP_EXISTING,)


def options():
    """Every option of the tool: its own plus the model-kind flags (the trainer's come from sd_scripts.options)."""
    return (*kind_options(), *TOOL_OPTIONS)


def main(argv: list[str] | None = None) -> int:
    return cache_run(PROG, argv, TOOL_OPTIONS, "latents")


if __name__ == "__main__":
    sys.exit(main())
