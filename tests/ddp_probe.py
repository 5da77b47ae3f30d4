"""A callback the DDP test adds through the command line: each rank records what it saw."""

import hashlib
from pathlib import Path

import lightning as L
import torch


def fingerprint(image: torch.Tensor) -> str:
    return hashlib.sha1(image.cpu().numpy().tobytes()).hexdigest()[:16]


class RecordRanks(L.Callback):
    """Writes ``rank{r}.pt``: the training and validation images this rank received (as
    fingerprints), the masking scores it drew, and its final weights."""

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)
        self.train, self.val, self.noise = [], [], []

    def on_fit_start(self, trainer, pl_module):
        masking = pl_module.model.masking
        draw = masking.noise

        def recorded(*args, **kwargs):
            scores = draw(*args, **kwargs)
            if pl_module.training:
                self.noise.append(scores.clone())
            return scores

        masking.noise = recorded

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.train += [fingerprint(image) for image in batch[0]]

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:
            self.val += [fingerprint(image) for image in batch[0]]

    def on_train_end(self, trainer, pl_module):
        self.out_dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        record = {"train": self.train, "val": self.val, "noise": self.noise, "weights": state}
        torch.save(record, self.out_dir / f"rank{trainer.global_rank}.pt")
