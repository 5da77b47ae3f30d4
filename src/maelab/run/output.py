"""The run's output folder, checked before anything trains: writable, with room for a checkpoint.
A run that cannot save should fail in its first second, not after hours of training."""

import logging
import os
import shutil
from pathlib import Path

from torch import nn

from maelab.atomic import OutputError, cannot_write, human_bytes, remove_quietly

log = logging.getLogger(__name__)


def check_output_writable(output_dir: Path) -> None:
    """Create ``checkpoints/`` and write and remove a small file there, or name the path and why not."""
    folder = output_dir / "checkpoints"
    probe = folder / f".write_test{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise OutputError(f"the output folder is not writable: {cannot_write(probe, e, 4096)}") from None
    finally:
        remove_quietly(probe)


def checkpoint_bytes(module: nn.Module) -> int:
    """About the size of one checkpoint: the weights, and two optimizer moments per trained weight."""
    return sum(p.numel() * p.element_size() * (3 if p.requires_grad else 1) for p in module.parameters()) + sum(
        b.numel() * b.element_size() for b in module.buffers()
    )


def check_room_for_checkpoints(folder: Path, module: nn.Module) -> None:
    """Refuse a run whose first checkpoint cannot fit on the disk; warn when a second one (the
    atomic write keeps the old file until the new one is complete) would not."""
    needed, free = checkpoint_bytes(module), shutil.disk_usage(folder).free
    if free < needed:
        raise OutputError(
            f"{folder}: a checkpoint of this model needs about {human_bytes(needed)} and only {human_bytes(free)} "
            "is free there (ENOSPC before training); free some space or choose another output folder (hydra.run.dir)"
        )
    if free < 2 * needed:
        log.warning(
            "%s has %s free: a checkpoint needs about %s, and replacing one needs room for both until "
            "the new one is complete",
            folder,
            human_bytes(free),
            human_bytes(needed),
        )
