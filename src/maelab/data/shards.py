"""Streaming shards (``data=shards``): images packed by ``maelab prepare-data`` into LitData chunks
(``OUT/train``, ``OUT/val``, ``OUT/maelab.json``), read from a folder or an object store URL.

Millions of small files are slow to list and open on a cluster file system; a few thousand 64 MB
chunks are not. LitData (Lightning's own shard format) streams them:

- Each sample is the file's bytes as they were on disk, its label (-1 without labels) and its
  name. Workers hand the bytes to the per-image transform as ``data=folder`` hands it a file
  (``data.decode=fast`` decodes only the crop), or decode them as ``files.read_rgb`` reads a file
  (any mode, bit depth, EXIF orientation) first; ``channels``, ``skip_bad_images`` and the
  evaluation view are that module's.
- Training: LitData shuffles the order of the chunks and the samples inside each chunk from
  (``run_seed``, epoch) and gives every rank a disjoint, equal share of whole batches (what does
  not fill a batch on every rank waits for another epoch's order). A sample's crop is drawn from
  (run seed, epoch, sample) (``samplers.sample_rng``), whichever worker reads it.
- Evaluation: every sample once over all ranks (LitData gives what does not divide evenly to the
  last rank), in the order written.
- Resume: the datamodule's state carries the epoch and, in the middle of one, the training
  loader's LitData state (samples yielded), so a resumed run continues the interrupted epoch's
  order with the batch after the last one trained, with the same crops (``state_dict``).
"""

import io
import json
import logging
import os
import tempfile
import warnings
from functools import partial
from pathlib import Path

import torch
from litdata import StreamingDataLoader, StreamingDataset
from litdata.streaming.sampler import ChunkedIndex

from maelab.data.base import worker_init
from maelab.data.files import read_rgb
from maelab.data.folder import FolderDataModule
from maelab.data.imagenet import BadImage, collate
from maelab.data.samplers import sample_rng
from maelab.errors import UserError

log = logging.getLogger(__name__)

METADATA = "maelab.json"


def is_url(root: str) -> bool:
    return "://" in root or root.startswith("local:")


def read_metadata(root: str) -> dict:
    """``maelab.json`` of a shards folder or URL (an object store's is fetched by LitData)."""
    if not is_url(root):
        path = Path(root).expanduser() / METADATA
        if not path.is_file():
            raise UserError(
                f"data.root={root}: no {METADATA} there; write shards with `maelab prepare-data SRC {root}`"
            )
        return json.loads(path.read_text())
    from litdata.streaming.downloader import get_downloader

    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, METADATA)
        try:
            get_downloader(root, tmp, []).download_file(f"{root}/{METADATA}", local)
            return json.loads(Path(local).read_text())
        except Exception as e:  # each object store raises its own errors
            raise UserError(f"data.root={root}: cannot read {root}/{METADATA} ({type(e).__name__}: {e})") from None


def quiet_litdata() -> None:
    """LitData's notes on each dataset it opens (how it reads a folder, its cache budget) stay out
    of the run's log; its warnings stay in, except one: evaluation keeps the last partial batch on
    purpose (no collective runs per batch). Lightning's warning that an iterable dataset's length
    may be wrong with several workers does not apply: LitData gives each worker its exact share."""
    logging.getLogger("litdata").setLevel(logging.WARNING)
    dataset_log = logging.getLogger("litdata.streaming.dataset")
    if not any(getattr(f, "maelab", False) for f in dataset_log.filters):
        keep = lambda record: "disabled the `drop_last` option" not in record.getMessage()  # noqa: E731
        keep.maelab = True
        dataset_log.addFilter(keep)
    warnings.filterwarnings("ignore", message=".*Your `IterableDataset` has `__len__` defined.*")


