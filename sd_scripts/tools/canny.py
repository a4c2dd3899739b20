"""Canny edge images for ControlNet-style conditioning (sd-scripts' tools/canny.py), in numpy.

    python -m sd_scripts.tools.canny --input IMAGE_OR_FOLDER --output FILE_OR_FOLDER [--thres1 32] [--thres2 224]

The edges of the grey image: 3x3 Sobel gradients, magnitude |gx| + |gy| (OpenCV's default), thinning to the local
maxima along the gradient direction, then hysteresis: pixels above `--thres2` are edges, pixels above `--thres1`
are edges when connected to one. The output is a single-channel image, edges 255 on 0. A folder as `--input`
writes `<stem>.png` for each of its images into the `--output` folder. Files are written atomically.
"""
from __future__ import annotations

import logging
import os
import sys

import numpy as np

from ..data.images import is_image_file, load_image
from ..errors import UserError
from .tool_cli import ToolOption, run_tool

log = logging.getLogger(__name__)

OPTIONS: tuple[ToolOption, ...] = (
    ToolOption("input", str, None, "input image (or folder of images)", required=True, path="file_or_dir"),
    ToolOption("output", str, None, "output image (or folder)", required=True, path="file_or_dir"),
    ToolOption("thres1", int, 32, "low threshold: weaker edges kept only when connected to strong ones"),
    ToolOption("thres2", int, 224, "high threshold: stronger edges are always kept"),
)


def _sobel(gray: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.pad(gray, 1, mode="reflect")
    gx = (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2])
    gy = (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:])
    return gx, gy


def _thin(magnitude: np.ndarray, gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """Magnitude where it is a local maximum across the edge (4 quantised directions), else 0."""
    angle = (np.rad2deg(np.arctan2(gy, gx)) + 180.0) % 180.0
    m = np.pad(magnitude, 1)
    center = m[1:-1, 1:-1]
    neighbours = {  # direction -> the two neighbours across the edge
        0: (m[1:-1, :-2], m[1:-1, 2:]), 45: (m[:-2, 2:], m[2:, :-2]),
        90: (m[:-2, 1:-1], m[2:, 1:-1]), 135: (m[:-2, :-2], m[2:, 2:]),
    }
    bins = ((angle + 22.5) // 45 % 4 * 45).astype(int)
    keep = np.zeros_like(center, dtype=bool)
    for direction, (a, b) in neighbours.items():
        here = bins == direction
        # ties: the first neighbour must be strictly smaller (no double-width edges on plateaus)
        keep |= here & (center > a) & (center >= b)
    return np.where(keep, center, 0.0)


def _hysteresis(strong: np.ndarray, weak: np.ndarray) -> np.ndarray:
    """Strong pixels plus the weak ones 8-connected to them."""
    edges = strong.copy()
    stack = list(zip(*np.nonzero(strong)))
    h, w = strong.shape
    while stack:
        y, x = stack.pop()
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                ny, nx = y + dy, x + dx
                if 0 <= ny < h and 0 <= nx < w and weak[ny, nx] and not edges[ny, nx]:
                    edges[ny, nx] = True
                    stack.append((ny, nx))
    return edges


def canny(gray: np.ndarray, low: float, high: float) -> np.ndarray:
    """uint8 edge map (0/255) of a grey image [H, W] (0..255)."""
    if low > high:
        low, high = high, low  # as OpenCV: the smaller value is the low threshold
    gx, gy = _sobel(gray.astype(np.float32))
    thin = _thin(np.abs(gx) + np.abs(gy), gx, gy)
    return np.where(_hysteresis(thin > high, thin > low), 255, 0).astype(np.uint8)


def edge_image(path: str, out: str, low: float, high: float) -> None:
    from PIL import Image

    from ..training.saving import atomic_write

    gray = np.asarray(load_image(path).convert("L"))
    edges = Image.fromarray(canny(gray, low, high), mode="L")
    ext = os.path.splitext(out)[1].lower()
    fmt = Image.registered_extensions().get(ext)
    if fmt is None:
        raise UserError(f"--output {out}: unknown image extension {ext!r}; use .png or .jpg")
    atomic_write(out, lambda tmp: edges.save(tmp, format=fmt))


def run(args) -> None:
    if not os.path.exists(args.input):
        raise UserError(f"--input {args.input}: no such file or folder")
    if os.path.isdir(args.input):
        images = sorted(n for n in os.listdir(args.input) if is_image_file(n))
        if not images:
            raise UserError(f"--input {args.input}: no images (png, jpg, jpeg, webp, bmp) in the folder")
        os.makedirs(args.output, exist_ok=True)
        for name in images:
            edge_image(os.path.join(args.input, name), os.path.join(args.output, os.path.splitext(name)[0] + ".png"),
                       args.thres1, args.thres2)
    else:
        edge_image(args.input, args.output, args.thres1, args.thres2)
    log.info("done!")


def main(argv: list[str] | None = None) -> int:
    return run_tool("python -m sd_scripts.tools.canny", "Canny edge images.", OPTIONS, run, argv)


if __name__ == "__main__":
    sys.exit(main())
