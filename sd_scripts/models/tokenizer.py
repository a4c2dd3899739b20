"""The CLIP tokenizer shipped with the package (no hub access): padding with <|endoftext|> (SD1, SDXL
tokenizer 1) or with id 0 ('!': SD2, SDXL tokenizer 2)."""
from __future__ import annotations

import os

TOKENIZER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "tokenizer")
PAD_TOKENS = {"eos": "<|endoftext|>", "zero": "!"}


def load_clip_tokenizer(pad: str = "eos", path: str | None = None):
    """A transformers CLIPTokenizer from the bundled files (or `path`), padding with <|endoftext|> or '!' (id 0)."""
    from transformers import CLIPTokenizer

    if pad not in PAD_TOKENS:
        raise ValueError(f"pad must be one of {sorted(PAD_TOKENS)}, got {pad!r}")
    return CLIPTokenizer.from_pretrained(path or TOKENIZER_DIR, pad_token=PAD_TOKENS[pad], local_files_only=True)
