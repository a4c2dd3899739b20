"""The caption editor's file side: the images of a dataset folder with their caption files, tag counts over the folder,
search / replace over every caption (previewed first), each caption saved in place atomically.

Confined as the file browser is: the folder must lie inside its roots, and every image and caption path is resolved
(symlinks included) and must stay inside that folder. Sub-folders are included (a dataset's `<repeats>_<name>/`
folders); hidden ones and symlinked folders are not followed. Torch-free; thumbnails are made with Pillow.
"""
from __future__ import annotations

import os
import re
import stat
import tempfile
from collections import Counter
from dataclasses import dataclass

from .dataset_prep import IMAGE_EXTENSIONS
from .file_browser import FileBrowser

MAX_IMAGES = 20_000
MAX_CAPTION_BYTES = 64 * 1024
THUMB_SIZE = 256


class CaptionError(ValueError):
    """A folder, file or value the caption editor refuses; the message says which and why."""


@dataclass(frozen=True)
class Item:
    """One image of the dataset and its caption (text '' when it has no caption file yet)."""

    image: str
    caption_path: str
    text: str

    @property
    def name(self) -> str:
        return os.path.basename(self.image)


@dataclass(frozen=True)
class Change:
    """What a replace does to one caption file."""

    caption_path: str
    old: str
    new: str


def _check_extension(extension: str) -> str:
    ext = (extension or ".txt").strip()
    if not ext.startswith("."):
        ext = "." + ext
    if not re.fullmatch(r"\.[A-Za-z0-9_]{1,16}", ext) or ext.lower() in IMAGE_EXTENSIONS:
        raise CaptionError(f"caption extension {extension!r}: use something like .txt or .caption")
    return ext


