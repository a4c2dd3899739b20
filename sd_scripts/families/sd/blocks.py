"""How sd-scripts numbers the U-Net blocks of the SD families for its block-wise settings (networks.lora's
block_dims / *_lr_weight network_args, sdxl_train's block_lr). Torch-free.

SD 1.x / 2.x (diffusers LoRA names), 25 blocks: 0 is never used (conv_in); down block i's ResNet / attention j is
1 + 3i + j and its downsampler 1 + 3i + 2; the middle block is 12; up block i's ResNet / attention j is 13 + 3i + j
and its upsampler 13 + 3i + 2.
SDXL (original/SAI LoRA names), 23 blocks: 0 the time and label embeddings, input_blocks.N is 1 + N,
middle_block.N is 10 + N, output_blocks.N is 13 + N, out is 22.
"""
from __future__ import annotations

import re
from typing import Callable

SD_BLOCKS = dict(down=12, mid=1)  # 12 + 1 + 12 = 25
SDXL_BLOCKS = dict(down=9, mid=3, lead=1, tail=1)  # 1 + 9 + 3 + 9 + 1 = 23
SDXL_BLOCK_COUNT = 23  # sdxl_train's block_lr values

_SD_UPDOWN = re.compile(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_")
_UNET_PREFIX = "lora_unet_"


def sd_block_index(lora_name: str) -> int:
    """Block of an SD 1.x / 2.x U-Net LoRA module (diffusers module names), -1 outside the numbered blocks."""
    match = _SD_UPDOWN.search(lora_name)
    if match:
        side, block, kind, layer = match[1], int(match[2]), match[3], int(match[4])
        index = 3 * block + (2 if kind.endswith("samplers") else layer)
        return 1 + index if side == "down" else 13 + index
    return 12 if "mid_block_" in lora_name else -1


def _sai_block_index(path: str, sep: str) -> int:
    """Block of an SDXL U-Net module path in the SAI layout, its parts joined by `sep` ('_' or '.')."""
    if path.startswith(("time_embed" + sep, "label_emb" + sep)):
        return 0
    if path.startswith("out" + sep):
        return 22
    for head, first in (("input_blocks", 1), ("middle_block", 10), ("output_blocks", 13)):
        if path.startswith(head + sep):
            number = path[len(head) + 1:].split(sep, 1)[0]
            return first + int(number) if number.isdigit() else -1
    return -1


def sdxl_block_index(lora_name: str) -> int:
    """Block of an SDXL U-Net LoRA module (SAI module names), -1 outside the numbered blocks."""
    if not lora_name.startswith(_UNET_PREFIX):
        return -1
    return _sai_block_index(lora_name[len(_UNET_PREFIX):], "_")


def sdxl_parameter_block(name: str, to_sai: Callable[[str], str]) -> int:
    """Block (0-22) of a parameter of a diffusers SDXL U-Net, for sdxl_train's block_lr. `to_sai` maps a diffusers
    module path to the SAI one (sdxl_names.sai_name_map of the U-Net)."""
    if name.startswith(("time_embedding.", "add_embedding.")):
        return 0
    if name.startswith("conv_in."):
        return 1  # input_blocks.0
    if name.startswith(("conv_norm_out.", "conv_out.")):
        return 22
    index = _sai_block_index(to_sai(name), ".")
    if index < 0:
        raise ValueError(f"block_lr: the U-Net parameter {name!r} belongs to no SDXL block")
    return index