class ImageShards(StreamingDataset):
    """A split's samples as (image, label): decoded, transformed; an unreadable one as a BadImage.
    Training transforms draw from (seed, epoch, sample index)."""

    def __init__(self, url: str, transform, seed: int, shuffle: bool, cache_dir: str | None = None):
        super().__init__(url, cache_dir=cache_dir, shuffle=shuffle, drop_last=shuffle, seed=seed)
        self.url, self.image_transform = url, transform

    def __getitem__(self, index):
        item = super().__getitem__(index)
        i = index.index if isinstance(index, ChunkedIndex) else int(index)
        name = os.fsdecode(bytes(item["name"]))
        try:
            if getattr(self.image_transform, "reads_files", False):  # data.decode=fast: it decodes the bytes
                return self.transformed(bytes(item["image"]), i), int(item["label"])
            image = read_rgb(io.BytesIO(item["image"]))
        except (OSError, ValueError, SyntaxError) as e:  # what PIL raises for broken or unknown files
            return BadImage(f"{self.url}: {name}", f"{type(e).__name__}: {e}")
        return self.transformed(image, i), int(item["label"])

    def transformed(self, image, i: int):
        if not self.shuffle:
            return self.image_transform(image)
        with sample_rng(self.seed, self.current_epoch, i, getattr(self.image_transform, "torch_draws_only", False)):
            return self.image_transform(image)


class ShardLoader(StreamingDataLoader):
    """LitData's loader with the epoch of each pass taken from ``next_epoch()`` (LitData counts
    from 1), so an epoch's order depends on (seed, epoch), not on how many passes this loader has
    made. After ``load_state_dict`` of a state written mid-epoch, the first pass continues it."""

    def __init__(self, dataset: ImageShards, next_epoch=None, **kwargs):
        super().__init__(dataset, **kwargs)
        self.next_epoch, self.continuing = next_epoch, False

    def load_state_dict(self, state: dict) -> None:
        """Lightning restoring its own copy of the state: ignored. The datamodule restores the
        loader itself (``resume``), after checking that the state fits this run (the same shards,
        seed, batch size and ranks); applied blindly, LitData would refuse another seed or folder
        and continue elastically where the epoch should start again."""

    def resume(self, state: dict) -> None:
        super().load_state_dict(state)
        self.continuing = self.restore  # LitData's flag: the state is mid-epoch

    def __iter__(self):
        if self.next_epoch is not None:
            if self.continuing:
                self.continuing = False
            else:
                # Lightning stops at the epoch's length without exhausting the iterator, so LitData
                # would keep ``restore`` set and replay the restored epoch's end
                self.restore = False
                self.current_epoch = self.next_epoch()  # LitData's __iter__ adds one
        return super().__iter__()


