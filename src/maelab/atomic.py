"""Files written so that a crash mid-write never leaves a half-written file in place of the last
good one: into a temporary file beside the target, flushed to disk, then renamed over it (a
rename within one folder is atomic). Checkpoints, results.json, PNGs and the decoded-image cache.

A write the disk refuses (full, over quota, read-only, no permission) ends in one ``OutputError``
naming the file, the reason and the size it needed; the temporary file is removed and the
previous file is untouched."""

import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from maelab.errors import UserError

TEMP_MARK = ".tmp"  # temporary files are named .<target name>.tmp<pid>

REASONS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EFBIG: "the file is larger than this process may write",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "the file system is read-only",
}


class OutputError(UserError):
    """A file of the run's output could not be written."""


def write_atomically(path: str | Path, write: Callable[[BinaryIO], None], size_hint: int | None = None) -> None:
    """``write(f)`` into ``path``'s temporary sibling, then rename it over ``path``; the
    temporary file is removed if anything fails. ``size_hint``: the bytes the file needs, named
    when the disk refuses it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as e:
        refused = os_error(e)
        if refused is None:
            raise
        written = tmp.stat().st_size if tmp.exists() else 0
        remove_quietly(tmp)  # before the free space is measured for the message
        raise OutputError(cannot_write(path, refused, size_hint or written)) from None
    finally:
        remove_quietly(tmp)


def remove_quietly(path: Path) -> None:
    """Remove ``path`` if it exists (on a read-only file system even a missing file's unlink fails)."""
    try:
        if path.exists():
            path.unlink()
    except OSError:
        pass


def write_text_atomically(path: str | Path, text: str) -> None:
    data = text.encode()
    write_atomically(path, lambda f: f.write(data), size_hint=len(data))


def os_error(error: BaseException) -> OSError | None:
    """The disk's refusal behind ``error``: itself, or the OSError that torch.save's C++ writer
    turned into a RuntimeError ("unexpected pos ...") and kept as its context."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in REASONS:
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def cannot_write(path: Path, error: OSError, needed: int) -> str:
    reason = REASONS.get(error.errno, error.strerror or str(error))
    code = errno.errorcode.get(error.errno, str(error.errno))
    size = ""
    if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):  # a matter of room: how much, and how much is left
        free = free_bytes(path.parent)
        size = f"; it needs about {human_bytes(needed)}" if needed else ""
        size += f", {human_bytes(free)} free there" if free is not None else ""
    kept = "; the previous file is intact" if path.exists() else ""
    return f"cannot write {path}: {reason} ({code}){size}{kept}"


def free_bytes(folder: Path) -> int | None:
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            return shutil.disk_usage(candidate).free
    return None


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
