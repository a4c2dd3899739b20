"""Write a file so that readers see the old or the new content, never half of it, and two writers never collide.

The text goes to a unique temporary file (mkstemp, mode 0600) in the same folder, is flushed to disk and then renamed
over the target: a fixed temporary name would let two saves (two browser tabs, two GUIs) write into the same file.
"""
from __future__ import annotations

import os
import tempfile


def atomic_write(path: str, text: str, mode: int = 0o600) -> None:
    """Replace `path` with `text` (UTF-8) atomically; the file gets `mode` (private by default)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".part", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
