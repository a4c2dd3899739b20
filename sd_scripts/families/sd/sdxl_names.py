"""SDXL LoRA files name U-Net layers by the original (LDM/SAI) module paths, not the diffusers ones.

    down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k -> input_blocks.4.1.transformer_blocks.0.attn2.to_k
    mid_block.attentions.0.proj_in                            -> middle_block.1.proj_in
    up_blocks.0.resnets.2.conv1                               -> output_blocks.2.0.in_layers.2
    time_embedding.linear_1                                   -> time_embed.0  (conv_in, conv_out, add_embedding)

The SDXL base U-Net has 2 ResNets per down block and 3 per up block; only block 0 and the last up block's
neighbours lack attention. Inside transformer blocks the names are the same in both layouts. `sai_name_map(unet)`
reads the block layout from a U-Net's config instead (tiny test models have 1 ResNet per down block), as the
single-file key maps and diffusers' own SGM-name conversion do.
"""
from __future__ import annotations

import re
from functools import partial
from typing import Any, Callable

DOWN_LAYERS = 2  # ResNets per down block (SDXL base)
UP_LAYERS = DOWN_LAYERS + 1
UP_BLOCKS_WITH_ATTENTION = (0, 1)  # SDXL up blocks 0 and 1 have attentions; block 2 does not

_RESNET_TAILS = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
                 "conv_shortcut": "skip_connection", "norm1": "in_layers.0", "norm2": "out_layers.0"}


def _resnet_tail(tail: str) -> str:
    head, _, rest = tail.partition(".")
    return _RESNET_TAILS.get(head, head) + (f".{rest}" if rest else "")


def sai_name_map(unet: Any) -> Callable[[str], str]:
    """diffusers_to_sai_module_path for the block layout of `unet` (layers_per_block, up blocks with attention)."""
    config = getattr(unet, "config", None)
    layers = getattr(config, "layers_per_block", DOWN_LAYERS)
    up_types = getattr(config, "up_block_types", None)
    if not isinstance(layers, int) or not up_types:
        return diffusers_to_sai_module_path
    with_attention = tuple(i for i, kind in enumerate(up_types) if "CrossAttn" in kind)
    return partial(diffusers_to_sai_module_path, layers_per_block=layers, up_blocks_with_attention=with_attention)


def diffusers_to_sai_module_path(path: str, layers_per_block: int = DOWN_LAYERS,
                                 up_blocks_with_attention: tuple[int, ...] = UP_BLOCKS_WITH_ATTENTION) -> str:
    """A diffusers SDXL U-Net module path -> the SAI/LDM path used in SDXL LoRA file names (others unchanged)."""
    down_layers, up_layers = layers_per_block, layers_per_block + 1
    match = re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.+)", path)
    if match:
        block, kind, index, tail = int(match[1]), match[2], int(match[3]), match[4]
        if kind == "downsamplers":
            return f"input_blocks.{(block + 1) * (down_layers + 1)}.0.{'op' if tail == 'conv' else tail}"
        n = block * (down_layers + 1) + index + 1
        return f"input_blocks.{n}.0.{_resnet_tail(tail)}" if kind == "resnets" else f"input_blocks.{n}.1.{tail}"
    match = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", path)
    if match:
        kind, index, tail = match[1], int(match[2]), match[3]
        if kind == "attentions":
            return f"middle_block.1.{tail}"
        return f"middle_block.{2 * index}.{_resnet_tail(tail)}"
    match = re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.+)", path)
    if match:
        block, kind, index, tail = int(match[1]), match[2], int(match[3]), match[4]
        if kind == "upsamplers":
            slot = 2 if block in up_blocks_with_attention else 1
            return f"output_blocks.{block * up_layers + up_layers - 1}.{slot}.{tail}"
        n = block * up_layers + index
        return f"output_blocks.{n}.0.{_resnet_tail(tail)}" if kind == "resnets" else f"output_blocks.{n}.1.{tail}"
    # layers outside the blocks (conv_in, time / size embeddings, conv_out: LyCORIS' full preset adapts them)
    from ...models.keymaps import _UNET_TOP

    return _UNET_TOP.get(path, path)
