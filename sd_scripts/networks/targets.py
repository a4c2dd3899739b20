"""Which layers of a U-Net or text encoder a kohya-format LoRA adapts, and the names they get in the file.

Facts (FORMATS.md 'LoRA file'): the default targets are the Linear and 1x1 Conv layers inside the U-Net's transformer
blocks and the text encoder's attention and MLP layers; LoCon (`conv_dim`) adds the ResNet blocks (3x3 convs at the
conv rank, time-embedding Linear and 1x1 shortcut at the base rank) and the down/up-sampler convs. A module's file
name is the prefix plus its module path with every '.' replaced by '_'.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

from torch import nn

UNET_ATTENTION_CLASSES = ("Transformer2DModel",)
UNET_CONV_CLASSES = ("ResnetBlock2D",)
UNET_SAMPLER_CLASSES = ("Downsample2D", "Upsample2D")
TEXT_ENCODER_CLASSES = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")
T5_CLASSES = ("T5Attention", "T5DenseGatedActDense")  # a T5 encoder's LoRA targets (sd-scripts' train_t5xxl)


SWAP_HALVES = "swap_halves"  # name_map marker, see find_targets


@dataclass(frozen=True)
class Target:
    """A layer to adapt: its name in the file, its diffusers module path, the layer, and its kind."""

    lora_name: str
    module_path: str
    module: nn.Module
    kind: str  # "linear", "conv1x1" or "conv3x3" (any kernel larger than 1x1)
    part: tuple[int, int] | None = None  # (index, count) of a layer the file fuses with others into one module
    swap_halves: bool = False  # the file's layout stores this layer's output halves the other way round

    @property
    def is_conv_kxk(self) -> bool:
        return self.kind == "conv3x3"


def lora_name(prefix: str, module_path: str) -> str:
    """'lora_unet' + 'down_blocks.0.attentions.0.proj_in' -> 'lora_unet_down_blocks_0_attentions_0_proj_in'."""
    return f"{prefix}.{module_path}".replace(".", "_")


def layer_kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv1x1" if tuple(module.kernel_size) == (1, 1) else "conv3x3"
    return None


def _children_in(block_path: str, block: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    class_name = type(block).__name__
    if class_name in UNET_SAMPLER_CLASSES:
        # diffusers may register the same conv twice (`conv` and `Conv2d_0`); the file name uses `conv`.
        conv = getattr(block, "conv", None)
        if isinstance(conv, nn.Conv2d):
            yield f"{block_path}.conv", conv
        return
    for child_path, child in block.named_modules():
        if child_path:
            yield f"{block_path}.{child_path}", child


NameMap = Callable[[str], "str | tuple[str, int, int]"]


def _candidates(root: nn.Module, block_classes: tuple[str, ...], name_map: NameMap | None,
                extra_name_map: NameMap | None) -> Iterator[tuple[str, nn.Module, Any]]:
    """(module path, layer, file path) of every layer inside the target blocks, then of every other layer that
    `extra_name_map` names."""
    seen: set[int] = set()
    for block_path, block in root.named_modules():
        if type(block).__name__ not in block_classes:
            continue
        for path, module in _children_in(block_path, block):
            if layer_kind(module) is None or id(module) in seen:
                continue
            file_path = name_map(path) if name_map else path
            if file_path is not None:  # (a layer the block map leaves out may still be an extra one)
                seen.add(id(module))
                yield path, module, file_path
    if extra_name_map is None:
        return
    for path, module in root.named_modules():
        if layer_kind(module) is None or id(module) in seen:
            continue
        seen.add(id(module))
        yield path, module, extra_name_map(path)


def find_targets(root: nn.Module, prefix: str, block_classes: tuple[str, ...],
                 name_map: NameMap | None = None, extra_name_map: NameMap | None = None) -> list[Target]:
    """Every Linear/Conv2d inside a module whose class name is in `block_classes`, in module order, once each.

    `name_map(module path)` gives the path the file names the layer by, or (file path, part index, part count) for
    a layer the file's layout fuses with others into one module (e.g. FLUX's q/k/v as one qkv Linear), or
    (file path, SWAP_HALVES) for a layer whose two output halves the file's layout stores the other way round
    (SD3's last context adaLN: (shift, scale) there, (scale, shift) in diffusers), or None to leave the layer out.
    `extra_name_map` does the same for the layers outside those blocks (None for each one not adapted), e.g. the
    embedders sd-scripts' `in_dims` / `emb_dims` adapt."""
    targets: dict[object, Target] = {}
    for path, module, file_path in _candidates(root, block_classes, name_map, extra_name_map):
        kind = layer_kind(module)
        if file_path is None:  # the family does not adapt this layer
            continue
        part, swap = None, False
        if isinstance(file_path, tuple) and file_path[1:] == (SWAP_HALVES,):
            file_path, swap = file_path[0], True
        elif isinstance(file_path, tuple):
            file_path, index, count = file_path
            part = (int(index), int(count))
        name = lora_name(prefix, file_path)
        key = name if part is None else (name, part[0])
        if key in targets or (part is not None and name in targets) or \
                (part is None and any(isinstance(k, tuple) and k[0] == name for k in targets)):
            raise ValueError(f"two layers map to the LoRA name {name!r}: {path} and another one")
        targets[key] = Target(name, path, module, kind, part, swap)
    return list(targets.values())


def unet_targets(unet: nn.Module, prefix: str = "lora_unet", *, include_conv: bool = False,
                 name_map: NameMap | None = None, block_classes: tuple[str, ...] | None = None,
                 extra_name_map: NameMap | None = None) -> list[Target]:
    """U-Net layers: transformer blocks; with `include_conv`, also ResNet blocks and samplers (LoCon).
    `block_classes`: the family's own target blocks instead (a DiT's transformer blocks); `extra_name_map`: layers
    outside them (see find_targets)."""
    classes = UNET_ATTENTION_CLASSES + (UNET_CONV_CLASSES + UNET_SAMPLER_CLASSES if include_conv else ())
    return find_targets(unet, prefix, classes if block_classes is None else tuple(block_classes), name_map,
                        extra_name_map)


def text_encoder_targets(text_encoder: nn.Module, prefix: str = "lora_te",
                         block_classes: tuple[str, ...] | None = None) -> list[Target]:
    """Text encoder layers: attention q/k/v/out_proj and MLP fc1/fc2.

    Files name them from `text_model.` (CLIPTextModel's layout before transformers 5, and CLIPTextModelWithProjection's
    still); a transformers-5 CLIPTextModel has no `text_model` level, so the prefix is added back for the file name.
    """
    classes = TEXT_ENCODER_CLASSES if block_classes is None else tuple(block_classes)
    return find_targets(text_encoder, prefix, classes, text_encoder_name_map(text_encoder))


def text_encoder_name_map(text_encoder: nn.Module) -> Callable[[str], str] | None:
    """Module path -> file path of a text encoder's layers: files name CLIP layers from `text_model.`, which a
    transformers-5 CLIPTextModel no longer has (None: the paths are the file's)."""
    clip_without_level = type(text_encoder).__name__.startswith("CLIP") and not hasattr(text_encoder, "text_model")
    return (lambda path: "text_model." + path) if clip_without_level else None
