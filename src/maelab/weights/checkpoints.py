"""Checkpoint files: written so that a crash mid-write never destroys the last good one."""

from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from maelab.atomic import write_atomically


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` through ``write_atomically``: a temporary file beside the target, fsync,
    then a rename.

    Lightning's own writer stages the file in the system temp folder and moves it into place;
    when that folder is on another filesystem than the run (a node-local /tmp, a shared
    cluster filesystem) the move is a copy onto the old checkpoint, and a crash in the middle of
    it leaves neither the old file nor the new one. A rename within one folder is atomic."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path):  # remote storage: Lightning's fsspec writer
            return super().save_checkpoint(checkpoint, path, storage_options)
        write_atomically(Path(path), lambda f: torch.save(checkpoint, f))


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_resumable(path: str, module: torch.nn.Module) -> None:
    """Stop before training when a checkpoint to resume holds another architecture, naming the
    parameters whose shapes differ and the settings it was trained with."""
    from maelab.errors import UserError

    checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
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
