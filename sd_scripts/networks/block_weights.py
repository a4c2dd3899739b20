"""Block-wise `network_args` of networks.lora, read as sd-scripts reads them, for U-Net families.

- Ranks and alphas per U-Net block: `block_dims`, `block_alphas` (Linear and 1x1 conv layers), `conv_block_dims`,
  `conv_block_alphas` (3x3 convs, LoCon): one comma-separated value per block.
- Learning-rate weights per block: `down_lr_weight`, `up_lr_weight` (one value per down / up block, or a preset:
  cosine, sine, linear, reverse_linear, zeros, optionally '+offset' such as 'sine+0.5'), `mid_lr_weight` (values),
  `block_lr_zero_threshold` (a weight not above it becomes 0). A block whose weight is 0 is not trained at all: its
  layers get no LoRA module.

How a U-Net is numbered is the family's fact (`Family.lora_blocks`, a `UNetBlocks`): sd-scripts counts 25 blocks
for SD 1.x / 2.x (12 down, the middle, 12 up) and 23 for SDXL (the embedding, 9 input, 3 middle, 9 output, out).
Down and up weights run from the shallowest to the deepest and from the deepest to the shallowest block.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from ..errors import NetworkError

log = logging.getLogger("sd_scripts.train")

RANK_KEYS = ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas")
LR_WEIGHT_KEYS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold")
#: network_args keys of this module and their parsers (texts are parsed below, once the block count is known)
NETWORK_ARG_TYPES: dict[str, Callable[[str], Any]] = {
    **{key: str for key in RANK_KEYS + LR_WEIGHT_KEYS[:3]}, "block_lr_zero_threshold": float}
LR_WEIGHT_PRESETS = ("cosine", "sine", "linear", "reverse_linear", "zeros")


@dataclass(frozen=True)
class UNetBlocks:
    """A family's numbering of its U-Net for block-wise network_args: `lead` slots before the down blocks, `down`
    down blocks, `mid` middle blocks, `down` up blocks, `tail` slots after them; `index(lora_name)` is the block of
    a U-Net LoRA module (-1: outside the numbered blocks)."""

    down: int
    mid: int
    index: Callable[[str], int]
    lead: int = 0
    tail: int = 0

    @property
    def count(self) -> int:
        return self.lead + 2 * self.down + self.mid + self.tail


@dataclass
class BlockRanks:
    """Rank and alpha per block for Linear / 1x1 layers, and for 3x3 convs (None: no conv modules)."""

    dims: list[int]
    alphas: list[float]
    conv_dims: list[int] | None = None
    conv_alphas: list[float] | None = None

    def rank_and_alpha(self, block: int, conv_kxk: bool) -> tuple[int, float] | None:
        """The rank and alpha of a layer of `block`; None for a 3x3 conv without conv ranks."""
        if conv_kxk:
            if self.conv_dims is None:
                return None
            return self.conv_dims[block], self.conv_alphas[block]
        return self.dims[block], self.alphas[block]


def _numbers(text: str, key: str, kind: type, empty_is_zero: bool = False) -> list:
    body = str(text).strip()
    if body.startswith("[") and body.endswith("]"):
        body = body[1:-1]
    values = []
    for part in body.split(","):
        part = part.strip()
        if not part and empty_is_zero:
            values.append(kind(0))
            continue
        try:
            values.append(kind(part))
        except ValueError:
            raise NetworkError(f"option 'network_args': {key}={text!r}: {part!r} is not "
                               f"{'an integer' if kind is int else 'a number'}") from None
    return values


def _per_block(text: str, key: str, kind: type, blocks: UNetBlocks) -> list:
    values = _numbers(text, key, kind)
    if len(values) != blocks.count:
        raise NetworkError(f"option 'network_args': {key} has {len(values)} values but this model's U-Net has "
                           f"{blocks.count} blocks (sd-scripts' numbering): give {blocks.count} comma-separated "
                           f"values")
    if min(values) < 0:
        raise NetworkError(f"option 'network_args': {key}={text!r}: values must be 0 or more")
    return values


def lr_weight_preset(text: str, length: int, key: str) -> list[float]:
    """'sine', 'cosine+0.25', ... -> `length` weights from the shallowest (first) to the deepest block."""
    name, _, offset_text = str(text).strip().partition("+")
    try:
        offset = float(offset_text) if offset_text else 0.0
    except ValueError:
        raise NetworkError(f"option 'network_args': {key}={text!r}: {offset_text!r} after '+' is not a number") \
            from None
    steps = max(length - 1, 1)
    ramps = {
        "sine": lambda i: math.sin(math.pi / 2 * i / steps),  # 0 at the first block, rising to 1
        "cosine": lambda i: math.sin(math.pi / 2 * (length - 1 - i) / steps),  # 1 at the first block, falling to 0
        "linear": lambda i: i / steps,
        "reverse_linear": lambda i: (length - 1 - i) / steps,
        "zeros": lambda i: 0.0,
    }
    if name not in ramps:
        raise NetworkError(f"option 'network_args': {key}={text!r} is neither comma-separated numbers nor one of "
                           f"the presets {', '.join(LR_WEIGHT_PRESETS)} (optionally with '+offset', e.g. sine+0.5)")
    return [ramps[name](i) + offset for i in range(length)]


def _lr_weights(text: str | None, length: int, key: str, presets: bool) -> list[float] | None:
    if text is None:
        return None
    body = str(text).strip()
    is_list = "," in body or not presets or _is_number(body)
    values = _numbers(body, key, float, empty_is_zero=True) if is_list else lr_weight_preset(body, length, key)
    if len(values) > length:
        log.warning("network_args %s: %d values given, the U-Net has %d such blocks; the rest are ignored", key,
                    len(values), length)
        values = values[:length]
    elif len(values) < length:
        log.warning("network_args %s: %d values given, the U-Net has %d such blocks; the missing ones are 1",
                    key, len(values), length)
        values = values + [1.0] * (length - len(values))
    return values


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def block_lr_weights(args: dict[str, Any], blocks: UNetBlocks) -> list[float] | None:
    """The learning-rate weight of each of the `blocks.count` blocks, or None when no *_lr_weight is given."""
    down = _lr_weights(args.get("down_lr_weight"), blocks.down, "down_lr_weight", presets=True)
    mid = _lr_weights(args.get("mid_lr_weight"), blocks.mid, "mid_lr_weight", presets=False)
    up = _lr_weights(args.get("up_lr_weight"), blocks.down, "up_lr_weight", presets=True)
    if down is None and mid is None and up is None:
        if args.get("block_lr_zero_threshold") is not None:  # sd-scripts ignores it too; runs must not fail
            log.warning("network_args block_lr_zero_threshold does nothing without down_lr_weight, mid_lr_weight or "
                        "up_lr_weight")
        return None
    threshold = float(args.get("block_lr_zero_threshold") or 0.0)

    def cut(values: list[float] | None, length: int) -> list[float]:
        if values is None:
            return [1.0] * length
        return [w if w > threshold else 0.0 for w in values]

    weights = [1.0] * blocks.lead + cut(down, blocks.down) + cut(mid, blocks.mid) + cut(up, blocks.down) + \
        [1.0] * blocks.tail
    log.info("block learning-rate weights (per block, sd-scripts' numbering): %s", weights)
    return weights


def block_ranks(args: dict[str, Any], blocks: UNetBlocks, *, dim: int, alpha: float, conv_dim: int | None,
                conv_alpha: float | None, lr_weights: Sequence[float] | None) -> BlockRanks | None:
    """Rank and alpha per block from block_dims / block_alphas / conv_block_dims / conv_block_alphas (the network's
    dim, alpha, conv_dim, conv_alpha for those not given); None when neither these nor lr weights are given.
    Blocks whose learning-rate weight is 0 get rank 0 (no modules)."""
    given = {key: args.get(key) for key in RANK_KEYS if args.get(key) is not None}
    if not given and lr_weights is None:
        return None
    n = blocks.count
    dims = _per_block(given["block_dims"], "block_dims", int, blocks) if "block_dims" in given else [int(dim)] * n
    alphas = _per_block(given["block_alphas"], "block_alphas", float, blocks) if "block_alphas" in given \
        else [float(alpha)] * n
    conv_dims = conv_alphas = None
    if "conv_block_dims" in given:
        conv_dims = _per_block(given["conv_block_dims"], "conv_block_dims", int, blocks)
    elif conv_dim is not None:
        conv_dims = [int(conv_dim)] * n
    if conv_dims is not None:
        conv_alphas = _per_block(given["conv_block_alphas"], "conv_block_alphas", float, blocks) \
            if "conv_block_alphas" in given else [1.0 if conv_alpha is None else float(conv_alpha)] * n
    elif "conv_block_alphas" in given:
        raise NetworkError("option 'network_args': conv_block_alphas needs conv_block_dims (or conv_dim): give the "
                           "3x3 conv ranks too")
    if lr_weights is not None:
        for i, weight in enumerate(lr_weights):
            if weight == 0:
                dims[i] = 0
                if conv_dims is not None:
                    conv_dims[i] = 0
    return BlockRanks(dims, alphas, conv_dims, conv_alphas)


def check_supported(args: dict[str, Any], blocks: UNetBlocks | None) -> None:
    """Block-wise keys given for a family whose LoRA has no U-Net block numbering are an error naming them."""
    used = [key for key in RANK_KEYS + LR_WEIGHT_KEYS if args.get(key) is not None]
    if used and blocks is None:
        raise NetworkError(f"option 'network_args': {', '.join(used)} (sd-scripts' U-Net block-wise settings) do not "
                           f"apply to this model family's LoRA: remove them")
