"""Loss masks: a mask image (masked_loss with conditioning_data_dir) read as sd-scripts reads it.

The mask is the red channel of the mask image (a greyscale image works the same): 255 = trained, 0 = not trained,
values between weight the loss. It must have the image's aspect ratio; it is resized and cropped with the image.
"""
from __future__ import annotations

from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import DatasetError


def load_mask(mask_path: str, image_path: str, image_size: tuple[int, int]) -> Image.Image:
    """The mask of `image_path` as a greyscale ("L") image, upright; a DatasetError names both files when it cannot
    be read or its aspect ratio differs from the image's."""
    try:
        with Image.open(mask_path) as img:
            img.load()
            mask = ImageOps.exif_transpose(img).convert("RGB").getchannel("R")
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise DatasetError(f"mask image {mask_path} cannot be read ({type(e).__name__}: {e}): re-save it as PNG")
    (mw, mh), (iw, ih) = mask.size, image_size
    if abs(mw / mh - iw / ih) > 0.01 * (iw / ih):
        raise DatasetError(f"mask image {mask_path} is {mw}x{mh} but image {image_path} is {iw}x{ih}: a mask must have "
                           f"its image's size (or at least aspect ratio)")
    return mask
