"""The '<repeats>_<class tokens>' folder convention: a parent folder of concept folders, e.g. `img/10_sks dog`.

Every mistake users commonly make (pointing at the concept folder, a folder without the repeat count, an empty
folder) is a one-line DatasetError with the path and the fix, or a loud warning for a folder that is skipped.
"""
from __future__ import annotations

import logging
import os
import re

from ..errors import DatasetError
from .config_types import SubsetConfig
from .images import is_image_file, list_images

logger = logging.getLogger(__name__)

_CONCEPT_NAME = re.compile(r"^(\d+)_(.*)$")


def parse_concept_name(name: str) -> tuple[int, str] | None:
    """'10_sks dog' -> (10, 'sks dog'); None when the name does not follow the convention or repeats < 1."""
    match = _CONCEPT_NAME.match(name)
    if not match or int(match.group(1)) < 1:
        return None
    return int(match.group(1)), match.group(2)


def _warn(message: str, warnings: list[str] | None) -> None:
    logger.warning(message)
    if warnings is not None:
        warnings.append(message)


def scan_concept_folders(parent: str, *, is_reg: bool, caption_extension: str,
                         warnings: list[str] | None = None) -> list[SubsetConfig]:
    """One SubsetConfig per concept folder in `parent` (the other fields keep their defaults).

    Skipped folders are logged as warnings (and appended to `warnings` when given).
    """
    option = "reg_data_dir" if is_reg else "train_data_dir"
    if not os.path.isdir(parent):
        raise DatasetError(f"{option} {parent} does not exist or is not a folder: check the path")
    names = sorted(os.listdir(parent))
    parent_name = os.path.basename(os.path.normpath(parent))
    loose_images = [n for n in names if is_image_file(n) and os.path.isfile(os.path.join(parent, n))]
    if loose_images and parse_concept_name(parent_name):
        raise DatasetError(f"{option} {parent} is a concept folder itself: set {option} to its parent folder "
                           f"{os.path.dirname(os.path.abspath(parent))}")
    subsets: list[SubsetConfig] = []
    ignored: list[str] = []
    for name in names:
        path = os.path.join(parent, name)
        if not os.path.isdir(path) or name.startswith("."):
            continue
        parsed = parse_concept_name(name)
        if parsed is None:
            _warn(f"folder {path} is ignored: concept folders are named '<repeats>_<class tokens>' with repeats of "
                  f"1 or more, e.g. '10_sks dog'; rename it to use it", warnings)
            ignored.append(name)
            continue
        repeats, class_tokens = parsed
        if not list_images(path):
            raise DatasetError(f"concept folder {path} has no images (png, jpg, jpeg, webp, bmp): add images or "
                               f"remove the folder")
        subsets.append(SubsetConfig(image_dir=path, num_repeats=repeats, class_tokens=class_tokens, is_reg=is_reg,
                                    caption_extension=caption_extension))
    if not subsets:
        if loose_images:
            raise DatasetError(f"{option} {parent} holds images directly: move them into a concept folder such as "
                               f"{os.path.join(parent, '10_sks dog')} (repeats, underscore, class tokens)")
        if ignored:
            shown = ", ".join(repr(n) for n in ignored[:3]) + (" ..." if len(ignored) > 3 else "")
            raise DatasetError(f"{option} {parent}: folder(s) {shown} are not named '<repeats>_<class tokens>': "
                               f"rename them, e.g. '10_{ignored[0]}' to repeat each image 10 times per epoch")
        raise DatasetError(f"{option} {parent} has no concept folders with images: add a folder such as "
                           f"{os.path.join(parent, '10_sks dog')} holding the images")
    if loose_images:
        _warn(f"{len(loose_images)} image(s) directly in {parent} are ignored: only images inside concept folders "
              f"are used", warnings)
    return subsets
