"""Caption images with GIT (sd-scripts' finetune/make_captions_by_git.py), through transformers' GitForCausalLM,
offline.

    python -m sd_scripts.finetune.make_captions_by_git TRAIN_DATA_DIR [--model_id microsoft/git-large-textcaps]
        [--caption_extension .caption] [--max_length 50] [--remove_words] [--batch_size 1]
        [--max_data_loader_n_workers N] [--recursive] [--debug]

`--model_id` is a local folder or a repository id already in the Hugging Face cache. Captions are decoded greedily.
`--remove_words` drops the phrases GIT (trained on TextCaps) invents about text in the picture ("with the words
...", "that says ..."), as sd-scripts does. Each image gets `<stem><caption_extension>`, written atomically.
"""
from __future__ import annotations

import logging
import re
import sys

from ..tools.tool_cli import ToolOption, run_tool
from .captioner import COMMON_OPTIONS, caption_images, load_pretrained

log = logging.getLogger(__name__)

OPTIONS: tuple[ToolOption, ...] = (
    *COMMON_OPTIONS,
    ToolOption("model_id", str, "microsoft/git-large-textcaps", "GIT model: local folder or cached repository id",
               path="dir"),
    ToolOption("max_length", int, 50, "longest caption, in tokens"),
    ToolOption("remove_words", bool, False, "remove phrases about text in the image ('with the words ...')"),
)

# phrases about lettering that GIT makes up: what a sign, shirt or label 'says', and the words or numbers on it
_TEXT = r"""(?:" ?[^"]*"|' ?(?:i'm)?[^']*'|\w+)"""  # a quoted text (which may hold "i'm") or one word
TEXT_PHRASES = [re.compile(p) for p in (
    rf"\b(?:has|with|and) the (?:word|letter|name)s? ?{_TEXT}(?: (?:is )?(?:on|in) (?:the |her |their |him )?\w+)?",
    rf"(?:with a sign )?that says ?(?:the word )?{_TEXT}?(?: on it)?",
    r"\bwith the number \d+ on (?:it|\w+ \w+)",
    r"\bword \w+ on it",
)]


def remove_text_phrases(caption: str) -> str:
    for pattern in TEXT_PHRASES:
        caption = pattern.sub("", caption)
    return " ".join(caption.split())


def run(args) -> None:
    import torch
    from transformers import AutoProcessor, GitForCausalLM

    from ..tools.tool_cli import torch_device

    device = torch_device(args.device)
    model, processor = load_pretrained(GitForCausalLM, AutoProcessor, args.model_id, "model_id", "GIT", device)

    @torch.no_grad()
    def generate(images):
        inputs = processor(images=images, return_tensors="pt").to(device)
        ids = model.generate(pixel_values=inputs["pixel_values"], max_length=args.max_length)
        return processor.batch_decode(ids, skip_special_tokens=True)

    caption_images(args, generate, remove_text_phrases if args.remove_words else None)


def main(argv: list[str] | None = None) -> int:
    return run_tool("python -m sd_scripts.finetune.make_captions_by_git", "Caption images with GIT.", OPTIONS, run,
                    argv)


if __name__ == "__main__":
    sys.exit(main())
