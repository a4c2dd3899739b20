"""Server-side file browsing for path fields: a remote user picks datasets and models without typing paths.

Only folders under the roots config.toml allows (`[gui] browse_roots`, default: the user's home) are listed. Paths are
resolved (symlinks included) before the check, so neither `..` nor a link can step outside a root.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

MAX_ENTRIES = 2000


class BrowseError(ValueError):
    """A folder the browser may not show or cannot read; the message says why."""


@dataclass(frozen=True)
class Entry:
    name: str
    is_dir: bool


def default_roots() -> list[str]:
    return [os.path.expanduser("~")]


class FileBrowser:
    """Lists folders inside the allowed roots."""

    def __init__(self, roots: list[str] | None = None):
        cleaned = [os.path.realpath(os.path.expanduser(r)) for r in (roots or []) if isinstance(r, str) and r.strip()]
        self.roots = cleaned or [os.path.realpath(r) for r in default_roots()]

    @property
    def home(self) -> str:
        return self.roots[0]

    def inside(self, path: str) -> bool:
        """True when the real path of `path` is one of the roots or below one."""
        real = os.path.realpath(path)
        return any(os.path.commonpath([real, root]) == root for root in self.roots)

    def resolve(self, path: str | None) -> str:
        """The real path of `path` (the first root when empty); BrowseError when it lies outside every root."""
        text = (path or "").strip()
        if any(ord(c) < 32 or ord(c) == 127 for c in text):
            raise BrowseError("the path contains a control character")
        real = os.path.realpath(os.path.expanduser(text)) if text else self.home
        if not self.inside(real):
            raise BrowseError(f"{text or real} is outside the folders the file browser may show "
                              f"({', '.join(self.roots)}); add it to [gui] browse_roots in config.toml")
        return real

    def folder_of(self, path: str | None) -> str:
        """The folder to list for `path`: itself when a folder, else its parent."""
        real = self.resolve(path)
        return real if os.path.isdir(real) else self.resolve(os.path.dirname(real))

    def listing(self, path: str | None) -> tuple[str, list[Entry]]:
        """(folder, entries): sub-folders first, then files, by name; hidden entries left out."""
        folder = self.folder_of(path)
        try:
            names = sorted(os.listdir(folder), key=str.lower)
        except OSError as e:
            raise BrowseError(f"cannot list {folder}: {e.strerror}") from None
        entries = []
        for name in names[:MAX_ENTRIES]:
            if name.startswith("."):
                continue
            full = os.path.join(folder, name)
            entries.append(Entry(name, os.path.isdir(full)))
        entries.sort(key=lambda e: (not e.is_dir, e.name.lower()))
        return folder, entries

    def parent(self, folder: str) -> str:
        """The parent folder, or `folder` itself at a root."""
        real = self.resolve(folder)
        up = os.path.dirname(real)
        return up if up != real and self.inside(up) else real