class CaptionFolder:
    """The images of `folder` (inside the browser's roots) and their `<stem><extension>` caption files."""

    def __init__(self, browser: FileBrowser, folder: str, extension: str = ".txt"):
        self.folder = browser.resolve(folder)
        if not os.path.isdir(self.folder):
            raise CaptionError(f"{self.folder} is not a folder")
        self.extension = _check_extension(extension)
        self.images = self._scan()

    def _scan(self) -> list[str]:
        found: list[str] = []
        for root, dirs, files in os.walk(self.folder):  # os.walk does not follow symlinked folders
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files, key=str.lower):
                if name.startswith(".") or not name.lower().endswith(IMAGE_EXTENSIONS):
                    continue
                path = os.path.join(root, name)
                if self._inside(path) and os.path.isfile(path):
                    found.append(path)
                    if len(found) >= MAX_IMAGES:
                        return found
        return found

    def _inside(self, path: str) -> bool:
        real = os.path.realpath(path)
        return os.path.commonpath([real, self.folder]) == self.folder

    def caption_path(self, image: str) -> str:
        return os.path.splitext(image)[0] + self.extension

    def read(self, image: str) -> str:
        path = self.caption_path(image)
        try:
            if not self._inside(path):
                return ""
            with open(path, "rb") as f:
                data = f.read(MAX_CAPTION_BYTES + 1)
        except (FileNotFoundError, IsADirectoryError):
            return ""
        if len(data) > MAX_CAPTION_BYTES:
            raise CaptionError(f"{path} is larger than {MAX_CAPTION_BYTES // 1024} KiB: not a caption")
        return data.decode("utf-8", errors="replace")

    # ---- pages
    def pages(self, per_page: int) -> int:
        return max(1, -(-len(self.images) // max(1, per_page)))

    def page(self, number: int, per_page: int) -> list[Item]:
        """The images of page `number` (1-based, clamped to the pages there are) with their captions."""
        number = min(max(1, int(number)), self.pages(per_page))
        chosen = self.images[(number - 1) * per_page:number * per_page]
        return [Item(image, self.caption_path(image), self.read(image)) for image in chosen]

    # ---- saving
    def save(self, image: str, text: str) -> bool:
        """Write the caption of `image` (one of this folder's images) in place, atomically. False when unchanged."""
        real = os.path.realpath(image)
        if real not in {os.path.realpath(p) for p in self.images} and image not in self.images:
            raise CaptionError(f"{image} is not an image of {self.folder}")
        text = _clean(text)
        if text == self.read(image):
            return False
        _write(self.caption_path(image), text)
        return True

    # ---- tags
    def tag_counts(self, separator: str = ",") -> Counter:
        """How many captions hold each tag (tags: the caption split at `separator`, stripped, empty ones left out)."""
        counts: Counter = Counter()
        for image in self.images:
            counts.update(set(split_tags(self.read(image), separator)))
        return counts

    # ---- search and replace
    def changes(self, find: str, replace: str, mode: str = "text", separator: str = ",") -> list[Change]:
        """What replacing `find` by `replace` would do to each caption that changes (nothing is written).

        mode 'text': every occurrence of the text; 'tag': whole tags equal to `find` (an empty replacement removes
        the tag; a tag is not repeated); 'regex': a Python regular expression (`\\1` groups in the replacement)."""
        if not find:
            raise CaptionError("type the text to find")
        if mode == "regex":
            try:
                pattern = re.compile(find)
            except re.error as e:
                raise CaptionError(f"not a valid regular expression: {e}") from None
        out = []
        for image in self.images:
            old = self.read(image)
            if mode == "text":
                new = old.replace(find, replace)
            elif mode == "tag":
                new = replace_tag(old, find, replace, separator)
            elif mode == "regex":
                try:
                    new = pattern.sub(replace, old)
                except (re.error, IndexError) as e:
                    raise CaptionError(f"the replacement does not fit the expression: {e}") from None
            else:
                raise CaptionError(f"unknown mode {mode!r}: use text, tag or regex")
            if new != old:
                out.append(Change(self.caption_path(image), old, _clean(new)))
        return out

    def apply(self, changes: list[Change]) -> int:
        """Write the previewed changes (each caption file atomically). Returns how many were written."""
        allowed = {self.caption_path(image) for image in self.images}
        for change in changes:
            if change.caption_path not in allowed:
                raise CaptionError(f"{change.caption_path} is not a caption of {self.folder}")
        for change in changes:
            _write(change.caption_path, change.new)
        return len(changes)


def split_tags(text: str, separator: str = ",") -> list[str]:
    return [t.strip() for t in text.split(separator or ",") if t.strip()]


def replace_tag(text: str, find: str, replace: str, separator: str = ",") -> str:
    """`text` with the tags equal to `find` replaced by `replace` (removed when it is empty), each tag once."""
    separator = separator or ","
    tags = split_tags(text, separator)
    if find.strip() not in tags:
        return text
    out: list[str] = []
    for tag in tags:
        new = replace.strip() if tag == find.strip() else tag
        if new and new not in out:
            out.append(new)
    joiner = separator + " " if separator.strip() else separator
    return joiner.join(out)


def _clean(text: str) -> str:
    text = (text or "").replace("\r\n", "\n").replace("\r", "\n")
    if "\x00" in text:
        raise CaptionError("a caption cannot hold a NUL character")
    return text


def _write(path: str, text: str) -> None:
    """Atomic replace, keeping the caption file's permission bits (0644 for a new one)."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        mode = 0o644
    from .atomic import atomic_write

    atomic_write(path, text, mode=mode)


def thumbnail(image: str, folder: str, size: int = THUMB_SIZE) -> str | None:
    """A small PNG copy of `image` in `folder` (GUI-owned, served to the browser); None when it cannot be read."""
    from PIL import Image

    try:
        st = os.stat(image)
    except OSError:
        return None
    name = f"{abs(hash((image, st.st_mtime_ns, st.st_size))) % 10**12}.png"
    dest = os.path.join(folder, name)
    if os.path.exists(dest):
        return dest
    os.makedirs(folder, exist_ok=True)
    try:
        with Image.open(image) as img:
            img.thumbnail((size, size))
            fd, tmp = tempfile.mkstemp(suffix=".png", dir=folder)
            with os.fdopen(fd, "wb") as f:
                img.convert("RGBA" if img.mode in ("RGBA", "LA", "P") else "RGB").save(f, format="PNG")
        os.replace(tmp, dest)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return dest
