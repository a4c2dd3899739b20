"""Caption files and per-draw caption processing (prefix/suffix, dropout, wildcards, warmup, shuffle, tag dropout).

The order of operations follows the kohya sd-scripts convention described in FORMATS.md ("Caption processing
order"), so that datasets and habits carry over unchanged.
"""
from __future__ import annotations

import math
import os
import random
import re
from dataclasses import dataclass

from ..errors import DatasetError

_WILDCARD = re.compile(r"\{([^{}]+)\}")
# Private-use characters stand in for escaped braces ("{{" / "}}") while choices are expanded.
_OPEN_ESCAPE, _CLOSE_ESCAPE = "\ue000", "\ue001"


@dataclass(frozen=True)
class CaptionOptions:
    """How a subset's captions are altered on every draw (names follow the dataset TOML keys, minus 'caption_')."""

    prefix: str | None = None
    suffix: str | None = None
    shuffle: bool = False
    separator: str = ","
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    secondary_separator: str | None = None
    enable_wildcard: bool = False
    dropout_rate: float = 0.0
    dropout_every_n_epochs: int = 0
    tag_dropout_rate: float = 0.0
    token_warmup_min: int = 1
    token_warmup_step: float = 0.0

    @property
    def is_deterministic(self) -> bool:
        """Every draw gives the same text (no shuffle, dropout, warmup or wildcard choice)."""
        return not (self.splits_tags or self.enable_wildcard or self.dropout_rate > 0 or self.dropout_every_n_epochs)

    @property
    def splits_tags(self) -> bool:
        """Tags are only split (and re-joined with ', ') when shuffle, warmup or tag dropout is on."""
        return self.shuffle or self.token_warmup_step > 0 or self.tag_dropout_rate > 0


def caption_path(image_path: str, caption_extension: str) -> str:
    """The caption file of an image: same folder and stem, the caption extension ('.txt' or 'txt' both work)."""
    ext = caption_extension if caption_extension.startswith(".") else "." + caption_extension
    return os.path.splitext(image_path)[0] + ext


def read_caption(image_path: str, caption_extension: str, fallback: str, enable_wildcard: bool = False) -> str:
    """The caption text of an image: its first line; with wildcards, every non-empty line joined by '\\n'.

    A missing caption file gives `fallback` (the class tokens). An empty or non-UTF-8 file is a DatasetError.
    """
    path = caption_path(image_path, caption_extension)
    if not os.path.isfile(path):
        return fallback
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DatasetError(f"caption file {path} cannot be read ({e.strerror}): check its permissions") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise DatasetError(f"caption file {path} is not UTF-8 text: open it and save it with UTF-8 encoding") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise DatasetError(f"caption file {path} is empty: write a caption into it, or delete it to use the "
                           f"folder's class tokens")
    return "\n".join(lines) if enable_wildcard else lines[0]


def expand_wildcards(text: str, rng: random.Random) -> str:
    """Replace each '{a|b|c}' by one random choice; '{{' and '}}' stand for literal braces."""
    text = text.replace("{{", _OPEN_ESCAPE).replace("}}", _CLOSE_ESCAPE)
    text = _WILDCARD.sub(lambda m: rng.choice(m.group(1).split("|")), text)
    return text.replace(_OPEN_ESCAPE, "{").replace(_CLOSE_ESCAPE, "}")


def warmup_tag_count(n_tags: int, opts: CaptionOptions, step: int, max_steps: int) -> int:
    """How many of the flexible tags token warmup keeps at `step` (all of them once warmup is over)."""
    warmup = opts.token_warmup_step
    if 0 < warmup < 1:
        warmup = math.floor(warmup * max_steps)
    if warmup <= 0 or step >= warmup:
        return n_tags
    return min(n_tags, math.floor(step * (n_tags - opts.token_warmup_min) / warmup) + opts.token_warmup_min)


def _split_tags(text: str, separator: str) -> list[str]:
    return [t.strip() for t in text.split(separator) if t.strip()]


def _split_fixed(caption: str, opts: CaptionOptions) -> tuple[list[str], list[str], list[str]]:
    """(fixed head, flexible tags, fixed tail) of a caption."""
    sep = opts.keep_tokens_separator
    if sep and sep in caption:
        head, rest = caption.split(sep, 1)
        tail = ""
        if sep in rest:
            rest, tail = rest.split(sep, 1)
        return (_split_tags(head, opts.separator), _split_tags(rest, opts.separator),
                _split_tags(tail, opts.separator))
    tags = _split_tags(caption, opts.separator)
    keep = max(0, opts.keep_tokens)
    return tags[:keep], tags[keep:], []


def _with_prefix_suffix(line: str, opts: CaptionOptions) -> str:
    if opts.prefix:
        line = opts.prefix + " " + line
    if opts.suffix:
        line = line + " " + opts.suffix
    return line


def process_caption(caption: str, opts: CaptionOptions, rng: random.Random, epoch: int, step: int,
                    max_steps: int) -> str:
    """One draw of a caption. `epoch` is 1-based; `step` is the global optimizer step (for token warmup).

    Order: prefix/suffix -> whole-caption dropout -> wildcard line and {a|b} choice -> (only when shuffle, warmup
    or tag dropout is on) split into fixed head / flexible tags / fixed tail, warmup, shuffle, tag dropout, join
    with ', ' -> secondary separator replaced by the separator.
    With wildcards, every line of a multi-line caption gets the prefix and suffix.
    """
    lines = caption.split("\n") if opts.enable_wildcard else [caption.split("\n")[0]]
    lines = [_with_prefix_suffix(line, opts) for line in lines]
    dropped = opts.dropout_rate > 0 and rng.random() < opts.dropout_rate
    dropped = dropped or (opts.dropout_every_n_epochs > 0 and epoch % opts.dropout_every_n_epochs == 0)
    if dropped:
        return ""
    text = lines[0]
    if opts.enable_wildcard:
        text = rng.choice(lines) if len(lines) > 1 else lines[0]
        text = expand_wildcards(text, rng)
    if opts.splits_tags:
        head, flex, tail = _split_fixed(text, opts)
        flex = flex[:warmup_tag_count(len(flex), opts, step, max_steps)]
        if opts.shuffle:
            rng.shuffle(flex)
        if opts.tag_dropout_rate > 0:
            flex = [t for t in flex if rng.random() >= opts.tag_dropout_rate]
        text = ", ".join(head + flex + tail)
    if opts.secondary_separator:
        text = text.replace(opts.secondary_separator, opts.separator)
    return text
