"""Caption images with BLIP (sd-scripts' finetune/make_captions.py), through transformers'
BlipForConditionalGeneration, offline.

    python -m sd_scripts.finetune.make_captions TRAIN_DATA_DIR
        [--caption_weights Salesforce/blip-image-captioning-large]
        [--caption_extension .caption] [--beam_search --num_beams 3 | --top_p 0.9] [--max_length 75]
        [--min_length 5] [--batch_size 1] [--max_data_loader_n_workers N] [--seed 42] [--recursive] [--debug]

`--caption_weights` is a transformers BLIP captioning model: a local folder or a repository id already in the
Hugging Face cache (sd-scripts' default, the original BLIP repository's model_large_caption.pth, is that model's
weights in another code base: use `Salesforce/blip-image-captioning-large`). Without `--beam_search` captions are
sampled (nucleus sampling, `--top_p`, reproducible with `--seed`); with it, beam search with `--num_beams`. Each
image gets `<stem><caption_extension>`, written atomically.
"""
from __future__ import annotations

import logging
import sys

from ..errors import UserError
from ..tools.tool_cli import ToolOption, run_tool
from .captioner import COMMON_OPTIONS, caption_images, load_pretrained

log = logging.getLogger(__name__)

DEFAULT_MODEL = "Salesforce/blip-image-captioning-large"
OPTIONS: tuple[ToolOption, ...] = (
    *COMMON_OPTIONS,
    ToolOption("caption_weights", str, DEFAULT_MODEL, "BLIP captioning model: local folder or cached repository id",
               path="dir"),
    ToolOption("beam_search", bool, False, "beam search instead of nucleus sampling"),
    ToolOption("num_beams", int, 1, "beams of the beam search"),
    ToolOption("top_p", float, 0.9, "top_p of nucleus sampling"),
    ToolOption("max_length", int, 75, "longest caption, in tokens"),
    ToolOption("min_length", int, 5, "shortest caption, in tokens"),
    ToolOption("seed", int, 42, "seed of the sampling"),
)


def run(args) -> None:
    import torch
    from transformers import BlipForConditionalGeneration, BlipProcessor

    from ..tools.tool_cli import torch_device

    if args.caption_weights.startswith(("http://", "https://")) or args.caption_weights.endswith(".pth"):
        raise UserError(f"--caption_weights {args.caption_weights}: original BLIP .pth weights are not read here; "
                        f"use the transformers model {DEFAULT_MODEL} (a local folder or the Hugging Face cache)")
    if args.min_length > args.max_length:
        raise UserError(f"--min_length {args.min_length} is above --max_length {args.max_length}")
    device = torch_device(args.device)
    model, processor = load_pretrained(BlipForConditionalGeneration, BlipProcessor, args.caption_weights,
                                       "caption_weights", "BLIP", device)
    torch.manual_seed(args.seed)
    decoding = (dict(do_sample=False, num_beams=args.num_beams) if args.beam_search
                else dict(do_sample=True, top_p=args.top_p, top_k=0))

    @torch.no_grad()
    def generate(images):
        inputs = processor(images=images, return_tensors="pt").to(device)
        ids = model.generate(pixel_values=inputs["pixel_values"], max_length=args.max_length,
                             min_length=args.min_length, **decoding)
        return processor.batch_decode(ids, skip_special_tokens=True)

    caption_images(args, generate)


def main(argv: list[str] | None = None) -> int:
    return run_tool("python -m sd_scripts.finetune.make_captions", "Caption images with BLIP.", OPTIONS, run, argv)


if __name__ == "__main__":
    sys.exit(main())
