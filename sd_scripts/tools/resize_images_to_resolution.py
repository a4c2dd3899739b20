"""Shrink every image of a folder to at most the area of one or more resolutions, keeping the aspect ratio
(sd-scripts' tools/resize_images_to_resolution.py).

    python -m sd_scripts.tools.resize_images_to_resolution SRC DST [--max_resolution "512x512,384x384"]
        [--divisible_by 1] [--interpolation area|cubic|lanczos4|nearest|linear|box] [--save_as_png]
        [--copy_associated_files]

For each image and each resolution WxH: an image with more than W*H pixels is scaled down to about W*H pixels (its
aspect kept); then both sides are cropped (centred) to multiples of `--divisible_by`. The result is
`<stem>+<WxH>.jpg` (quality 100) or `.png` with `--save_as_png`. Every resolution is made from the original image.
The default interpolation is area when shrinking (lanczos when not). Files of SRC that are not images are copied to
DST unchanged; with `--copy_associated_files` the files with an image's stem (its captions) are also copied as
`<stem>+<WxH><ext>`, one per resolution. Files are written atomically.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import sys

from PIL import Image

from ..data.images import is_image_file, load_image
from ..errors import UserError
from .tool_cli import ToolOption, require_dir, run_tool

log = logging.getLogger(__name__)

INTERPOLATION_CHOICES = ("area", "cubic", "lanczos4", "nearest", "linear", "box")
OPTIONS: tuple[ToolOption, ...] = (
    ToolOption("src_img_folder", str, None, "folder of the source images", positional=True, required=True,
               path="dir"),
    ToolOption("dst_img_folder", str, None, "folder for the resized images", positional=True, required=True,
               path="out_dir"),
    ToolOption("max_resolution", str, "512x512,384x384,256x256,128x128",
               "largest resolution(s), comma-separated WxH: one output per resolution"),
    ToolOption("divisible_by", int, 1, "crop both sides to multiples of this"),
    ToolOption("interpolation", str, None, "resize filter (default: area when shrinking, else lanczos)",
               choices=INTERPOLATION_CHOICES),
    ToolOption("save_as_png", bool, False, "save PNG instead of JPEG"),
    ToolOption("copy_associated_files", bool, False, "copy files with an image's stem (captions) along, named like "
                                                     "each resized image"),
)


def parse_resolutions(text: str) -> list[tuple[str, int, int]]:
    """'512x512, 384x256' -> [('512x512', 512, 512), ('384x256', 384, 256)]."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        try:
            w, h = (int(v) for v in part.lower().split("x"))
            if w < 1 or h < 1:
                raise ValueError
        except ValueError:
            raise UserError(f"--max_resolution: {part!r} is not WIDTHxHEIGHT (e.g. 512x512)") from None
        out.append((part, w, h))
    return out


def _filter(name: str | None, shrinking: bool) -> int:
    from ..data.buckets import INTERPOLATIONS

    name = name or ("area" if shrinking else "lanczos")
    return INTERPOLATIONS.get(name, Image.Resampling.LANCZOS)  # lanczos4 is PIL's lanczos


def resized(image: Image.Image, max_w: int, max_h: int, divisible_by: int, interpolation: str | None) -> Image.Image:
    """The image scaled down to at most max_w*max_h pixels, then centre-cropped to multiples of `divisible_by`."""
    w, h = image.size
    if w * h > max_w * max_h:
        scale = math.sqrt(max_w * max_h / (w * h))
        new_w, new_h = max(1, int(w * scale)), max(1, int(h * scale))
        image = image.resize((new_w, new_h), _filter(interpolation, True))
    w, h = image.size
    cw, ch = w - w % divisible_by, h - h % divisible_by
    if cw < 1 or ch < 1:
        raise UserError(f"--divisible_by {divisible_by} is larger than a side of a resized image ({w}x{h}); "
                        f"use a smaller value")
    left, top = (w - cw) // 2, (h - ch) // 2
    return image.crop((left, top, left + cw, top + ch))


def _save(image: Image.Image, path: str) -> None:
    from ..training.saving import atomic_write

    fmt = "PNG" if path.lower().endswith(".png") else "JPEG"
    atomic_write(path, lambda tmp: image.save(tmp, format=fmt, **({"quality": 100} if fmt == "JPEG" else {})))


def _copy(src: str, dst: str) -> None:
    from ..training.saving import atomic_write

    atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))


def resize_images(src: str, dst: str, max_resolution: str = "512x512", divisible_by: int = 1,
                  interpolation: str | None = None, save_as_png: bool = False,
                  copy_associated_files: bool = False) -> list[str]:
    """Write the resized images (and copies) into `dst`; returns the images written."""
    require_dir(src, "src_img_folder")
    if divisible_by < 1:
        raise UserError(f"--divisible_by must be at least 1, not {divisible_by}")
    resolutions = parse_resolutions(max_resolution)
    if os.path.abspath(src) == os.path.abspath(dst):
        raise UserError(f"{dst}: the destination is the source folder; give another dst_img_folder")
    os.makedirs(dst, exist_ok=True)
    names = sorted(n for n in os.listdir(src) if os.path.isfile(os.path.join(src, n)))
    stems = {os.path.splitext(n)[0] for n in names if is_image_file(n)}
    written = []
    for name in names:
        path = os.path.join(src, name)
        stem, ext = os.path.splitext(name)
        if not is_image_file(name):
            _copy(path, os.path.join(dst, name))
            if copy_associated_files and stem in stems:
                for label, _w, _h in resolutions:
                    _copy(path, os.path.join(dst, f"{stem}+{label}{ext}"))
            continue
        image = load_image(path).convert("RGB")
        for label, w, h in resolutions:
            out = os.path.join(dst, f"{stem}+{label}{'.png' if save_as_png else '.jpg'}")
            result = resized(image, w, h, divisible_by, interpolation)
            _save(result, out)
            log.info("%s: %dx%d -> %s (%dx%d)", name, *image.size, os.path.basename(out), *result.size)
            written.append(out)
    return written


def run(args) -> None:
    written = resize_images(args.src_img_folder, args.dst_img_folder, args.max_resolution, args.divisible_by,
                            args.interpolation, args.save_as_png, args.copy_associated_files)
    print(f"{args.dst_img_folder}: {len(written)} images written")


def main(argv: list[str] | None = None) -> int:
    return run_tool("python -m sd_scripts.tools.resize_images_to_resolution",
                    "Resize the images of a folder to at most the given resolutions.", OPTIONS, run, argv)


if __name__ == "__main__":
    sys.exit(main())
