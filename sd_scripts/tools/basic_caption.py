"""Basic captioning of a folder's images (kohya_ss Utilities > Captioning > Basic captioning).

    python -m sd_scripts.tools.basic_caption IMAGE_FOLDER [--caption_text "a photo of sks"] [--caption_file F]
        [--caption_file_ext .caption] [--file_pattern "*.png, *.jpg, *.jpeg, *.webp"] [--overwrite]
        [--prefix TEXT] [--postfix TEXT] [--find TEXT --replace TEXT] [--recursive]

For each image matching `--file_pattern`:
- `--caption_text` (or the first line of `--caption_file`) is written to `<stem><ext>` when that file does not
  exist, or over it with `--overwrite`;
- `--prefix` / `--postfix` are put before / after the caption, separated by a space (a caption that already starts
  with the prefix, or ends with the postfix, does not get it twice), and `--find` is replaced by `--replace`;
  an image without a caption file gets one holding prefix and postfix.
A caption file that existed before the run is changed only with `--overwrite` (else it is left as it is and counted
as skipped), as kohya_ss does. Files are written atomically, UTF-8.
"""
from __future__ import annotations

import fnmatch
import logging
import os
import sys
from dataclasses import dataclass

from ..errors import UserError
from .tool_cli import ToolOption, require_dir, run_tool, write_text_atomic

log = logging.getLogger(__name__)

OPTIONS: tuple[ToolOption, ...] = (
    ToolOption("image_folder", str, None, "folder of the images to caption", positional=True, required=True,
               path="dir"),
    ToolOption("caption_text", str, None, "caption to write for every image"),
    ToolOption("caption_file", str, None, "file whose first line is the caption to write", path="file"),
    ToolOption("caption_file_ext", str, ".caption", "caption file extension", aliases=("caption_extension",)),
    ToolOption("file_pattern", str, "*.png, *.jpg, *.jpeg, *.webp", "comma-separated patterns of the image names"),
    ToolOption("overwrite", bool, False, "replace or change existing caption files"),
    ToolOption("prefix", str, "", "text put before each caption"),
    ToolOption("postfix", str, "", "text put after each caption"),
    ToolOption("find", str, "", "text to find in each caption"),
    ToolOption("replace", str, "", "what --find is replaced with"),
    ToolOption("recursive", bool, False, "also caption the images in sub-folders"),
)


@dataclass
class CaptionCounts:
    written: int = 0
    skipped: int = 0
    unchanged: int = 0


def matching_images(folder: str, patterns: str, recursive: bool) -> list[str]:
    pats = [p.strip().lower() for p in patterns.split(",") if p.strip()]
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if recursive else []
        found += [os.path.join(root, n) for n in files if any(fnmatch.fnmatch(n.lower(), p) for p in pats)]
    return sorted(found)


def edit_caption(text: str, *, prefix: str = "", postfix: str = "", find: str = "", replace: str = "") -> str:
    """`text` with `find` replaced and prefix / postfix added (each once, separated by a space)."""
    if find:
        text = text.replace(find, replace)
    text = text.strip()
    if prefix and not text.startswith(prefix):
        text = f"{prefix} {text}" if text else prefix
    if postfix and not text.endswith(postfix):
        text = f"{text} {postfix}" if text else postfix
    return text


def caption_folder(folder: str, *, caption_text: str | None = None, caption_ext: str = ".caption",
                   file_pattern: str = "*.png, *.jpg, *.jpeg, *.webp", overwrite: bool = False, prefix: str = "",
                   postfix: str = "", find: str = "", replace: str = "", recursive: bool = False) -> CaptionCounts:
    require_dir(folder, "image_folder")
    if not caption_ext:
        raise UserError("--caption_file_ext is empty: give the caption extension, e.g. .txt")
    if find == "" and replace:
        raise UserError("--replace is given without --find: say which text to replace")
    images = matching_images(folder, file_pattern, recursive)
    if not images:
        raise UserError(f"{folder}: no images match --file_pattern {file_pattern!r}")
    counts = CaptionCounts()
    for image in images:
        path = os.path.splitext(image)[0] + caption_ext
        exists = os.path.isfile(path)
        if exists and not overwrite:
            counts.skipped += 1
            continue
        if caption_text is not None:
            text = caption_text
        elif exists:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        else:
            text = ""
        new = edit_caption(text, prefix=prefix, postfix=postfix, find=find, replace=replace)
        if exists and caption_text is None and new == text.strip():
            counts.unchanged += 1
            continue
        if not new:
            counts.unchanged += 1
            continue
        write_text_atomic(path, new)
        counts.written += 1
    return counts


def run(args) -> None:
    text = args.caption_text
    if args.caption_file:
        if text is not None:
            raise UserError("--caption_text and --caption_file are both given: use one")
        try:
            with open(args.caption_file, encoding="utf-8") as f:
                text = f.readline().strip()
        except OSError as e:
            raise UserError(f"--caption_file {args.caption_file} cannot be read ({e.strerror})") from None
    counts = caption_folder(args.image_folder, caption_text=text, caption_ext=args.caption_file_ext,
                            file_pattern=args.file_pattern, overwrite=args.overwrite, prefix=args.prefix,
                            postfix=args.postfix, find=args.find, replace=args.replace, recursive=args.recursive)
    if counts.skipped:
        log.warning("%d existing caption file(s) left as they are: add --overwrite to change them", counts.skipped)
    print(f"{args.image_folder}: {counts.written} caption files written, {counts.skipped} skipped, "
          f"{counts.unchanged} unchanged")


def main(argv: list[str] | None = None) -> int:
    return run_tool("python -m sd_scripts.tools.basic_caption", "Write or edit the caption files of a folder.",
                    OPTIONS, run, argv)


if __name__ == "__main__":
    sys.exit(main())
