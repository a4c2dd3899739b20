"""Pixel augmentations applied on every draw of an uncached image: horizontal flip and a small hue shift."""
from __future__ import annotations

import random

import numpy as np
from PIL import Image

# sd-scripts shifts hue by up to 8 of OpenCV's 180 hue steps; PIL's HSV hue has 256 steps.
_HUE_SHIFT_LIMIT = 8 * 256 / 180


def hue_shift(pixels: np.ndarray, rng: random.Random) -> np.ndarray:
    """`pixels` (uint8 [H, W, 3]) with the hue rotated by a random small amount."""
    shift = rng.uniform(-_HUE_SHIFT_LIMIT, _HUE_SHIFT_LIMIT)
    hsv = np.asarray(Image.fromarray(pixels, "RGB").convert("HSV")).copy()
    hsv[..., 0] = ((hsv[..., 0].astype(np.float32) + shift) % 256).astype(np.uint8)
    return np.array(Image.fromarray(hsv, "HSV").convert("RGB"))


def flip_horizontal(array: np.ndarray) -> np.ndarray:
    """Mirror an [H, W, ...] array left-right (a contiguous copy, ready for torch)."""
    return np.ascontiguousarray(array[:, ::-1])


def flipped_crop(crop_ltrb: tuple[int, int, int, int], resized_width: int) -> tuple[int, int, int, int]:
    """The crop window of the mirrored image."""
    left, top, right, bottom = crop_ltrb
    return resized_width - right, top, resized_width - left, bottom
