"""What every maelab datamodule shares: per-rank samplers and the training position in checkpoints.

The position (epoch, batches trained in it) goes into each checkpoint through the datamodule's
``state_dict``. Lightning restores it before it builds the training loader, so a run resumed
from a checkpoint written mid-epoch (a preemption) continues with the next batch of the same
permutation instead of starting the epoch again with another one.
"""

import logging

import lightning as L
import torch
from torch.utils.data import Dataset

from maelab.callbacks.seeding import rank_seed
from maelab.data.samplers import EpochShuffleSampler, EvalShardSampler, replicas

log = logging.getLogger(__name__)


class ShardedDataModule(L.LightningDataModule):
    seed: int = 0  # the run seed, set by ``train.build``: the epoch permutations derive from it
    batch_size: int
    _resume_position: tuple[int, int] | None = None

    def train_sampler(self, dataset: Dataset, shuffle: bool = True) -> EpochShuffleSampler:
        world, rank = replicas(self)
        sampler = EpochShuffleSampler(dataset, world, rank, self.seed, shuffle)
        if self._resume_position is not None:
            epoch, batches = self._resume_position
            sampler.resume_at(epoch, batches * self.batch_size)
        return sampler

    def loader_generator(self) -> torch.Generator:
        """A DataLoader's own generator: creating an iterator draws its worker seed from here, not
        from the global stream, so resuming draws the same global random numbers as the run did."""
        _, rank = replicas(self)
        return torch.Generator().manual_seed(rank_seed(self.seed, rank))

    def eval_sampler(self, dataset: Dataset) -> EvalShardSampler:
        world, rank = replicas(self)
        return EvalShardSampler(dataset, world, rank)

    def state_dict(self) -> dict:
        trainer = getattr(self, "trainer", None)
        if trainer is None or trainer.num_training_batches in (0, float("inf")):
            return {}
        from maelab.modules.optim import full_step_batches

        epoch = trainer.current_epoch
        batches = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        if batches >= full_step_batches(trainer):  # the epoch is complete: the next one starts
            epoch, batches = epoch + 1, 0
        return {"train_position": {"epoch": epoch, "batches": batches, "layout": self._layout()}}

    def load_state_dict(self, state: dict) -> None:
        position = state.get("train_position")
        if position is None:
            return
        if position["layout"] != self._layout():
            log.warning(
                "the checkpoint was written with %s, this run has %s: epoch %d starts again from its first batch",
                position["layout"],
                self._layout(),
                position["epoch"],
            )
            return
        self._resume_position = (int(position["epoch"]), int(position["batches"]))

    def _layout(self) -> str:
        """What a position in the epoch depends on besides (seed, epoch)."""
        world, _ = replicas(self)
        return f"batch size {self.batch_size} on {world} rank(s)"
