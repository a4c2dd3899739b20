"""Fill the text-encoder output cache ahead of training (sd-scripts' tools/cache_text_encoder_outputs.py).

    python -m sd_scripts.tools.cache_text_encoder_outputs --pretrained_model_name_or_path MODEL
        (--train_data_dir DIR | --dataset_config D.toml | --config_file run.toml) [--max_token_length 225]
        [--mixed_precision bf16] [--text_encoder_dtype fp16] [--t5xxl_dtype fp16] [--weighted_captions]
        [--apply_t5_attn_mask] [--skip_cache_check] [--sdxl | --flux | ...] [--skip_existing]

Every option of the LoRA trainer is accepted (the same schema). The model is loaded, the dataset built as the
trainer builds it, and each image's caption encoded and written next to it by the trainer's own caching step
(`<stem><family suffix>.npz`, e.g. `_te_outputs.npz`, with the keys and checks of sd_scripts/training/te_cache.py).
A later run with `--cache_text_encoder_outputs_to_disk` reuses them without encoding. Only the text encoders are
moved to the device, in the mixed precision (or `--text_encoder_dtype`; sd-scripts' `--t5xxl_dtype` is the same
option). Models whose family encodes each fixed caption once anyway (FamilySpec.text_encoder_cache off) are
refused, as the trainer refuses the option for them.
"""
from __future__ import annotations

import sys

from .cache_common import SKIP_EXISTING, cache_run, kind_options
from .tool_cli import ToolOption

PROG = "python -m sd_scripts.tools.cache_text_encoder_outputs"

TOOL_OPTIONS = (
    SKIP_EXISTING,
    ToolOption("text_encoder_dtype", str, None,
               "dtype of the text encoders while encoding (default: the mixed precision)",
               choices=("float", "fp16", "bf16"), aliases=("t5xxl_dtype",)),
)


def options():
    return (*kind_options(), *TOOL_OPTIONS)


def main(argv: list[str] | None = None) -> int:
    return cache_run(PROG, argv, TOOL_OPTIONS, "text_encoder_outputs")


if __name__ == "__main__":
    sys.exit(main())
