"""Value forms that several families' `network_args` share (sd-scripts' lora_flux / lora_sd3 read them the same way):
a block selection ("all", "none", "0-3,7"), a fixed-length list of ranks ("[4,0,0,0,8]"), and a per-layer rank
rule built from them."""
from __future__ import annotations

import re
from typing import Callable, Sequence

from ..errors import NetworkError


def flag(value) -> bool:
    """A true/false network arg: True, or the words true / 1 / yes / on (any case)."""
    return value is True or str(value).strip().lower() in ("true", "1", "yes", "on")


def block_selection(text: str, total: int | None, key: str) -> Callable[[int], bool]:
    """'all' | 'none' | '' | comma-separated indices and inclusive ranges 'a-b' -> is block N selected.
    `total`: the number of blocks (indices must be below it), or None when the model decides later."""
    text = str(text).strip()
    if text == "all":
        return lambda index: True
    if text in ("none", ""):
        return lambda index: False
    chosen: set[int] = set()
    for part in text.split(","):
        try:
            if "-" in part:
                start, end = (int(v) for v in part.split("-", 1))
            else:
                start = end = int(part)
        except ValueError:
            raise NetworkError(f"option 'network_args': {key}={text!r}: {part.strip()!r} is not a block index or a "
                               f"range like 0-3") from None
        if start < 0 or start > end or (total is not None and end >= total):
            limit = f" (the model has {total} blocks: 0-{total - 1})" if total is not None else ""
            raise NetworkError(f"option 'network_args': {key}={text!r}: {part.strip()!r} is not a valid block "
                               f"range{limit}")
        chosen.update(range(start, end + 1))
    return chosen.__contains__


def dim_list(text: str, names: Sequence[str], key: str) -> dict[str, int]:
    """'[4,0,8]' or '4,0,8' -> {name: rank} for the len(names) layers, in order (0 leaves a layer out)."""
    body = str(text).strip()
    if body.startswith("[") and body.endswith("]"):
        body = body[1:-1]
    try:
        values = [int(v) for v in body.split(",")]
    except ValueError:
        values = []
    if len(values) != len(names) or min(values, default=0) < 0:
        raise NetworkError(f"option 'network_args': {key}={text!r} must be {len(names)} ranks of 0 or more, one "
                           f"each for {', '.join(names)} (e.g. {key}=[{','.join(['4'] * len(names))}])")
    return dict(zip(names, values))


def pattern_dims(text: str, key: str) -> list[tuple[re.Pattern, int]]:
    """sd-scripts' network_reg_dims: 'regex=rank,regex=rank' (first match wins)."""
    rules = []
    for pair in str(text).split(","):
        if not pair.strip():
            continue
        pattern, eq, value = pair.partition("=")
        try:
            rules.append((re.compile(pattern.strip()), int(value)))
        except (re.error, ValueError):
            raise NetworkError(f"option 'network_args': {key}: {pair.strip()!r} is not 'regular expression=rank'") \
                from None
        if not eq:
            raise NetworkError(f"option 'network_args': {key}: {pair.strip()!r} is not 'regular expression=rank'")
    return rules


def rank_rule(*, pattern_ranks: Sequence[tuple[re.Pattern, int]] = (),
              layer_rank: Callable[[str], int | None] | None = None,
              part_ranks: Sequence[tuple[tuple[str, ...], int | None]] = (),
              block_of: Callable[[str], tuple[str, int] | None] | None = None,
              selected: dict[str, Callable[[int], bool]] | None = None) -> Callable[[str], int | None] | None:
    """A per-layer rank for LoRANetwork(module_rank=...) in sd-scripts' order of precedence:
    1. the first `pattern_ranks` regular expression found in the file name (network_reg_dims);
    2. the rank of a layer outside the blocks (`layer_rank(name)`, None inside them: in_dims / emb_dims);
    3. the first `part_ranks` entry all of whose words are in the name (img_attn_dim, x_mlp_dim, ...);
    4. a layer of a block `selected` leaves out gets 0 (`block_of(name)` -> (block kind, index) or None).
    None means the network's default rank; None overall when no rule is given."""
    part_ranks = [(words, rank) for words, rank in part_ranks if rank is not None]
    selected = dict(selected or {})
    if not (pattern_ranks or layer_rank or part_ranks or selected):
        return None

    def rank(name: str) -> int | None:
        for pattern, value in pattern_ranks:
            if pattern.search(name):
                return value
        outside = layer_rank(name) if layer_rank is not None else None
        if outside is not None:
            return outside
        value = next((r for words, r in part_ranks if all(w in name for w in words)), None)
        block = block_of(name) if block_of is not None and selected else None
        if value != 0 and block is not None and block[0] in selected and not selected[block[0]](block[1]):
            return 0
        return value

    return rank
