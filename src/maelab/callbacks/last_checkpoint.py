"""checkpoints/last.ckpt: the file ``ckpt_path=last`` resumes."""

from pathlib import Path

import lightning as L


class LastCheckpoint(L.Callback):
    """Overwrites ``dirpath/last.ckpt`` at the end of every ``every_n_epochs``-th training epoch,
    whether or not validation ran in that epoch (ModelCheckpoint ties its "last" file to top-k
    saves and to validation epochs). The write is atomic (see ``AtomicCheckpointIO``)."""

    def __init__(self, dirpath: str, every_n_epochs: int = 1):
        self.path = Path(dirpath) / "last.ckpt"
        self.every_n_epochs = every_n_epochs
        self.saved_step: int | None = None  # the global step of the last write (Preemption reads it)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            trainer.save_checkpoint(self.path, weights_only=False)  # all ranks take part; rank 0 writes
            self.saved_step = trainer.global_step
