"""checkpoints/last.ckpt: the file ``ckpt_path=last`` resumes."""

import logging
from pathlib import Path

import lightning as L

from maelab.atomic import TEMP_MARK

log = logging.getLogger(__name__)


class LastCheckpoint(L.Callback):
    """Overwrites ``dirpath/last.ckpt`` at the end of every ``every_n_epochs``-th training epoch,
    whether or not validation ran in that epoch (ModelCheckpoint ties its "last" file to top-k
    saves and to validation epochs). The write is atomic (see ``AtomicCheckpointIO``)."""

    def __init__(self, dirpath: str, every_n_epochs: int = 1):
        self.path = Path(dirpath) / "last.ckpt"
        self.every_n_epochs = every_n_epochs
        self.saved_step: int | None = None  # the global step of the last write (Preemption reads it)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Remove what a job killed mid-write left (its temporary file; the checkpoint it was
        replacing is intact)."""
        if not trainer.is_global_zero or not self.path.parent.is_dir():
            return
        for leftover in self.path.parent.glob(f".*.ckpt{TEMP_MARK}*"):
            leftover.unlink(missing_ok=True)
            log.info("removed %s, a checkpoint write a stopped job did not finish", leftover)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            trainer.save_checkpoint(self.path, weights_only=False)  # all ranks take part; rank 0 writes
            self.saved_step = trainer.global_step
