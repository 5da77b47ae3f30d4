"""Samplers that make training order a function of (seed, epoch) and evaluation exact under DDP.

Both are ``DistributedSampler`` subclasses, so Lightning keeps them on every rank (it replaces
only other samplers) and calls ``set_epoch`` each epoch.

``EpochShuffleSampler``: one permutation of the split per epoch, cut into disjoint equal shards,
one per rank, each a whole number of optimizer steps (``step_samples`` = per-device batch x
gradient accumulation): a trailing partial accumulation would step with a fraction of the
effective batch, so those samples wait for another epoch's permutation. A run resumed from a
checkpoint written in the middle of an epoch starts the interrupted epoch at the sample where its
rank stopped (``resume_at``), so it sees exactly the batches the uninterrupted run would have
seen: same samples, same order.

``EvalShardSampler``: every sample exactly once over all ranks. Lightning's default pads the last
shard with repeated samples so all ranks hold equal counts, which counts those samples twice in
the accuracy; validation here only reduces metrics at the end of the epoch, so unequal shards
(by one sample at most) are safe. It is what Lightning's ``UnrepeatedDistributedSampler`` does;
that class, tried in its place, left rank 1 of a 2-process CPU DDP run over an image folder
with loader workers waiting for its first validation batch forever
(``test_a_bad_file_met_by_both_ranks_is_counted_once``), where this one passes.
"""

import hashlib
import random
import struct
from contextlib import contextmanager

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, get_worker_info


class EpochShuffleSampler(DistributedSampler):
    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int,
        rank: int,
        seed: int,
        shuffle: bool = True,
        step_samples: int = 1,
        with_epoch: bool = False,  # yield (index, epoch): per-sample augmentation seeds (sample_rng)
    ):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        self.num_samples -= self.num_samples % step_samples
        self.total_size = self.num_samples * num_replicas
        self._resume: tuple[int, int] | None = None  # (epoch, samples of this rank already trained on)
        self.with_epoch = with_epoch

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
        mine = order[: self.total_size][self.rank :: self.num_replicas]  # disjoint, equal, whole steps
        skip = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            skip, self._resume = self._resume[1], None
        if self.with_epoch:
            return iter([(i, self.epoch) for i in mine[skip:].tolist()])
        return iter(mine[skip:].tolist())


def rank_seed(seed: int, rank: int) -> int:
    """A well-mixed 32-bit seed for one rank, derived from the run seed."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


@contextmanager
def sample_rng(seed: int, epoch: int, index: int, torch_only: bool = False):
    """Seeds torch's CPU stream, ``random`` and numpy from (run seed, epoch, sample) for one
    sample's augmentation (torchvision's crops and flips, timm's RandAugment and erasing draw from
    them). A sample's crop then does not depend on which worker draws it or when: a run resumed
    mid-epoch redraws exactly the crops the interrupted one would have, and any ``num_workers``
    gives the same batches. In the main process (``num_workers=0``) the streams are put back.
    ``torch_only`` (a transform's ``torch_draws_only``) seeds torch's stream alone, the same seed:
    seeding the other two costs the fast decode path a twentieth of its time.

    The seeds are a BLAKE2 hash of the three numbers: as well mixed as numpy's SeedSequence, and,
    in a loader worker between decodes, a fifth of its cost (which was another twentieth)."""
    key = struct.pack("<3Q", seed % 2**64, epoch, index)
    digest = hashlib.blake2b(key, digest_size=16, person=b"maelab.sample").digest()
    in_worker = get_worker_info() is not None
    saved = None if in_worker else (torch.get_rng_state(), random.getstate(), np.random.get_state())
    torch.default_generator.manual_seed(int.from_bytes(digest[:8], "little"))
    if not torch_only:
        random.seed(int.from_bytes(digest[8:], "little"))
        np.random.seed(np.frombuffer(digest, dtype=np.uint32))
    try:
        yield
    finally:
        if saved is not None:
            torch.set_rng_state(saved[0])
            random.setstate(saved[1])
            np.random.set_state(saved[2])


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
