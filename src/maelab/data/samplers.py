"""Samplers that make training order a function of (seed, epoch) and evaluation exact under DDP.

Both are ``DistributedSampler`` subclasses, so Lightning keeps them on every rank (it replaces
only other samplers) and calls ``set_epoch`` each epoch.

``EpochShuffleSampler``: one permutation of the split per epoch, cut into disjoint equal shards,
one per rank. A run resumed from a checkpoint written in the middle of an epoch starts the
interrupted epoch at the sample where its rank stopped (``resume_at``), so it sees exactly the
batches the uninterrupted run would have seen: same samples, same order.

``EvalShardSampler``: every sample exactly once over all ranks. Lightning's default pads the last
shard with repeated samples so all ranks hold equal counts, which counts those samples twice in
the accuracy; validation here only reduces metrics at the end of the epoch, so unequal shards
(by one sample at most) are safe.
"""

import torch
from torch.utils.data import Dataset, DistributedSampler


class EpochShuffleSampler(DistributedSampler):
    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int, shuffle: bool = True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        self._resume: tuple[int, int] | None = None  # (epoch, samples of this rank already trained on)

    def resume_at(self, epoch: int, samples: int) -> None:
        """The next pass over ``epoch`` skips this rank's first ``samples`` samples."""
        self.set_epoch(epoch)
        self._resume = (epoch, samples)

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(len(self.dataset), generator=g)
        else:
            order = torch.arange(len(self.dataset))
        mine = order[: self.total_size][self.rank :: self.num_replicas]  # disjoint, equal shards
        skip = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            skip, self._resume = self._resume[1], None
        return iter(mine[skip:].tolist())


class EvalShardSampler(DistributedSampler):
    def __init__(self, dataset: Dataset, num_replicas: int, rank: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.num_samples = len(range(rank, len(dataset), num_replicas))
        self.total_size = len(dataset)

    def __iter__(self):
        return iter(range(self.rank, len(self.dataset), self.num_replicas))


def replicas(datamodule) -> tuple[int, int]:
    """(world size, global rank) of the trainer the datamodule is attached to; (1, 0) without one."""
    trainer = getattr(datamodule, "trainer", None)
    return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