class ShardsDataModule(FolderDataModule):
    split_on = None  # no SplitsOnDevice: the k-NN monitor would decode whole splits at each check
    _resume_loader: dict | None = None  # the training loader's LitData state, to continue an epoch

    def __init__(self, root: str, cache_dir: str | None = None, **kwargs):
        quiet_litdata()
        self.url = str(root).rstrip("/")
        self.cache_dir = cache_dir
        super().__init__(root, **kwargs)
        self.root = self.url  # a folder or a URL, as given (logs and messages)
        if self.decode == "gpu":  # its crops are drawn from files' headers; shards hand decoded images
            raise UserError("data=shards decodes in its loader workers: use data.decode=fast or pil, not gpu")

    def find_classes(self, root: str) -> list[str]:
        self.metadata = read_metadata(self.url)
        if self.metadata.get("format") != "maelab-shards":
            raise UserError(f"data.root={root}: {METADATA} is not maelab-shards metadata; rewrite with prepare-data")
        counts = self.metadata["counts"]
        kind = f"{len(self.metadata['classes'])} classes" if self.metadata["classes"] else "no labels"
        log.info(
            f"{self.url}: shards of {counts['train']} + {counts['val']} images ({kind}, {self.channels} channel(s))"
        )
        return list(self.metadata["classes"])

    def setup(self, stage: str | None = None) -> None:
        pass  # LitData reads each split's index when a loader is built (after the ranks have started)

    def split_url(self, split: str) -> str:
        return f"{self.url}/{'train' if split == 'train' else 'val'}"

    def _loader(self, split: str, transform, train: bool) -> ShardLoader:
        dataset = ImageShards(self.split_url(split), transform, self.run_seed, shuffle=train, cache_dir=self.cache_dir)
        loader = ShardLoader(
            dataset,
            next_epoch=self.next_epoch if train else None,
            batch_size=self.batch_size if train else self.eval_batch_size,
            drop_last=train,
            num_workers=self.workers(cap=10),
            collate_fn=partial(collate, keep_size=train),
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            worker_init_fn=worker_init,
            generator=self.loader_generator(),
        )
        if train:
            self.check_one_batch(loader)
            self.train_loader = loader
            if self._resume_loader is not None:  # mid-epoch: LitData skips what this rank has trained on
                loader.resume(self._resume_loader)
                self._resume_loader, self._resume_position = None, None
        return loader

    def check_one_batch(self, loader: ShardLoader) -> None:
        if len(loader) == 0:
            world = self.trainer.world_size if getattr(self, "trainer", None) else 1
            raise UserError(
                f"{self.split_url('train')}: {self.metadata['counts']['train']} images do not make one batch of "
                f"data.batch_size={self.batch_size} on each of {world} rank(s); lower data.batch_size"
            )

    def next_epoch(self) -> int:
        """The epoch the training loader starts: a resumed run's (its loader is built before
        Lightning restores the trainer's epoch), then the trainer's."""
        if self._resume_position is not None:
            epoch, self._resume_position = self._resume_position[0], None
            return epoch
        trainer = getattr(self, "trainer", None)
        return trainer.current_epoch if trainer is not None else 0

    def state_dict(self) -> dict:
        """The skipped files and the position (base.py), with the loader's LitData state in the
        middle of an epoch. Lightning's own copy of it is restored too late to be used here: the
        optimizer's schedule builds the training loader before the trainer's loops are restored."""
        state = super().state_dict()
        position = state.get("train_position")
        loader = getattr(self, "train_loader", None)
        if position and position["batches"] and loader is not None:
            position["loader"], position["stream"] = loader.state_dict(), self.stream()
            if position["loader"]["num_samples_yielded"] != position["batches"] * self.batch_size:
                log.warning("the shard loader is ahead of training: a resumed run starts this epoch again")
                del position["loader"]
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)  # the skipped files; the position where the layout is this run's
        position = state.get("train_position") or {}
        if position and position.get("stream", self.stream()) != self.stream():
            log.warning(f"the checkpoint read {position['stream']}, this run {self.stream()}: "
                        f"epoch {position['epoch']} starts again from its first batch")  # fmt: skip
        elif self._resume_position is not None:
            self._resume_loader = position.get("loader")
        if position and self._resume_loader is None:  # the saved epoch again, from its first batch
            self._resume_position = (int(position["epoch"]), 0)

    def stream(self) -> str:
        """What LitData's state holds besides the layout: the shards' place and the shuffle seed."""
        return f"shards at {self.url} shuffled with seed {self.run_seed}"

    def preview_images(self, n: int, split: str = "val") -> tuple[torch.Tensor, torch.Tensor]:
        """n images evenly spaced through a split (uint8, CPU, the evaluation view)."""
        dataset = ImageShards(self.split_url(split), self.eval_transform(), 0, shuffle=False, cache_dir=self.cache_dir)
        total = self.metadata["counts"]["train" if split == "train" else "val"]
        samples = [dataset[i] for i in torch.linspace(0, total - 1, min(n, total)).long().tolist()]
        for sample in samples:
            if isinstance(sample, BadImage) and not self.skip_bad_images:
                raise UserError(f"{sample.path}: cannot be read as an image ({sample.reason}); replace it, or set "
                                "data.skip_bad_images=true")  # fmt: skip
        samples = [s for s in samples if not isinstance(s, BadImage)]
        return torch.stack([image for image, _ in samples]), torch.tensor([label for _, label in samples])
