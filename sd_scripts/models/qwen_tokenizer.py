"""The Qwen BPE tokenizer shipped with the package (no hub access), shared by the families whose text encoder is a
Qwen model (Qwen3 and Qwen2.5-VL use the same byte-level BPE vocabulary and the same text special tokens:
<|endoftext|> 151643, <|im_start|> 151644, <|im_end|> 151645; the vision markers <|vision_start|> 151652 ..
<|video_pad|> 151656 have the same ids too). The files are Qwen3-0.6B's (Apache-2.0, see configs/qwen_tokenizer/
NOTICE); a folder the user names (holding vocab.json + merges.txt, or tokenizer.json) replaces them.
"""
from __future__ import annotations

import os

from ..errors import ModelLoadError

QWEN_TOKENIZER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "qwen_tokenizer")
QWEN_SPECIAL_TOKEN_IDS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}


def load_qwen_tokenizer(folder: str | None = None, padding_side: str = "right"):
    """A transformers Qwen2 tokenizer, offline: the bundled one, or the one in `folder`. It pads with <|endoftext|>
    on `padding_side` and adds no BOS/EOS of its own. ModelLoadError naming the folder when it has no tokenizer."""
    from transformers import AutoTokenizer

    path = folder or QWEN_TOKENIZER_DIR
    if folder is not None:
        if not os.path.isdir(folder):
            raise ModelLoadError(f"{folder}: no such tokenizer folder; create it, or leave the tokenizer option empty "
                                 f"to use the bundled Qwen tokenizer")
        has_bpe = all(os.path.isfile(os.path.join(folder, n)) for n in ("vocab.json", "merges.txt"))
        if not has_bpe and not os.path.isfile(os.path.join(folder, "tokenizer.json")):
            raise ModelLoadError(f"{folder}: no Qwen tokenizer here (neither vocab.json + merges.txt nor "
                                 f"tokenizer.json); put a Qwen2/Qwen3 tokenizer's files there, or leave the "
                                 f"tokenizer option empty to use the bundled one")
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True, padding_side=padding_side)
    except (OSError, ValueError, ImportError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"{path}: cannot load the Qwen tokenizer ({first[:160]}); replace the folder's files "
                             f"with a Qwen2/Qwen3 tokenizer, or use the bundled one") from None
    if tok.pad_token is None:
        tok.pad_token = "<|endoftext|>"
    return tok
