"""Caption images with Florence-2 (transformers' Florence2ForConditionalGeneration, transformers >= 5), offline.

    python -m sd_scripts.finetune.make_captions_by_florence2 TRAIN_DATA_DIR
        [--model_id florence-community/Florence-2-large] [--task "<DETAILED_CAPTION>"] [--num_beams 3]
        [--max_new_tokens 1024] [--caption_extension .txt] [--prefix TEXT] [--postfix TEXT] [--batch_size 1]
        [--max_data_loader_n_workers N] [--recursive] [--debug] [--device cuda]

`--model_id` is a local folder or a repository id already in the Hugging Face cache, in transformers' own
Florence-2 format (the `florence-community/` conversions; the original `microsoft/Florence-2-*` repositories need
remote code, which is not run). `--task` is one of Florence-2's captioning prompts: `<CAPTION>` (one line),
`<DETAILED_CAPTION>`, `<MORE_DETAILED_CAPTION>`. Decoding is beam search. `--prefix` / `--postfix` are put around
each caption (separated by a space). Each image gets `<stem><caption_extension>`, written atomically.
"""
from __future__ import annotations

import logging
import sys

from ..tools.tool_cli import ToolOption, run_tool
from .captioner import COMMON_OPTIONS, caption_images, load_pretrained

log = logging.getLogger(__name__)

TASKS = ("<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>")
OPTIONS: tuple[ToolOption, ...] = (
    *(ToolOption(o.name, o.type, ".txt", o.help, aliases=o.aliases) if o.name == "caption_extension" else o
      for o in COMMON_OPTIONS),
    ToolOption("model_id", str, "florence-community/Florence-2-large",
               "Florence-2 model: local folder or cached repository id", path="dir"),
    ToolOption("task", str, "<DETAILED_CAPTION>", "captioning prompt", choices=TASKS),
    ToolOption("num_beams", int, 3, "beams of the beam search"),
    ToolOption("max_new_tokens", int, 1024, "longest caption, in tokens"),
    ToolOption("prefix", str, "", "text put before each caption"),
    ToolOption("postfix", str, "", "text put after each caption"),
)


def run(args) -> None:
    import torch
    from transformers import AutoProcessor

    try:
        from transformers import Florence2ForConditionalGeneration
    except ImportError:  # transformers 4.x has no native Florence-2
        from ..errors import UserError

        raise UserError("Florence-2 captioning needs transformers >= 5 (Florence2ForConditionalGeneration): "
                        "upgrade transformers") from None
    from ..tools.basic_caption import edit_caption
    from ..tools.tool_cli import torch_device

    device = torch_device(args.device)
    model, processor = load_pretrained(Florence2ForConditionalGeneration, AutoProcessor, args.model_id, "model_id",
                                       "Florence-2", device)

    @torch.no_grad()
    def generate(images):
        inputs = processor(text=[args.task] * len(images), images=images, return_tensors="pt").to(device)
        ids = model.generate(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"].to(model.dtype),
                             attention_mask=inputs.get("attention_mask"), max_new_tokens=args.max_new_tokens,
                             num_beams=args.num_beams, do_sample=False)
        return processor.batch_decode(ids, skip_special_tokens=True)

    caption_images(args, generate, lambda c: edit_caption(c, prefix=args.prefix, postfix=args.postfix))


def main(argv: list[str] | None = None) -> int:
    return run_tool("python -m sd_scripts.finetune.make_captions_by_florence2", "Caption images with Florence-2.",
                    OPTIONS, run, argv)


if __name__ == "__main__":
    sys.exit(main())
