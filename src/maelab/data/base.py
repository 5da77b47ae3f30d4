"""What every maelab datamodule shares: per-rank samplers and the training position in checkpoints.

The position (epoch, batches trained in it) goes into each checkpoint through the datamodule's
``state_dict``. Lightning restores it before it builds the training loader, so a run resumed
from a checkpoint written mid-epoch (a preemption) continues with the next batch of the same
permutation instead of starting the epoch again with another one.
"""

import logging
import os
import signal

import lightning as L
import torch
from lightning.fabric.utilities.seed import pl_worker_init_function
from torch.utils.data import Dataset

from maelab.data.samplers import EpochShuffleSampler, EvalShardSampler, rank_seed, replicas
from maelab.errors import UserError

log = logging.getLogger(__name__)


def worker_init(worker_id: int) -> None:
    """DataLoader workers leave preemption to the main process. SLURM signals every process of
    the job (SIGTERM, and submitit's USR2 before a limit); a worker that died of it, or ran
    submitit's requeue handler inherited through fork, would break the save at the next step
    (``run/preemption.py``). Workers still stop with their main process (PyTorch watches
    it) and with SIGKILL. Then Lightning's per-worker seeding (``seed_everything(workers=True)``)."""
    for name in {"SIGTERM", "SIGUSR2", "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")}:
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    pl_worker_init_function(worker_id)


def available_cpus() -> int:
    """CPUs this process may use: SLURM's per-task allocation, else the affinity mask (a
    container's or taskset's share, not the machine's count)."""
    if os.environ.get("SLURM_CPUS_PER_TASK"):
        return int(os.environ["SLURM_CPUS_PER_TASK"])
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class ShardedDataModule(L.LightningDataModule):
    run_seed: int = 0  # the run's seed (data.run_seed: ${seed}): epoch orders and sample augmentations derive from it
    batch_size: int
    _resume_position: tuple[int, int] | None = None

    def train_sampler(self, dataset: Dataset, shuffle: bool = True, with_epoch: bool = False) -> EpochShuffleSampler:
        world, rank = replicas(self)
        trainer = getattr(self, "trainer", None)
        accumulate = trainer.accumulate_grad_batches if trainer is not None else 1
        step_samples = self.batch_size * accumulate
        if len(dataset) < step_samples * world:
            raise UserError(
                f"one optimizer step takes data.batch_size={self.batch_size} x {accumulate} accumulated x {world} "
                f"rank(s) = {step_samples * world} images, more than the {len(dataset)} training images; "
                "lower task.effective_batch_size or data.batch_size, or use more data"
            )
        sampler = EpochShuffleSampler(dataset, world, rank, self.run_seed, shuffle, step_samples, with_epoch)
        if self._resume_position is not None:
            epoch, batches = self._resume_position
            sampler.resume_at(epoch, batches * self.batch_size)
        return sampler

    def workers(self, cap: int) -> int:
        """``num_workers``, or with null: this rank's share of the CPUs, at most ``cap``. Outside
        SLURM every rank of a node sees all its CPUs, so they are divided between its devices."""
        if self.num_workers is not None:
            return self.num_workers
        trainer = getattr(self, "trainer", None)
        local_ranks = 1 if os.environ.get("SLURM_CPUS_PER_TASK") or trainer is None else trainer.num_devices
        return max(1, min(cap, available_cpus() // local_ranks - 1))  # one CPU left to the training process

    def loader_generator(self) -> torch.Generator:
        """A DataLoader's own generator: creating an iterator draws its worker seed from here, not
        from the global stream, so resuming draws the same global random numbers as the run did."""
        _, rank = replicas(self)
        return torch.Generator().manual_seed(rank_seed(self.run_seed, rank))

    def eval_sampler(self, dataset: Dataset) -> EvalShardSampler:
        """Every sample once over all ranks, in order, no padding (data/samplers.py says why)."""
        world, rank = replicas(self)
        return EvalShardSampler(dataset, world, rank)

    def state_dict(self) -> dict:
        trainer = getattr(self, "trainer", None)
        if trainer is None or trainer.num_training_batches in (0, float("inf")):
            return {}
        epoch = trainer.current_epoch
        batches = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        if batches >= trainer.num_training_batches:  # the epoch is complete: the next one starts
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
