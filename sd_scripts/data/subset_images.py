"""The images of one subset with their raw caption text and size: from its folder (captions in side files) or
from a fine-tune metadata JSON. With cache_info, image sizes and captions are kept in `<image_dir>/metadata_cache.json`
(sd-scripts' file); with a conditioning_data_dir, each image's mask image is found by name."""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, replace

from ..errors import DatasetError
from .captions import read_caption
from .config_types import SubsetConfig
from .images import IMAGE_EXTENSIONS, list_images, read_image_size

logger = logging.getLogger(__name__)

INFO_CACHE_NAME = "metadata_cache.json"  # sd-scripts' name (cache_info)


@dataclass(frozen=True)
class SubsetImage:
    """One image of a subset before bucketing."""

    path: str
    caption: str  # raw text: one line, or all lines joined by '\n' with wildcards
    size: tuple[int, int]  # (w, h), upright
    mask_path: str | None = None  # its mask image (conditioning_data_dir)


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


def _load_info_cache(folder: str) -> dict:
    """`{image path: {"caption": ..., "resolution": [w, h], ...}}` by file name; {} when absent or unreadable."""
    try:
        with open(os.path.join(folder, INFO_CACHE_NAME), encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {os.path.basename(key): entry for key, entry in data.items() if isinstance(entry, dict)}


class _InfoCache:
    """cache_info: sizes and captions of a folder's images kept in `<folder>/metadata_cache.json`.

    sd-scripts' layout ({image path: {"caption", "resolution": [w, h]}}, which sd-scripts reads back), plus what we
    check before trusting an entry: the image's byte size and mtime and the caption file's mtime (sd-scripts trusts
    the file blindly; here a changed, added or removed image or caption is read again and the file rewritten)."""

    def __init__(self, subset: SubsetConfig):
        self.subset = subset
        self.enabled = subset.cache_info
        self.folders: dict[str, dict] = {}
        self.dirty: set[str] = set()
        self.written: dict[str, dict] = {}

    def _stamp(self, path: str) -> dict:
        stat = os.stat(path)
        caption_file = os.path.splitext(path)[0] + self.subset.caption_extension
        caption_mtime = os.stat(caption_file).st_mtime_ns if os.path.isfile(caption_file) else None
        return {"image_bytes": stat.st_size, "image_mtime_ns": stat.st_mtime_ns, "caption_mtime_ns": caption_mtime,
                "caption_extension": self.subset.caption_extension, "wildcard": self.subset.caption.enable_wildcard,
                "class_tokens": self.subset.class_tokens}

    def info(self, path: str, read_caption_text) -> tuple[str, tuple[int, int]]:
        """(caption, (w, h)) of an image: from the cache when it still matches, else read (and remembered).
        `read_caption_text()` gives the caption; a str instead is the caption already known (metadata JSON)."""
        if isinstance(read_caption_text, str):
            known = read_caption_text
            read_caption_text = lambda: known  # noqa: E731
            caption, size = self.info(path, read_caption_text)
            if self.enabled:
                self.written[os.path.dirname(path)][path]["caption"] = known
            return known, size
        if not self.enabled:
            return read_caption_text(), read_image_size(path)
        folder, name = os.path.split(path)
        if folder not in self.folders:
            self.folders[folder] = _load_info_cache(folder)
            self.written[folder] = {}
        stamp = self._stamp(path)
        entry = self.folders[folder].get(name)
        if entry and all(entry.get(k) == v for k, v in stamp.items()) and isinstance(entry.get("caption"), str) \
                and _is_size(entry.get("resolution")):
            caption, size = entry["caption"], tuple(entry["resolution"])
        else:
            caption, size = read_caption_text(), read_image_size(path)
            self.dirty.add(folder)
        self.written[folder][os.path.join(folder, name)] = {"caption": caption, "resolution": list(size), **stamp}
        return caption, size

    def save(self) -> None:
        for folder, entries in self.written.items():
            if folder in self.dirty or len(entries) != len(self.folders[folder]):
                _save_info_cache(folder, entries)


def _is_size(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value)


def _save_info_cache(folder: str, data: dict) -> None:
    path = os.path.join(folder, INFO_CACHE_NAME)
    tmp = path + ".tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False, indent=2)
        os.replace(tmp, path)
    except OSError as e:  # a read-only dataset still trains
        logger.warning("cannot write %s (%s); image sizes and captions are read again next time", path, e)


def find_mask(image_path: str, mask_dir: str) -> str | None:
    """The mask image of `image_path` in `mask_dir`: the same file name stem with any image extension."""
    stem = os.path.splitext(os.path.basename(image_path))[0]
    for ext in IMAGE_EXTENSIONS:
        for candidate in (stem + ext, stem + ext.upper()):
            if os.path.isfile(os.path.join(mask_dir, candidate)):
                return os.path.join(mask_dir, candidate)
    return None


def _attach_masks(images: list[SubsetImage], mask_dir: str) -> list[SubsetImage]:
    out, missing = [], []
    for img in images:
        mask = find_mask(img.path, mask_dir)
        if mask is None:
            missing.append(os.path.basename(img.path))
        out.append(replace(img, mask_path=mask))
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise DatasetError(f"conditioning_data_dir {mask_dir} has no mask for {shown}: add a mask image with the "
                           f"same name (white = trained, black = ignored)")
    return out


def subset_images(subset: SubsetConfig) -> list[SubsetImage]:
    """Every image of the subset, sorted by path, with caption and size. Errors name the file."""
    cache = _InfoCache(subset)
    if subset.metadata_file:
        images = [SubsetImage(path, *cache.info(path, caption)) for path, caption in sorted(_metadata_entries(subset))]
    else:
        paths = list_images(subset.image_dir)
        if not paths:
            raise DatasetError(f"image_dir {subset.image_dir} has no images (png, jpg, jpeg, webp, bmp): add "
                               f"images or remove the subset")
        images = []
        for path in paths:
            caption, size = cache.info(path, lambda p=path: read_caption(p, subset.caption_extension,
                                                                         subset.fallback_caption,
                                                                         subset.caption.enable_wildcard))
            images.append(SubsetImage(path, caption, size))
    cache.save()
    if subset.conditioning_data_dir:
        images = _attach_masks(images, subset.conditioning_data_dir)
    return images
