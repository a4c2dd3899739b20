"""face_crop_aug_range: crop around the face whose box is written in the image's file name (sd-scripts' convention).

A file `<anything>_<cx>_<cy>_<w>_<h>.png` has a face centred at (cx, cy) of size w x h pixels in the original
image. Without bucketing, each draw scales the image so that the face spans between 1/MAX and 1/MIN of the crop's
short side (never enlarging beyond what covering the crop needs), then crops the training size around the face:
centred (jittered by up to 1/20 of the face when MIN != MAX and the face is large enough), or, with random_crop,
at a random offset that still favours the face. Images without the four numbers are fitted as usual.
"""
from __future__ import annotations

import os
import random

Size = tuple[int, int]
Face = tuple[int, int, int, int]  # (cx, cy, w, h) in pixels of the original image


def face_from_name(path: str) -> Face | None:
    """(cx, cy, w, h) from `<name>_<cx>_<cy>_<w>_<h>.<ext>`, or None when the name does not end with four
    numbers or the face has no size."""
    tokens = os.path.splitext(os.path.basename(path))[0].split("_")
    if len(tokens) < 5:
        return None
    try:
        cx, cy, w, h = (int(t) for t in tokens[-4:])
    except ValueError:
        return None
    return (cx, cy, w, h) if cx > 0 and max(w, h) > 0 else None


def face_crop_placement(image_size: Size, face: Face, crop: Size, face_range: tuple[float, float],
                        random_crop: bool, rng: random.Random) -> tuple[Size, tuple[int, int]]:
    """Where one draw takes its `crop` (w, h) from: (size the image is resized to, (left, top) of the crop in it)."""
    width, height = image_size
    cx, cy, fw, fh = face
    face_size = max(fw, fh)
    short = min(crop)
    cover = max(crop[0] / width, crop[1] / height)  # the smallest scale that still covers the crop
    low = max(cover, min(1.0, short / (face_size * face_range[1])))
    high = max(low, min(1.0, short / (face_size * face_range[0])))
    scale = low if low >= high else rng.uniform(low, high)
    resized = (max(crop[0], int(width * scale + 0.5)), max(crop[1], int(height * scale + 0.5)))
    starts = []
    for target, length, centre in ((crop[0], resized[0], int(cx * scale + 0.5)),
                                   (crop[1], resized[1], int(cy * scale + 0.5))):
        start = centre - target // 2
        if random_crop:  # include background: offsets up to the far edge, most likely near the face
            reach = max(length - centre, centre)
            start += rng.randint(0, reach) + rng.randint(0, reach) - reach
        elif face_range[0] != face_range[1] and face_size > short // 10 and face_size >= 40:
            start += rng.randint(-face_size // 20, face_size // 20)
        starts.append(max(0, min(start, length - target)))
    return resized, (starts[0], starts[1])
