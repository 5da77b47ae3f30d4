"""The run's output folder, checked before anything trains: writable, with room for a checkpoint.
A run that cannot save should fail in its first second, not after hours of training."""

import logging
import os
import shutil
from pathlib import Path

from maelab.atomic import TEMP_MARK, OutputError, cannot_write, human_bytes, remove_quietly

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


def remove_unfinished_writes(output_dir: Path) -> None:
    """Remove the temporary files of writes a killed job did not finish (``write_atomically``'s
    ``.<name>.tmp<pid>``); the files they were replacing are intact. One process does it: rank 0,
    as Lightning reads it from the launcher's variables before any process group exists."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    if rank_zero_only.rank != 0:
        return
    for leftover in output_dir.rglob(f".*{TEMP_MARK}*"):
        if leftover.is_file() and leftover.name.rpartition(TEMP_MARK)[2].isdigit():
            remove_quietly(leftover)
            log.info("removed %s, a write a stopped job did not finish", leftover)


def checkpoint_bytes(module) -> int:
    """About the size of one checkpoint: the weights, and two optimizer moments per trained weight."""
    return sum(p.numel() * p.element_size() * (3 if p.requires_grad else 1) for p in module.parameters()) + sum(
        b.numel() * b.element_size() for b in module.buffers()
    )


def check_room_for_checkpoints(folder: Path, module) -> None:
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
