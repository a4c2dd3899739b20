"""What the image-captioning tools share (make_captions, make_captions_by_git, make_captions_by_florence2): their
common options, finding the images, reading them ahead in threads, batching, the device, and writing one caption
file per image atomically. Each tool supplies a `Captioner`: a loaded transformers model and how it turns a batch
of PIL images into captions."""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, Sequence

from PIL import Image

from ..errors import UserError
from ..tools.tool_cli import ToolOption, write_text_atomic

log = logging.getLogger(__name__)

#: options every captioner takes (sd-scripts' names); each tool adds its own after these
COMMON_OPTIONS: tuple[ToolOption, ...] = (
    ToolOption("train_data_dir", str, None, "folder of the images to caption", positional=True, required=True,
               path="dir"),
    ToolOption("caption_extension", str, ".caption", "caption file extension", aliases=("caption_extention",)),
    ToolOption("batch_size", int, 1, "images per inference batch"),
    ToolOption("max_data_loader_n_workers", int, None, "threads reading images ahead"),
    ToolOption("recursive", bool, False, "also caption the images in sub-folders"),
    ToolOption("debug", bool, False, "log every caption"),
    ToolOption("device", str, None, "device to run on (default: cuda when available, else cpu)"),
)

Generate = Callable[[list[Image.Image]], list[str]]


def load_rgb(path: str) -> Image.Image:
    """An image as RGB (transparent parts on white); UserError naming a file that cannot be read."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("RGBA", "LA") or "transparency" in img.info:
                rgba = img.convert("RGBA")
                out = Image.new("RGB", rgba.size, (255, 255, 255))
                out.paste(rgba, mask=rgba.split()[3])
                return out
            return img.convert("RGB")
    except (OSError, ValueError) as e:
        raise UserError(f"image {path} cannot be read ({e}): re-save it or remove it from the folder") from None


def batches(paths: Sequence[str], batch_size: int, workers: int | None) -> Iterator[list[tuple[str, Image.Image]]]:
    """(path, image) lists of `batch_size`, images read ahead by `workers` threads when given."""
    pool = ThreadPoolExecutor(max_workers=workers) if workers else None
    try:
        images = pool.map(load_rgb, paths) if pool else map(load_rgb, paths)
        batch = []
        for path, image in zip(paths, images):
            batch.append((path, image))
            if len(batch) == batch_size:
                yield batch
                batch = []
        if batch:
            yield batch
    finally:
        if pool:
            pool.shutdown(wait=True, cancel_futures=True)


def caption_images(args, generate: Generate, postprocess: Callable[[str], str] | None = None) -> dict[str, str]:
    """Caption every image of args.train_data_dir (args: COMMON_OPTIONS); returns {image path: caption}."""
    from ..tools.build_metadata import find_images

    if args.batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, not {args.batch_size}")
    images = find_images(args.train_data_dir, args.recursive)
    if not images:
        raise UserError(f"no images (png, jpg, jpeg, webp, bmp) in {args.train_data_dir}")
    log.info("captioning %d images", len(images))
    written: dict[str, str] = {}
    from tqdm.auto import tqdm

    total = (len(images) + args.batch_size - 1) // args.batch_size
    for batch in tqdm(batches(images, args.batch_size, args.max_data_loader_n_workers), total=total, smoothing=0.0):
        captions = generate([image for _path, image in batch])
        for (path, _image), caption in zip(batch, captions):
            raw = caption
            caption = " ".join(caption.split())
            if postprocess:
                caption = postprocess(caption)
            if not caption:
                log.warning("%s: the model gave an empty caption", path)
            write_text_atomic(os.path.splitext(path)[0] + args.caption_extension, caption + "\n")
            written[path] = caption
            if args.debug:
                log.info("%s: %s%s", path, caption, f" (generated: {raw})" if raw.strip() != caption else "")
    log.info("done: %d caption files written", len(written))
    return written


def load_pretrained(model_cls, processor_cls, name_or_path: str, option: str, what: str, device, dtype=None):
    """(model on `device` in eval mode, processor) from a local folder or the Hugging Face cache, offline."""
    from ..models.module_io import first_line
    from .model_files import hub_cache_dir

    source = name_or_path
    if not os.path.isdir(source):
        cached = hub_cache_dir(source, ("config.json",)) if "/" in source and not os.path.exists(source) else None
        if cached is None:
            raise UserError(f"{what} model {name_or_path!r} is not a local folder and is not in the Hugging Face cache "
                            f"(nothing is downloaded here): download it with `huggingface-cli download "
                            f"{name_or_path}` or pass its folder with --{option}")
        source = cached
    kwargs = {"local_files_only": True}
    try:
        processor = processor_cls.from_pretrained(source, **kwargs)
        model = model_cls.from_pretrained(source, **kwargs, **({"dtype": dtype} if dtype is not None else {}))
    except Exception as e:  # noqa: BLE001 - any failure here is a problem with the user's model folder
        raise UserError(f"{what} model {name_or_path}: cannot load it ({first_line(e)}); pass a complete "
                        f"transformers model folder with --{option}") from None
    return model.to(device).eval(), processor
