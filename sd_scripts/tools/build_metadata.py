"""Build or update a fine-tuning metadata JSON from caption and tag files (the sd-scripts `in_json` format).

    python -m sd_scripts.tools.build_metadata --train_data_dir DIR --out meta.json
        [--caption_extension .caption] [--tag_extension .txt] [--full_path] [--in_json old.json] [--recursive]

The file maps an image key to its texts: `{"<key>": {"caption": "...", "tags": "a, b"}}`. The key is the image's
file name without extension, or its absolute path with `--full_path` (then images may live anywhere). For each image
the first line of `<stem><caption_extension>` becomes "caption" and of `<stem><tag_extension>` becomes "tags"; an
image with neither file is left out (a warning counts them). Entries of an existing JSON (`--in_json`, by default
`--out` itself when it exists) are kept and updated, as sd-scripts' merge_captions_to_metadata.py and
merge_dd_tags_to_metadata.py do. The JSON is written atomically.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from ..data.images import is_image_file
from ..errors import UserError

log = logging.getLogger(__name__)


def find_images(folder: str, recursive: bool = False) -> list[str]:
    """Image files in `folder` (and its sub-folders with `recursive`), sorted."""
    if not os.path.isdir(folder):
        raise UserError(f"train_data_dir {folder!r} does not exist or is not a folder: check the path")
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if recursive else []
        found += [os.path.join(root, n) for n in files if is_image_file(n) and not n.startswith(".")]
    return sorted(found)


def _first_line(path: str) -> str | None:
    """The first line of a text file, stripped; None when the file is absent."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return f.readline().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path} cannot be read as UTF-8 text ({e}): re-save it as UTF-8") from None


def image_key(path: str, full_path: bool) -> str:
    return os.path.abspath(path) if full_path else os.path.splitext(os.path.basename(path))[0]


def read_metadata(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"metadata JSON {path} cannot be read ({e}): fix it or leave out --in_json") from None
    if not isinstance(data, dict):
        raise UserError(f"metadata JSON {path} must hold an object {{image: {{caption, tags}}}}")
    return data


def build_metadata(train_data_dir: str, *, caption_extension: str | None = ".caption",
                   tag_extension: str | None = ".txt", full_path: bool = False, recursive: bool = False,
                   existing: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, int]]:
    """(metadata, counts): `existing` (copied) updated with the captions and tags found next to the images.

    counts: images, captions, tags, skipped (images with neither file).
    """
    metadata = {k: dict(v) if isinstance(v, dict) else {} for k, v in (existing or {}).items()}
    counts = {"images": 0, "captions": 0, "tags": 0, "skipped": 0}
    keys_seen: dict[str, str] = {}
    for image in find_images(train_data_dir, recursive):
        counts["images"] += 1
        stem = os.path.splitext(image)[0]
        caption = _first_line(stem + caption_extension) if caption_extension else None
        tags = _first_line(stem + tag_extension) if tag_extension else None
        if not caption and not tags:
            counts["skipped"] += 1
            continue
        key = image_key(image, full_path)
        if key in keys_seen and keys_seen[key] != image:
            raise UserError(f"images {keys_seen[key]} and {image} have the same key {key!r}: rename one, or use "
                            f"--full_path")
        keys_seen[key] = image
        entry = metadata.setdefault(key, {})
        if caption:
            entry["caption"] = caption
            counts["captions"] += 1
        if tags:
            entry["tags"] = tags
            counts["tags"] += 1
    return metadata, counts


def write_metadata(metadata: dict[str, Any], path: str) -> None:
    """Write the JSON atomically (temp file beside it, then rename)."""
    from ..training.saving import atomic_write

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(metadata, f, ensure_ascii=False, indent=2)
            f.write("\n")

    atomic_write(path, write)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sd_scripts.tools.build_metadata",
                                     description="Build or update a fine-tuning metadata JSON from caption and tag "
                                                 "files.")
    parser.add_argument("--train_data_dir", required=True, help="folder of images with caption/tag files")
    parser.add_argument("--out", required=True, help="metadata JSON to write")
    parser.add_argument("--in_json", help="metadata JSON to start from (default: --out when it exists)")
    parser.add_argument("--caption_extension", default=".caption", help="caption file extension ('' for none)")
    parser.add_argument("--tag_extension", default=".txt", help="tag file extension ('' for none)")
    parser.add_argument("--full_path", action="store_true", help="key images by absolute path instead of name")
    parser.add_argument("--recursive", action="store_true", help="also look in sub-folders")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        source = args.in_json or (args.out if os.path.isfile(args.out) else None)
        existing = read_metadata(source) if source else {}
        if args.caption_extension and args.caption_extension == args.tag_extension:
            raise UserError("--caption_extension and --tag_extension are the same: give them different extensions, "
                            "or '' to leave one out")
        metadata, counts = build_metadata(args.train_data_dir, caption_extension=args.caption_extension or None,
                                          tag_extension=args.tag_extension or None, full_path=args.full_path,
                                          recursive=args.recursive, existing=existing)
        if counts["images"] == 0:
            raise UserError(f"no images in {args.train_data_dir} (png, jpg, jpeg, webp, bmp)")
        write_metadata(metadata, args.out)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if counts["skipped"]:
        log.warning("%d image(s) have neither a %s nor a %s file and are left out", counts["skipped"],
                    args.caption_extension, args.tag_extension)
    print(f"{args.out}: {len(metadata)} entries ({counts['captions']} captions, {counts['tags']} tags from "
          f"{counts['images']} images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
