"""Aspect-ratio buckets: the list of bucket sizes, the bucket of an image, and fitting an image into its bucket.

Sizes are (width, height) everywhere in this module. The rules are those of FORMATS.md ("Aspect-ratio bucketing"),
which match kohya sd-scripts so that a dataset lands in the same buckets as there.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image

Size = tuple[int, int]

INTERPOLATIONS: dict[str, int] = {
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "linear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "cubic": Image.Resampling.BICUBIC,
    "area": Image.Resampling.BOX,
    "box": Image.Resampling.BOX,
}


@dataclass
class FittedImage:
    """An image scaled and cropped to its bucket, with what SDXL conditioning needs to know about it."""

    pixels: np.ndarray  # uint8 [H, W, 3], H x W = the bucket
    original_size: Size  # (w, h) before any resize
    crop_ltrb: tuple[int, int, int, int]  # the real crop window in the resized image
    resized_size: Size  # (w, h) after the resize, before the crop
    alpha: np.ndarray | None = None  # the loss mask, float32 [H, W] in 0..1, when asked for


def make_buckets(resolution: Size, min_reso: int, max_reso: int, step: int) -> list[Size]:
    """All bucket sizes of about the area of `resolution`, sides multiples of `step` within [min_reso, max_reso]."""
    area = resolution[0] * resolution[1]
    square = int(math.sqrt(area) // step) * step
    buckets = {(square, square)}
    width = min_reso
    while width <= max_reso:
        height = min(max_reso, int(area // width // step) * step)
        if height >= min_reso:
            buckets.add((width, height))
            buckets.add((height, width))
        width += step
    return sorted(buckets)


def select_bucket(image_size: Size, buckets: list[Size]) -> Size:
    """The bucket of an image: an exact-size match, else the closest aspect ratio (first of equals in list order)."""
    if tuple(image_size) in buckets:
        return tuple(image_size)
    aspect = image_size[0] / image_size[1]
    return min(buckets, key=lambda b: abs(b[0] / b[1] - aspect))


def _round_to_step(value: float, step: int) -> int:
    rounded = int(value + 0.5)
    return rounded - rounded % step


def no_upscale_bucket(image_size: Size, resolution: Size, step: int) -> tuple[Size, Size]:
    """bucket_no_upscale: (resized size, bucket). Images larger than the area of `resolution` shrink to it, keeping
    their aspect ratio with one side snapped to the step; the bucket is the (resized) size floored to steps."""
    width, height = image_size
    max_area = resolution[0] * resolution[1]
    if width * height > max_area:
        aspect = width / height
        exact_w = math.sqrt(max_area * aspect)
        exact_h = max_area / exact_w
        # Snap the width or the height to the step, whichever keeps the aspect ratio better.
        w_snapped = _round_to_step(exact_w, step)
        h_for_w = _round_to_step(w_snapped / aspect, step)
        h_snapped = _round_to_step(exact_h, step)
        w_for_h = _round_to_step(h_snapped * aspect, step)
        err_w = abs(w_snapped / h_for_w - aspect) if h_for_w else math.inf
        err_h = abs(w_for_h / h_snapped - aspect) if h_snapped else math.inf
        if err_w < err_h:
            resized = (w_snapped, int(w_snapped / aspect + 0.5))
        else:
            resized = (int(h_snapped * aspect + 0.5), h_snapped)
    else:
        resized = (width, height)
    bucket = (resized[0] - resized[0] % step, resized[1] - resized[1] % step)
    return resized, bucket


def cover_size(image_size: Size, bucket: Size) -> Size:
    """The size that covers the bucket at the image's aspect ratio (round half up)."""
    width, height = image_size
    scale = max(bucket[0] / width, bucket[1] / height)
    return max(bucket[0], int(width * scale + 0.5)), max(bucket[1], int(height * scale + 0.5))


def resample_filter(resize_interpolation: str | None, upscale: bool) -> int:
    """PIL filter: the named one, else Lanczos to enlarge and area averaging to shrink."""
    if resize_interpolation:
        return INTERPOLATIONS[resize_interpolation.lower()]
    return Image.Resampling.LANCZOS if upscale else Image.Resampling.BOX


def fit_to_bucket(image: Image.Image, bucket: Size, *, random_crop: bool, rng: random.Random | None,
                  resize_interpolation: str | None = None, resized_size: Size | None = None,
                  with_alpha: bool = False, mask: Image.Image | None = None,
                  crop_left_top: tuple[int, int] | None = None) -> FittedImage:
    """Scale `image` to cover `bucket` (or to `resized_size`, for bucket_no_upscale and face crops) and crop the
    overflow: centred, at a random offset with `random_crop`, or at `crop_left_top` when given.

    The loss mask (`FittedImage.alpha`) follows the same resize and crop: `mask` (a greyscale image of the image's
    aspect ratio, e.g. a mask file), else with `with_alpha` the image's alpha channel (all ones without one)."""
    original = image.size
    target = tuple(resized_size) if resized_size else cover_size(original, bucket)
    mask_img = mask
    if mask_img is None and with_alpha:
        mask_img = image.getchannel("A") if "A" in image.getbands() else Image.new("L", original, 255)
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    flt = resample_filter(resize_interpolation, target[0] * target[1] > original[0] * original[1])
    if target != original:
        rgb = rgb.resize(target, flt)
    if mask_img is not None and mask_img.size != target:
        mask_img = mask_img.resize(target, resample_filter(resize_interpolation,
                                                           target[0] * target[1] > mask_img.size[0] * mask_img.size[1]))
    over_w, over_h = target[0] - bucket[0], target[1] - bucket[1]
    if crop_left_top is not None:
        left, top = crop_left_top
    elif random_crop:
        rng = rng or random.Random()
        left, top = rng.randint(0, over_w), rng.randint(0, over_h)
    else:
        left, top = over_w // 2, over_h // 2
    box = (left, top, left + bucket[0], top + bucket[1])
    pixels = np.array(rgb.crop(box), dtype=np.uint8)
    alpha = None
    if mask_img is not None:
        alpha = np.array(mask_img.crop(box), dtype=np.float32) / 255.0
    return FittedImage(pixels=pixels, original_size=original, crop_ltrb=box, resized_size=target, alpha=alpha)
