"""Group images by aspect ratio (kohya_ss Utilities > Group images): sort a folder's images by aspect ratio, cut the
list into groups of `group_size`, and make every image of a group the same size (the group's mean aspect ratio), so
that each group lands in one bucket.

    python -m sd_scripts.tools.group_images INPUT_FOLDER OUTPUT_FOLDER GROUP_SIZE [--include_subfolders]
        [--do_not_copy_other_files | --no_copy] [--pad] [--caption] [--caption_ext .txt]

Each image is centre-cropped (or with `--pad`, padded with black) to the group's mean aspect ratio, then resized
to the largest width and height in its group, and saved as `group-<g>-<i>-<stem>.jpg` (g, i from 1). The files
next to an image with its stem (captions, masks; not latent caches) are copied along under the new stem unless
`--do_not_copy_other_files`. With `--caption` a `<new stem><caption_ext>` file holds the source folder's name after
its last `_` (the class tokens of a `<repeats>_<class>` folder). Files are written atomically.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys

from PIL import Image, ImageOps

from ..data.images import is_image_file, load_image, read_image_size
from ..errors import UserError
from .tool_cli import ToolOption, require_dir, run_tool, write_text_atomic

log = logging.getLogger(__name__)

OPTIONS: tuple[ToolOption, ...] = (
    ToolOption("input_folder", str, None, "folder of the images", positional=True, required=True, path="dir"),
    ToolOption("output_folder", str, None, "folder for the grouped images", positional=True, required=True,
               path="out_dir"),
    ToolOption("group_size", int, None, "images per group", positional=True, required=True),
    ToolOption("include_subfolders", bool, False, "also take the images of sub-folders"),
    ToolOption("do_not_copy_other_files", bool, False, "do not copy the files with an image's stem",
               aliases=("no_copy",)),
    ToolOption("pad", bool, False, "pad images to the group's aspect ratio instead of cropping them"),
    ToolOption("caption", bool, False, "write a caption file from the source folder's name"),
    ToolOption("caption_ext", str, ".txt", "extension of the written caption files"),
)


def find_images(folder: str, include_subfolders: bool) -> list[str]:
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if include_subfolders else []
        found += [os.path.join(root, n) for n in files if is_image_file(n)]
    return sorted(found)


def to_aspect(image: Image.Image, aspect: float, pad: bool) -> Image.Image:
    """The image centre-cropped (or padded with black) to width / height == aspect."""
    w, h = image.size
    if pad:
        if w / h < aspect:
            border = int((aspect * h - w) / 2)
            return ImageOps.expand(image, border=(border, 0), fill="black")
        border = int((w / aspect - h) / 2)
        return ImageOps.expand(image, border=(0, border), fill="black")
    if w / h > aspect:
        new_w = aspect * h
        left = (w - new_w) / 2
        return image.crop((round(left), 0, round(left + new_w), h))
    new_h = w / aspect
    top = (h - new_h) / 2
    return image.crop((0, round(top), w, round(top + new_h)))


def group_images(input_folder: str, output_folder: str, group_size: int, *, include_subfolders: bool = False,
                 copy_other_files: bool = True, pad: bool = False, caption: bool = False,
                 caption_ext: str = ".txt") -> list[list[str]]:
    """Write the grouped images; returns the output files of each group."""
    require_dir(input_folder, "input_folder")
    if group_size < 1:
        raise UserError(f"group_size must be at least 1, not {group_size}")
    if os.path.abspath(input_folder) == os.path.abspath(output_folder):
        raise UserError(f"{output_folder}: the output folder is the input folder; give another one")
    images = find_images(input_folder, include_subfolders)
    if not images:
        raise UserError(f"{input_folder}: no images (png, jpg, jpeg, webp, bmp) found")
    sizes = {p: read_image_size(p) for p in images}
    ordered = sorted(images, key=lambda p: (sizes[p][0] / sizes[p][1], p))
    os.makedirs(output_folder, exist_ok=True)
    from ..training.saving import atomic_write

    written = []
    for g in range(0, len(ordered), group_size):
        group = ordered[g:g + group_size]
        aspect = sum(sizes[p][0] / sizes[p][1] for p in group) / len(group)
        shaped = [to_aspect(load_image(p).convert("RGB"), aspect, pad) for p in group]
        size = (max(im.width for im in shaped), max(im.height for im in shaped))
        outputs = []
        for i, (path, image) in enumerate(zip(group, shaped), start=1):
            stem = os.path.splitext(os.path.basename(path))[0]
            new_stem = f"group-{g // group_size + 1}-{i}-{stem}"
            out = os.path.join(output_folder, new_stem + ".jpg")
            final = image.resize(size, Image.Resampling.LANCZOS)
            atomic_write(out, lambda tmp, im=final: im.save(tmp, format="JPEG", quality=95))
            outputs.append(out)
            if copy_other_files:
                _copy_companions(path, output_folder, new_stem)
            if caption:  # after the copies: the written caption wins over a copied one
                folder_name = os.path.basename(os.path.dirname(os.path.abspath(path)))
                write_text_atomic(os.path.join(output_folder, new_stem + caption_ext), folder_name.split("_")[-1])
        log.info("group %d: %d images at %dx%d", g // group_size + 1, len(group), *size)
        written.append(outputs)
    return written


def _copy_companions(image: str, output_folder: str, new_stem: str) -> None:
    from ..training.saving import atomic_write

    folder, name = os.path.split(image)
    stem, ext = os.path.splitext(name)
    for other in sorted(os.listdir(folder)):
        o_stem, o_ext = os.path.splitext(other)
        if o_stem == stem and o_ext != ext and o_ext.lower() != ".npz" and not is_image_file(other):
            src = os.path.join(folder, other)
            atomic_write(os.path.join(output_folder, new_stem + o_ext), lambda tmp, s=src: shutil.copyfile(s, tmp))


def run(args) -> None:
    groups = group_images(args.input_folder, args.output_folder, args.group_size,
                          include_subfolders=args.include_subfolders,
                          copy_other_files=not args.do_not_copy_other_files, pad=args.pad, caption=args.caption,
                          caption_ext=args.caption_ext)
    print(f"{args.output_folder}: {sum(map(len, groups))} images in {len(groups)} groups")


def main(argv: list[str] | None = None) -> int:
    return run_tool("python -m sd_scripts.tools.group_images", "Group images by aspect ratio.", OPTIONS, run, argv)


if __name__ == "__main__":
    sys.exit(main())
