"""The images of one subset with their raw caption text and size: from its folder (captions in side files) or
from a fine-tune metadata JSON. With cache_info, image sizes are kept in `<image_dir>/metadata_cache.json`."""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

from ..errors import DatasetError
from .captions import read_caption
from .config_types import SubsetConfig
from .images import IMAGE_EXTENSIONS, list_images, read_image_size

logger = logging.getLogger(__name__)

SIZE_CACHE_NAME = "metadata_cache.json"


@dataclass(frozen=True)
class SubsetImage:
    """One image of a subset before bucketing."""

    path: str
    caption: str  # raw text: one line, or all lines joined by '\n' with wildcards
    size: tuple[int, int]  # (w, h), upright


def _metadata_entries(subset: SubsetConfig) -> list[tuple[str, str]]:
    """(image path, caption) pairs of a fine-tune metadata JSON {image: {"caption": ..., "tags": ...}}."""
    path = subset.metadata_file
    try:
        with open(path, encoding="utf-8") as f:
            metadata = json.load(f)
    except (OSError, ValueError) as e:
        raise DatasetError(f"metadata_file {path} cannot be read as UTF-8 JSON ({e}): fix or re-create it") from None
    if not isinstance(metadata, dict):
        raise DatasetError(f"metadata_file {path} must hold a JSON object {{image: {{caption, tags}}}}")
    entries, missing = [], []
    for key, info in metadata.items():
        image = _find_image(key, subset.image_dir)
        if image is None:
            missing.append(key)
            continue
        info = info if isinstance(info, dict) else {}
        caption, tags = info.get("caption"), info.get("tags")
        if caption is None:
            caption = tags
        elif tags:
            caption = caption + subset.caption.separator + " " + tags
        entries.append((image, (caption or subset.fallback_caption).strip()))
    if missing:
        logger.warning("metadata_file %s: %d image(s) not found and skipped, e.g. %s", path, len(missing), missing[0])
    return entries


def _find_image(key: str, image_dir: str | None) -> str | None:
    candidates = [key] if os.path.isabs(key) else []
    if image_dir:
        candidates.append(os.path.join(image_dir, key))
        candidates += [os.path.join(image_dir, key + ext) for ext in IMAGE_EXTENSIONS]
    return next((c for c in candidates if os.path.isfile(c)), None)


def _load_size_cache(folder: str) -> dict:
    try:
        with open(os.path.join(folder, SIZE_CACHE_NAME), encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_size_cache(folder: str, data: dict) -> None:
    tmp = os.path.join(folder, SIZE_CACHE_NAME + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f)
        os.replace(tmp, os.path.join(folder, SIZE_CACHE_NAME))
    except OSError as e:  # a read-only dataset still trains
        logger.warning("cannot write %s in %s (%s); image sizes are read again next time", SIZE_CACHE_NAME, folder, e)


class _SizeReader:
    """read_image_size, remembered per folder when cache_info is on (keyed by file name, size and mtime)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.caches: dict[str, dict] = {}
        self.dirty: set[str] = set()

    def size(self, path: str) -> tuple[int, int]:
        if not self.enabled:
            return read_image_size(path)
        folder, name = os.path.split(path)
        cache = self.caches.setdefault(folder, _load_size_cache(folder))
        stat = os.stat(path)
        entry = cache.get(name)
        if isinstance(entry, list) and len(entry) == 4 and entry[2:] == [stat.st_size, stat.st_mtime_ns]:
            return entry[0], entry[1]
        width, height = read_image_size(path)
        cache[name] = [width, height, stat.st_size, stat.st_mtime_ns]
        self.dirty.add(folder)
        return width, height

    def save(self) -> None:
        for folder in self.dirty:
            _save_size_cache(folder, self.caches[folder])


def subset_images(subset: SubsetConfig) -> list[SubsetImage]:
    """Every image of the subset, sorted by path, with caption and size. Errors name the file."""
    if subset.metadata_file:
        entries = _metadata_entries(subset)
    else:
        paths = list_images(subset.image_dir)
        if not paths:
            raise DatasetError(f"image_dir {subset.image_dir} has no images (png, jpg, jpeg, webp, bmp): add "
                               f"images or remove the subset")
        entries = [(p, read_caption(p, subset.caption_extension, subset.fallback_caption,
                                    subset.caption.enable_wildcard)) for p in paths]
    sizes = _SizeReader(subset.cache_info)
    images = [SubsetImage(path, caption, sizes.size(path)) for path, caption in sorted(entries)]
    sizes.save()
    return images
