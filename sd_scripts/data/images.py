"""Finding, sizing and loading training images; an unreadable image is a DatasetError naming the file.

EXIF orientation is honoured (a phone photo taken upright trains upright), both for the size and the pixels.
"""
from __future__ import annotations

import os

from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import DatasetError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_EXIF_ORIENTATION = 0x0112
_SWAPS_SIDES = {5, 6, 7, 8}


def is_image_file(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def list_images(folder: str) -> list[str]:
    """Image files directly inside `folder` (no recursion), sorted by name."""
    return sorted(os.path.join(folder, n) for n in os.listdir(folder)
                  if is_image_file(n) and os.path.isfile(os.path.join(folder, n)))


def _bad_image(path: str, err: Exception) -> DatasetError:
    return DatasetError(f"image {path} cannot be read ({type(err).__name__}: {err}): re-save it as PNG or JPEG, "
                        f"or remove it from the folder")


def read_image_size(path: str) -> tuple[int, int]:
    """(width, height) as the image will be trained, from the header only (cheap)."""
    try:
        with Image.open(path) as img:
            width, height = img.size
            orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise _bad_image(path, e) from None
    if width < 1 or height < 1:
        raise _bad_image(path, ValueError("zero size"))
    return (height, width) if orientation in _SWAPS_SIDES else (width, height)


def load_image(path: str) -> Image.Image:
    """The decoded image, upright, as RGB or RGBA (alpha kept for alpha_mask)."""
    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            has_alpha = "A" in img.getbands() or (img.mode == "P" and "transparency" in img.info)
            return img.convert("RGBA" if has_alpha else "RGB")
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise _bad_image(path, e) from None
