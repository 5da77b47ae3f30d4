"""Every weights file maelab reads goes through ``load_weights_file``: maelab checkpoints
(resuming, ``task.pretrained``, ``task.init_from``, export, visualize) and official MAE files.

A ``.pth`` or ``.ckpt`` is a pickle, and a pickle can run any code when it is loaded. So files are
read with ``torch.load(weights_only=True)``, which rebuilds tensors, containers, numbers and
strings and imports nothing else, plus the short allow-list below of what maelab's own
checkpoints and the official MAE files legitimately hold. A file that needs anything more is
refused in one line naming the type; ``trust_checkpoint_code=true`` (``--trust-checkpoint-code``
for the commands) loads it with full pickle, on purpose, for a file from a trusted source.

A truncated or corrupt file ends in one line naming it and the newest readable checkpoint beside it.
"""

import argparse
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from maelab.errors import UserError

# What the files users hand maelab hold beyond tensors and plain containers: the official MAE
# fine-tuned .pth files keep their command-line arguments. (maelab's own checkpoints need nothing:
# their hyper-parameters are plain dicts and their random states tensors.)
ALLOWED_GLOBALS = [argparse.Namespace]
TRUST_SETTING = "trust_checkpoint_code=true"


class UnreadableCheckpoint(UserError):
    """A truncated or corrupt weights file."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path} is unreadable, truncated or corrupt ({reason})")
        self.path = path


class RefusedCheckpoint(UserError):
    """A weights file whose unpickling would import a type outside the allow-list."""


def load_weights_file(path: str | Path, trust: bool = False, mmap: bool = False, setting: str = TRUST_SETTING) -> Any:
    """The object saved in ``path``, on the CPU. ``trust``: full pickle (the file may run code).
    ``setting``: how the user trusts a file, named when one is refused."""
    path = Path(path)
    try:
        if trust:
            return torch.load(path, map_location="cpu", mmap=mmap, weights_only=False)
        with torch.serialization.safe_globals(ALLOWED_GLOBALS):
            return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except Exception as e:  # noqa: BLE001  (torch reports a bad file in many types)
        needed = imported_global(e)
        if needed is None:
            raise UnreadableCheckpoint(path, why_unreadable(path, e)) from None
        raise RefusedCheckpoint(
            f"{path}: refused: loading it would import {needed}, which weights do not need (a pickled file "
            f"can run code when it is loaded); only for a file from a source you trust, load it with {setting}"
        ) from None


EXPECTED = "a maelab .ckpt or an official MAE .pth"


def load_user_file(path: str | Path, trust: bool = False, setting: str = TRUST_SETTING, expected: str = EXPECTED):
    """A file the user named (``task.pretrained``, a command's argument): one line if it is missing,
    unreadable (with the newest readable checkpoint beside it) or refused."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint file; pass {expected}")
    try:
        return load_weights_file(path, trust=trust, setting=setting)
    except UnreadableCheckpoint as e:
        raise UserError(f"{e}; {readable_alternative(path)}") from None


def imported_global(error: Exception) -> str | None:
    """The type torch's weights-only unpickler refused to import, from its message."""
    if not isinstance(error, pickle.UnpicklingError) or "Weights only load failed" not in str(error):
        return None
    found = re.search(r"GLOBAL ([\w.]+)", str(error))  # "Unsupported global: GLOBAL x.y", "unsupported GLOBAL x.y"
    return found.group(1) if found else None  # not a refusal: a file that is not a checkpoint


def why_unreadable(path: Path, error: Exception) -> str:
    """What is wrong with a file torch.load failed on, in a few words."""
    if not zipfile.is_zipfile(path):
        size = path.stat().st_size
        return f"{size} bytes that are not the zip archive torch.save writes" + (" (an empty file)" if not size else "")
    sentence = str(error).strip().split(". ")[0].splitlines()[0] if str(error).strip() else type(error).__name__
    return sentence[:200]


def newest_readable_beside(path: Path) -> tuple[Path, dict] | None:
    """The newest other .ckpt in ``path``'s folder that opens, with its epoch and step."""
    others = sorted(
        (p for p in path.parent.glob("*.ckpt") if p.resolve() != path.resolve()),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for other in others:
        try:
            checkpoint = load_weights_file(other, mmap=True)
        except UserError:
            continue
        if isinstance(checkpoint, dict):
            return other, {"epoch": checkpoint.get("epoch"), "step": checkpoint.get("global_step")}
    return None


def readable_alternative(path: Path) -> str:
    """Where to go instead of an unreadable ``path``, as a sentence."""
    found = newest_readable_beside(path)
    if found is None:
        return f"no other checkpoint in {path.parent} is readable"
    other, where = found
    epoch, step = where["epoch"], where["step"]
    return f"the newest readable checkpoint in {path.parent} is {other.name} (epoch {epoch}, step {step})"


def tensor_bytes(obj) -> int:
    """The bytes of every tensor in a checkpoint, about the size of its file."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(tensor_bytes(v) for v in obj)
    return 0
