"""What the job manager trusts on disk, and how little: the jobs folder's owner and mode, the queue-runner lock, and
the type of every field read back from a job.json.

- The jobs folder is created private (0700). A folder that another user owns, or that group or others may write to,
  is refused: whoever can write a job folder could otherwise make the GUI run programs as its user.
- One GUI per jobs folder runs the queue (an exclusive `fcntl.flock` on `<jobs_dir>/.queue.lock`); the others show
  the jobs read-only and take over when the runner exits.
- `check_job_fields` type-checks a job.json; a file that fails is reported as "unreadable" with the reason.
"""
from __future__ import annotations

import errno
import fcntl
import os
import stat
from typing import Any

LOCK_FILE = ".queue.lock"


class JobsDirError(ValueError):
    """The jobs folder cannot be used safely; the message says why and how to fix it."""


class JobFileError(ValueError):
    """A job.json whose content is not what the GUI writes; the message names the field."""


def ensure_private_dir(path: str) -> str:
    """Create `path` (0700) if missing; refuse a folder that is not ours or that others may write to."""
    path = os.path.abspath(path)
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as e:
        raise JobsDirError(f"jobs folder {path} cannot be created ({e.strerror}); choose another with "
                           f"--jobs_dir") from None
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise JobsDirError(f"jobs folder {path} is not a folder; choose another with --jobs_dir")
    if st.st_uid != os.getuid():
        raise JobsDirError(f"jobs folder {path} belongs to another user (uid {st.st_uid}): its jobs could run "
                           f"programs as you; choose a folder of your own with --jobs_dir")
    writable = [who for who, bit in (("group", stat.S_IWGRP), ("others", stat.S_IWOTH)) if st.st_mode & bit]
    if writable:
        raise JobsDirError(f"jobs folder {path} is writable by {' and '.join(writable)}: anyone who can write "
                           f"there could make the GUI run programs as you; run `chmod go-w {path}` or choose "
                           f"another --jobs_dir")
    return path


class QueueLock:
    """The exclusive lock that makes one GUI the queue runner of a jobs folder (released on close or exit)."""

    def __init__(self, jobs_dir: str):
        self.path = os.path.join(jobs_dir, LOCK_FILE)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def try_acquire(self) -> bool:
        """Take the lock if it is free (non-blocking). True while this process holds it."""
        if self._fd is not None:
            return True
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False
            raise
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return True

    def holder(self) -> str:
        """The pid written by the runner (for messages), or '?'."""
        try:
            with open(self.path, encoding="ascii", errors="replace") as f:
                text = f.read(32).strip()
        except OSError:
            return "?"
        return text if text.isdigit() else "?"

    def __del__(self) -> None:
        self.release()

    def release(self) -> None:
        if self._fd is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


#: job.json field -> (check, what it must be)
FIELD_TYPES: dict[str, tuple[Any, str]] = {
    "id": (lambda v: isinstance(v, str), "text"),
    "kind": (lambda v: isinstance(v, str), "text"),
    "name": (lambda v: isinstance(v, str), "text"),
    "status": (lambda v: isinstance(v, str), "text"),
    "pid": (lambda v: v is None or (_is_int(v) and v > 0), "a positive whole number or null"),
    "create_time": (lambda v: v is None or _is_number(v), "a number or null"),
    "argv": (_str_list, "a list of text"),
    "created": (_is_number, "a number"),
    "started": (lambda v: v is None or _is_number(v), "a number or null"),
    "ended": (lambda v: v is None or _is_number(v), "a number or null"),
    "exit_code": (lambda v: v is None or _is_int(v), "a whole number or null"),
    "error_message": (lambda v: v is None or isinstance(v, str), "text or null"),
    "error_hint": (lambda v: v is None or isinstance(v, str), "text or null"),
    "log_tail": (lambda v: isinstance(v, str), "text"),
    "queue_index": (_is_int, "a whole number"),
    "stop_requested": (lambda v: v is None or _is_number(v), "a number or null"),
    "killed": (lambda v: isinstance(v, bool), "true or false"),
    "outputs": (_str_list, "a list of text"),
    "values": (lambda v: isinstance(v, dict), "an object"),
    "accel": (lambda v: isinstance(v, dict), "an object"),
}


def check_job_fields(data: Any, folder_name: str, statuses: tuple[str, ...]) -> dict[str, Any]:
    """The known fields of a job.json, each of the type the GUI writes; JobFileError names the first bad one."""
    if not isinstance(data, dict):
        raise JobFileError(f"job.json holds {type(data).__name__}, not an object")
    out = {}
    for name, (ok, what) in FIELD_TYPES.items():
        if name not in data:
            if name in ("id", "kind"):
                raise JobFileError(f"field '{name}' is missing")
            continue
        if not ok(data[name]):
            raise JobFileError(f"field '{name}' must be {what}, got {data[name]!r:.60}")
        out[name] = data[name]
    if out["id"] != folder_name:
        raise JobFileError(f"field 'id' ({out['id']!r:.60}) does not match its folder {folder_name!r}")
    if out.get("status", "queued") not in statuses:
        raise JobFileError(f"field 'status' {out['status']!r:.40} is not one of {', '.join(statuses)}")
    return out
