"""Checkpoint files: written so that a crash mid-write never destroys the last good one."""

from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from maelab.atomic import write_atomically
from maelab.errors import UserError
from maelab.weights.loading import load_weights_file, tensor_bytes


class NonFiniteWeights(UserError):
    """A checkpoint about to be saved holds NaN or Inf weights."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written with ``torch.save`` through ``write_atomically`` (a temporary file
    beside the target, fsync, then a rename), never with NaN or Inf weights, and read back through
    ``load_weights_file`` (weights only, no pickled code) when Lightning resumes a run.

    Lightning's own writer stages the file in the system temp folder and moves it into place;
    when that folder is on another filesystem than the run (a node-local /tmp, a shared
    cluster filesystem) the move is a copy onto the old checkpoint, and a crash in the middle of
    it leaves neither the old file nor the new one. A rename within one folder is atomic."""

    def __init__(self, trust: bool = False):
        super().__init__()
        self.trust = trust

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        check_finite(checkpoint.get("state_dict", {}), path)
        if "://" in str(path):  # remote storage: Lightning's fsspec writer
            return super().save_checkpoint(checkpoint, path, storage_options)
        write_atomically(Path(path), lambda f: torch.save(checkpoint, f), size_hint=tensor_bytes(checkpoint))

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        if "://" in str(path):
            return super().load_checkpoint(path, map_location, weights_only=not self.trust)
        return load_weights_file(path, trust=self.trust)


def check_finite(state_dict: dict[str, torch.Tensor], path) -> None:
    """Refuse to save weights that hold NaN or Inf: the file on disk stays the last finite state."""
    for name, tensor in state_dict.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise NonFiniteWeights(f"not saving {path}: {name} holds NaN or Inf values; the previous file is kept")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_resumable(path: str, module: torch.nn.Module, trust: bool = False) -> None:
    """Stop before training when a checkpoint to resume is unreadable (``UnreadableCheckpoint``;
    ``run/fit.py`` names the newest readable one beside it) or holds another architecture (naming
    the parameters whose shapes differ and the settings it was trained with)."""
    checkpoint = load_weights_file(path, trust=trust, mmap=True)
    saved = {k: tuple(v.shape) for k, v in checkpoint.get("state_dict", {}).items()}
    wanted = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    problems = [
        f"{k} is {saved[k]} there, {wanted[k]} here"
        for k in sorted(wanted.keys() & saved.keys())
        if saved[k] != wanted[k]
    ]
    problems += [f"{k} is missing there" for k in sorted(wanted.keys() - saved.keys())]
    problems += [f"{k} is not in this model" for k in sorted(saved.keys() - wanted.keys())]
    if not problems:
        return
    before = _flatten(dict(checkpoint.get("hyper_parameters", {})))
    now = _flatten(dict(getattr(module, "hparams", {})))
    settings = [f"{k}={before[k]!r} (this run: {now.get(k)!r})" for k in sorted(before) if before[k] != now.get(k)]
    raise UserError(
        f"ckpt_path={path} holds another model than this run builds: {'; '.join(problems[:5])}"
        + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
        + ". Resume with the settings it was trained with"
        + (": " + ", ".join(settings) if settings else "")
    )
