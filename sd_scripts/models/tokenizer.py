"""The CLIP tokenizer shipped with the package (no hub access): SD1 pads with <|endoftext|>, SD2 with id 0 ('!')."""
from __future__ import annotations

import os

TOKENIZER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "tokenizer")
PAD_TOKENS = {"eos": "<|endoftext|>", "zero": "!"}


def pad_mode_for(family: str) -> str:
    """'eos' for SD1 (and SDXL tokenizer 1), 'zero' for SD2 (and SDXL tokenizer 2)."""
    return "zero" if family == "sd2" else "eos"


def load_clip_tokenizer(pad: str = "eos", path: str | None = None):
    """A transformers CLIPTokenizer from the bundled files (or `path`), padding with <|endoftext|> or '!' (id 0)."""
    from transformers import CLIPTokenizer

    if pad not in PAD_TOKENS:
        raise ValueError(f"pad must be one of {sorted(PAD_TOKENS)}, got {pad!r}")
    return CLIPTokenizer.from_pretrained(path or TOKENIZER_DIR, pad_token=PAD_TOKENS[pad], local_files_only=True)
