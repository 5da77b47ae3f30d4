"""Files written so that a crash mid-write never leaves a half-written file in place of the last
good one: into a temporary file beside the target, flushed to disk, then renamed over it (a
rename within one folder is atomic). Checkpoints, results.json and the decoded-image cache."""

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_atomically(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """``write(f)`` into ``path``'s temporary sibling, then rename it over ``path``; the
    temporary file is removed if anything fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomically(path: str | Path, text: str) -> None:
    write_atomically(path, lambda f: f.write(text.encode()))
