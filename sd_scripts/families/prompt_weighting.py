"""Attention weights in captions and prompts (`weighted_captions`, sample prompts): the A1111 / sd-scripts syntax.

    (word)       weight x 1.1           [word]        weight / 1.1
    (word:1.3)   weight x 1.3           ((word))      1.1 x 1.1, brackets nest and multiply
    \\( \\) \\[ \\] \\\\   the literal character; an unclosed bracket applies to the end of the text

Each CLIP token gets the weight of the text it came from, and the text encoder's output state of that token is
multiplied by it (sd-scripts' encode_tokens_with_weights): `states * weights[..., None]`. Start, end and padding
tokens keep weight 1. Token ids come out in the layout of the tokenizer's own `padding="max_length"` call (start,
tokens, end, padding), so the families' 75-token windows apply to them unchanged and the weights line up with the
joined states position by position. Text without brackets gives exactly the plain tokenizer's ids and weight 1.

Torch is imported only by the functions that build tensors; parsing is pure Python.
"""
from __future__ import annotations

import logging
import math
import re
from typing import Any, Sequence

log = logging.getLogger(__name__)

UP = 1.1  # (text)
DOWN = 1 / 1.1  # [text]
CHUNK = 75  # tokens of one CLIP window between its start and end tokens

_PARTS = re.compile(r"""
    \\[()\[\]\\]          # an escaped bracket or backslash
  | \\                    # a lone backslash
  | \( | \[               # opening brackets
  | :\s*([+-]?[.\d]+)\s*\)  # ':1.3)' closes a round bracket with its weight
  | \) | \]               # closing brackets
  | [^\\()\[\]:]+         # plain text
  | :                     # a colon that is not a weight
""", re.VERBOSE)


def parse_weights(text: str) -> list[tuple[str, float]]:
    """'a (dog:1.3) [cat]' -> [('a ', 1.0), ('dog', 1.3), (' ', 1.0), ('cat', 1/1.1)]; neighbours with equal
    weights are merged, and an empty text gives [('', 1.0)]."""
    parts: list[list] = []
    rounds: list[int] = []  # where each open '(' started in `parts`
    squares: list[int] = []

    def scale(start: int, factor: float) -> None:
        for part in parts[start:]:
            part[1] *= factor

    for match in _PARTS.finditer(text):
        piece, weight = match.group(0), match.group(1)
        if piece.startswith("\\") and len(piece) == 2:
            parts.append([piece[1], 1.0])
        elif piece == "(":
            rounds.append(len(parts))
        elif piece == "[":
            squares.append(len(parts))
        elif weight is not None and rounds:
            scale(rounds.pop(), float(weight))
        elif piece == ")" and rounds:
            scale(rounds.pop(), UP)
        elif piece == "]" and squares:
            scale(squares.pop(), DOWN)
        else:  # text, a stray closing bracket or colon, a lone backslash
            parts.append([piece, 1.0])
    for start in rounds:
        scale(start, UP)
    for start in squares:
        scale(start, DOWN)
    merged: list[list] = []
    for piece, weight in parts:
        if merged and merged[-1][1] == weight:
            merged[-1][0] += piece
        else:
            merged.append([piece, weight])
    return [(piece, weight) for piece, weight in merged] or [("", 1.0)]


def weighted_tokens(tokenizer: Any, text: str) -> tuple[list[int], list[float]]:
    """The text's token ids (no start/end tokens, not truncated) and the weight of each."""
    pieces = parse_weights(text)
    encoded = tokenizer([p for p, _ in pieces], add_special_tokens=False, verbose=False).input_ids
    ids: list[int] = []
    weights: list[float] = []
    for piece_ids, (_, weight) in zip(encoded, pieces):
        ids += piece_ids
        weights += [weight] * len(piece_ids)
    return ids, weights


def tokenize_weighted(tokenizer: Any, texts: Sequence[str], max_length: int):
    """Token ids [B, max_length] (start, tokens, end, padding, as `tokenizer(..., padding="max_length",
    truncation=True)`) and their weights [B, max_length] float32 (1 for start, end and padding)."""
    import torch

    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    all_ids, all_weights = [], []
    for text in texts:
        ids, weights = weighted_tokens(tokenizer, text)
        if len(ids) > max_length - 2:
            log.warning("caption of %d tokens is cut to %d (max_token_length): %.60s...", len(ids), max_length - 2,
                        text)
            ids, weights = ids[:max_length - 2], weights[:max_length - 2]
        rest = max_length - 2 - len(ids)
        all_ids.append([bos, *ids, eos] + [pad] * rest)
        all_weights.append([1.0, *weights, 1.0] + [1.0] * rest)
    return torch.tensor(all_ids, dtype=torch.long), torch.tensor(all_weights, dtype=torch.float32)


def apply_weights(states, weights):
    """Encoder states [B, L, D] x token weights [B, L] (the formula of sd-scripts' weighted captions)."""
    return states * weights.to(device=states.device, dtype=states.dtype).unsqueeze(-1)


def sample_max_length(tokenizer: Any, texts: Sequence[str], training_max_length: int, max_windows: int = 3) -> int:
    """Token length for encoding sample prompts: enough 75-token windows for the longest of `texts` (a prompt and
    its negative prompt share it), at least the training length, at most `max_windows` windows (225 tokens, as
    sd-scripts' sample pipelines)."""
    longest = max(len(weighted_tokens(tokenizer, t)[0]) for t in texts)
    windows = max((training_max_length - 2) // CHUNK, min(max_windows, max(1, math.ceil(longest / CHUNK))))
    return windows * CHUNK + 2
