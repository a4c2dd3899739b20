"""Safe extraction of an uploaded dataset zip into a chosen folder (inside the file browser's roots).

Refused: absolute names, `..` parts, symlinks and other special entries, more than `max_files` entries, more than
`max_bytes` in total (counted while writing, so lying headers do not help). The archive is extracted into a new
temporary folder beside the target and renamed into place only when everything went well: a refused zip leaves
nothing behind.
"""
from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
import zipfile

from .file_browser import FileBrowser

CHUNK = 1 << 20


class UploadError(ValueError):
    """A zip that is refused; the message names the entry and the rule."""


def _safe_parts(name: str) -> list[str]:
    if "\\" in name or name.startswith("/") or re.match(r"^[A-Za-z]:", name) or "\x00" in name:
        raise UploadError(f"entry {name!r} has an absolute or Windows path; refused")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise UploadError(f"entry {name!r} points outside the folder ('..'); refused")
    if any(any(ord(c) < 32 or ord(c) == 127 for c in p) for p in parts):
        raise UploadError(f"entry {name!r} has a control character in its name; refused")
    return parts


def extract_dataset_zip(zip_path: str, parent: str, browser: FileBrowser, name: str | None = None,
                        max_bytes: int = 2 << 30, max_files: int = 100_000) -> str:
    """Extract `zip_path` into a new folder `<parent>/<name>` (default: the zip's name) and return its path."""
    parent = browser.resolve(parent)
    if not os.path.isdir(parent):
        raise UploadError(f"{parent} is not a folder")
    stem = name or os.path.splitext(os.path.basename(zip_path))[0]
    stem = re.sub(r"[^A-Za-z0-9._ -]+", "_", stem).strip(" .") or "dataset"
    target = os.path.join(parent, stem)
    if os.path.lexists(target):
        raise UploadError(f"{target} already exists; choose another name or folder")
    try:
        archive = zipfile.ZipFile(zip_path)
    except (OSError, zipfile.BadZipFile) as e:
        raise UploadError(f"the upload is not a readable zip file: {e}") from None
    with archive:
        infos = archive.infolist()
        if len(infos) > max_files:
            raise UploadError(f"the zip holds {len(infos)} entries; at most {max_files} are accepted")
        if sum(i.file_size for i in infos) > max_bytes:
            raise UploadError(f"the zip unpacks to more than {max_bytes // (1 << 20)} MiB; refused")
        staging = tempfile.mkdtemp(prefix=".upload-", dir=parent)
        try:
            written = 0
            for info in infos:
                parts = _safe_parts(info.filename)
                kind = stat.S_IFMT(info.external_attr >> 16)  # 0 when the zip does not record a file type
                if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
                    raise UploadError(f"entry {info.filename!r} is a link or special file; refused")
                if not parts:
                    continue
                dest = os.path.join(staging, *parts)
                if info.is_dir():
                    os.makedirs(dest, exist_ok=True)
                    continue
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                with archive.open(info) as src, open(dest, "xb") as out:
                    while True:
                        chunk = src.read(CHUNK)
                        if not chunk:
                            break
                        written += len(chunk)
                        if written > max_bytes:
                            raise UploadError(f"the zip unpacks to more than {max_bytes // (1 << 20)} MiB; "
                                              f"refused")
                        out.write(chunk)
            os.rename(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return target
