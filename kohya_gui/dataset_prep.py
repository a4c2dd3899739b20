"""Dataset preparation: a flat folder of images -> the '<repeats>_<tokens>' layout the trainers read.

    out_dir/img/<repeats>_<instance prompt> <class prompt>/   training images (+ their captions)
    out_dir/reg/<reg_repeats>_<class prompt>/                   regularisation images (optional)

Images are copied (or symlinked with link=True); caption files with the same stem (.txt, .caption) come along.
"""
from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass, field

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_EXTENSIONS = (".txt", ".caption")


class DatasetPrepError(ValueError):
    """A bad input to prepare_dataset; the message names the field or folder."""


@dataclass
class PrepResult:
    """Where the prepared folders are, how many images each concept folder got, and steps per epoch at batch 1."""

    train_data_dir: str
    reg_data_dir: str | None
    counts: dict[str, int] = field(default_factory=dict)  # concept folder name -> images
    steps_per_epoch: int = 0
    captions: int = 0


def _images(folder: str) -> list[str]:
    return sorted(n for n in os.listdir(folder)
                  if n.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(folder, n)))


def _put(src: str, dst: str, link: bool) -> None:
    if os.path.lexists(dst):
        os.remove(dst)
    if link:
        os.symlink(os.path.abspath(src), dst)
    else:
        shutil.copy2(src, dst)


def _fill(src_dir: str, dst_dir: str, link: bool) -> tuple[int, int]:
    os.makedirs(dst_dir, exist_ok=True)
    images = _images(src_dir)
    captions = 0
    for name in images:
        _put(os.path.join(src_dir, name), os.path.join(dst_dir, name), link)
        stem = os.path.splitext(name)[0]
        for ext in CAPTION_EXTENSIONS:
            caption = os.path.join(src_dir, stem + ext)
            if os.path.isfile(caption):
                _put(caption, os.path.join(dst_dir, stem + ext), link)
                captions += 1
    return len(images), captions


def _folder_name(field_name: str, text: str) -> str:
    text = " ".join(text.split())
    if not text:
        raise DatasetPrepError(f"{field_name}: enter the trigger / class words for the folder name")
    if any(c in text for c in '/\\\x00') or text in (".", ".."):
        raise DatasetPrepError(f"{field_name}: {text!r} cannot be part of a folder name (remove / and \\)")
    return text


def prepare_dataset(raw_images_dir: str, out_dir: str, instance_prompt: str, class_prompt: str, repeats: int,
                    reg_images_dir: str | None = None, reg_repeats: int = 1, link: bool = False) -> PrepResult:
    """Build out_dir/img/<repeats>_<instance> <class> (and out_dir/reg/<reg_repeats>_<class>). See module doc."""
    if not os.path.isdir(raw_images_dir):
        raise DatasetPrepError(f"raw_images_dir: folder {raw_images_dir} does not exist")
    if not _images(raw_images_dir):
        raise DatasetPrepError(f"raw_images_dir: {raw_images_dir} has no images (png, jpg, jpeg, webp, bmp)")
    if int(repeats) < 1 or int(reg_repeats) < 1:
        raise DatasetPrepError("repeats: must be 1 or more")
    tokens = _folder_name("instance_prompt", f"{instance_prompt} {class_prompt}")
    out_dir = os.path.abspath(out_dir)
    train_root = os.path.join(out_dir, "img")
    if os.path.abspath(raw_images_dir).startswith(train_root + os.sep):
        raise DatasetPrepError("out_dir: choose an output folder outside the raw images folder")
    concept = f"{int(repeats)}_{tokens}"
    n_train, captions = _fill(raw_images_dir, os.path.join(train_root, concept), link)
    result = PrepResult(train_data_dir=train_root, reg_data_dir=None, counts={concept: n_train}, captions=captions)
    n_reg = 0
    if reg_images_dir:
        if not os.path.isdir(reg_images_dir):
            raise DatasetPrepError(f"reg_images_dir: folder {reg_images_dir} does not exist")
        reg_concept = f"{int(reg_repeats)}_{_folder_name('class_prompt', class_prompt)}"
        reg_root = os.path.join(out_dir, "reg")
        n_reg, _ = _fill(reg_images_dir, os.path.join(reg_root, reg_concept), link)
        result.reg_data_dir = reg_root
        result.counts[f"reg/{reg_concept}"] = n_reg
    draws = n_train * int(repeats)
    result.steps_per_epoch = math.ceil(draws * (2 if n_reg else 1))
    return result
