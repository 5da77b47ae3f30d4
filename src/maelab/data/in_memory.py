"""A datamodule for datasets that fit in device memory as uint8 (CIFAR-10: 150 MB).

The DataLoaders only produce batches of indices (sharded and shuffled per rank by
``data/samplers.py``); ``on_after_batch_transfer`` gathers the images and labels
from a copy of the split that lives on the training device. On a GPU a batch therefore costs one
gather: no worker decodes, collates or copies images in the loop.
"""

from dataclasses import dataclass
from functools import partial

import torch
from torch.utils.data import DataLoader, Dataset

from maelab.data.base import ShardedDataModule, worker_init
from maelab.data.samplers import sample_rng
from maelab.errors import UserError

SPLITS = ("train", "val", "test")


@dataclass
class IndexBatch:
    """What the DataLoader yields: the split to gather from and the sample indices."""

    split: str
    indices: torch.Tensor


class _Transformed(Dataset):
    """Images of a split through a per-image transform (in DataLoader workers), keyed by
    (index, epoch) so each sample's augmentation draws from (seed, epoch, index)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform, seed: int):
        self.images, self.labels, self.transform, self.seed = images, labels, transform, seed

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        i, epoch = key if isinstance(key, tuple) else (key, None)  # a plain index from a sampler Lightning set
        if epoch is None:
            return self.transform(self.images[i]), int(self.labels[i])
        with sample_rng(self.seed, epoch, i):
            return self.transform(self.images[i]), int(self.labels[i])


class _Indices(Dataset):
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def _collate(indices: list[int], split: str) -> IndexBatch:
    return IndexBatch(split, torch.tensor(indices, dtype=torch.long))


class InMemoryImageDataModule(ShardedDataModule):
    """Subclasses implement ``load_split(split) -> (uint8 (N, C, H, W), int64 (N,))`` for
    'train' and 'test'. ``val_size > 0`` holds that many training images out as the validation
    split (a fixed, seeded draw); 0 validates on the test split.

    ``train_transform`` (set by ``build`` for augmentations that need PIL images, such as
    RandAugment) switches the training loader to per-image transforms in ``num_workers``
    workers; evaluation stays a gather on the device."""

    def __init__(
        self,
        batch_size: int,
        img_size: int,
        num_classes: int,
        mean: list[float],
        std: list[float],
        eval_batch_size: int | None = None,
        val_size: int = 0,
        split_seed: int = 0,
        num_workers: int | None = None,
        run_seed: int = 0,
    ):
        super().__init__()
        self.run_seed = run_seed
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.img_size = img_size
        self.num_classes = num_classes
        self.mean, self.std = list(mean), list(std)
        self.val_size = val_size
        self.split_seed = split_seed
        self.num_workers = num_workers
        self.train_transform = None
        self.splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._on_device: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def load_split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        train, test = self.load_split("train"), self.load_split("test")
        if self.val_size:
            n = len(train[0])
            if not 0 < self.val_size < n:
                raise UserError(f"data.val_size={self.val_size} must be between 0 and {n - 1}")
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.split_seed))
            keep, held = order[: n - self.val_size], order[n - self.val_size :]
            self.splits = {"train": (train[0][keep], train[1][keep]), "val": (train[0][held], train[1][held])}
        else:
            self.splits = {"train": train, "val": test}
        self.splits["test"] = test

    def _eval_loader(self, split: str) -> DataLoader:
        dataset = _Indices(len(self.splits[split][1]))
        return DataLoader(
            dataset,
            batch_size=self.eval_batch_size,
            sampler=self.eval_sampler(dataset),
            generator=self.loader_generator(),
            collate_fn=partial(_collate, split=split),
        )

    def train_dataloader(self) -> DataLoader:
        images, labels = self.splits["train"]
        if self.train_transform is None:
            dataset = _Indices(len(labels))
            return DataLoader(
                dataset,
                batch_size=self.batch_size,
                sampler=self.train_sampler(dataset),
                generator=self.loader_generator(),
                drop_last=True,  # every step sees a full batch: the lr rule assumes it
                collate_fn=partial(_collate, split="train"),
            )
        dataset = _Transformed(images, labels, self.train_transform, self.run_seed)
        workers = self.workers(cap=8)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=self.train_sampler(dataset, with_epoch=True),
            generator=self.loader_generator(),
            drop_last=True,
            num_workers=workers,
            persistent_workers=workers > 0,
            worker_init_fn=worker_init,
            pin_memory=torch.cuda.is_available(),
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def on_after_batch_transfer(self, batch, dataloader_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(batch, IndexBatch):
            return batch  # (normalised float images, labels) from train_transform
        images, labels = self.split_on(batch.split, batch.indices.device)
        return images[batch.indices], labels[batch.indices]  # uint8 (N, C, H, W), int64 (N,)

    def split_on(self, split: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole split on ``device``, copied there once."""
        key = (split, str(device))
        if key not in self._on_device:
            images, labels = self.splits[split]
            self._on_device[key] = (images.to(device), labels.to(device))
        return self._on_device[key]

    def preview_images(self, n: int, split: str = "val") -> tuple[torch.Tensor, torch.Tensor]:
        """n images evenly spaced through a split (uint8, CPU): a fixed set to visualise that
        spans the classes even when the split is stored sorted by class."""
        self.setup()
        images, labels = self.splits[split]
        index = torch.linspace(0, len(images) - 1, min(n, len(images))).long()
        return images[index], labels[index]
