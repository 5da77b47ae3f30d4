"""Training throughput in images per second, measured without a host sync per step.

Lightning's ``ThroughputMonitor`` calls ``torch.cuda.synchronize()`` after every training batch
(its ``_update``), which stalls the host until the GPU has finished the step and so costs the
overlap of one step's launch with the previous step's kernels; this callback synchronises once
per ``window`` steps, which is why maelab keeps its own."""

import logging
import statistics
import time

import lightning as L
import torch

log = logging.getLogger(__name__)


class Throughput(L.Callback):
    """Logs ``train/img_per_s`` (all ranks together) over windows of ``window`` steps. The device
    is synchronised once per window, and validation time never counts. ``steady_state`` is the
    median of all windows after the first epoch (compilation, caches and warm-up excluded).
    On a GPU each window also logs ``train/peak_memory_gb``, the most device memory allocated
    so far (``peak_memory_gb`` keeps it for results.json). Each window also writes a progress
    line to the Python log (train.log), which a batch job's output keeps even where no progress
    bar is drawn."""

    def __init__(self, window: int = 20):
        self.window = window
        self.rates: list[tuple[int, float]] = []  # (epoch, img/s)
        self._t0: float | None = None
        self._images = 0
        self.peak_memory_gb: float | None = None

    def _now(self, device: torch.device) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def _start(self, pl_module: L.LightningModule) -> None:
        self._t0, self._images = self._now(pl_module.device), 0

    def _flush(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._t0 is None or self._images == 0:
            return
        rate = self._images / (self._now(pl_module.device) - self._t0)
        self.rates.append((trainer.current_epoch, rate))
        metrics = {"train/img_per_s": rate}
        if pl_module.device.type == "cuda":
            self.peak_memory_gb = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
            metrics["train/peak_memory_gb"] = self.peak_memory_gb
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        loss = trainer.callback_metrics.get("train/loss")
        if not trainer.is_global_zero:
            return
        memory = "" if self.peak_memory_gb is None else f", peak memory {self.peak_memory_gb:.2f} GB"
        log.info(
            "epoch %d step %d: %.0f img/s, train/loss %s%s",
            trainer.current_epoch,
            trainer.global_step,
            rate,
            "-" if loss is None else f"{float(loss):.4f}",
            memory,
        )
        self._t0 = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._images += len(batch[0]) * trainer.world_size
        if (batch_idx + 1) % self.window == 0:
            self._flush(trainer, pl_module)
            self._start(pl_module)

    def on_validation_start(self, trainer, pl_module) -> None:
        if validating_within_fit(trainer):
            self._flush(trainer, pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        if validating_within_fit(trainer):
            self._start(pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._flush(trainer, pl_module)

    @property
    def steady_state(self) -> float | None:
        if not self.rates:
            return None
        first_epoch = self.rates[0][0]
        later = [r for epoch, r in self.rates if epoch > first_epoch]
        return statistics.median(later or [r for _, r in self.rates])


def validating_within_fit(trainer: L.Trainer) -> bool:
    """A validation inside ``trainer.fit`` (not the sanity check). ``trainer.training`` is False
    there: Lightning sets ``trainer.validating`` for the duration."""
    from lightning.pytorch.trainer.states import TrainerFn

    return trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking
