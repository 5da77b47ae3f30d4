"""train/img_per_s counts training only: a slow validation inside fit does not lower it."""

import time

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from maelab.callbacks.throughput import Throughput


class SlowValidation(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        time.sleep(0.5)  # much longer than an epoch of training

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_validation_time_does_not_count_against_training_throughput(tmp_path):
    data = DataLoader(TensorDataset(torch.randn(64, 4)), batch_size=8)  # 8 steps of 8 images an epoch
    throughput = Throughput(window=100)
    trainer = L.Trainer(
        max_epochs=3, accelerator="cpu", callbacks=[throughput], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1,
        default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(SlowValidation(), train_dataloaders=data, val_dataloaders=DataLoader(TensorDataset(torch.zeros(1, 4))))
    rates = [rate for _, rate in throughput.rates]
    assert len(rates) == 3  # one window an epoch, closed when validation starts
    assert min(rates) > 64 / 0.5 * 4  # 64 images in far less than the 0.5 s validation takes
