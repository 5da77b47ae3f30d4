"""ImageNet, or any ImageFolder tree, read by DataLoader workers as the official MAE code reads it.

Layout: ``root/train/<class>/*`` and ``root/val/<class>/*`` (ImageNet's validation images already
sorted into class folders). The classes are the train split's folders, checked against val, so a
10-class subset needs no code change: ``data.num_classes`` follows the folders.

Workers decode each file (any format, mode or EXIF orientation, see ``files.read_rgb``) and apply
the per-image transform; batches travel as uint8 and are normalised on the device, except after
a transform that normalises itself (timm's RandAugment pipeline). Evaluation resizes to
``img_size / eval_crop_fraction`` (256 for 224) and takes the center crop, bicubic.

A file that cannot be decoded stops the run with its name. With ``skip_bad_images=true`` it is
dropped instead (a training batch keeps its size with a copy of another of its images), logged
with its name and counted once however often it is met (``results.json``, over all ranks). The check
runs in the main process, on the batch the workers hand over, so counts are never lost in a worker.
"""

import logging
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from maelab.data import jpeg_crop
from maelab.data.base import ShardedDataModule, worker_init
from maelab.data.decode import FastResizeCenterCrop
from maelab.data.files import BadImage, FileList, class_folders, list_image_folder, read_rgb
from maelab.data.gpu_decode import CropFromHeader, EncodedBatch, collate_encoded, decode_batch
from maelab.data.samplers import sample_rng
from maelab.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class FileBatch:
    images: torch.Tensor | None
    labels: torch.Tensor | None
    bad: list[BadImage] = field(default_factory=list)

    def pin_memory(self) -> "FileBatch":  # DataLoader(pin_memory=True) calls this
        if self.images is not None:
            self.images, self.labels = self.images.pin_memory(), self.labels.pin_memory()
        return self


def collate(samples: list, keep_size: bool = False) -> FileBatch:
    """Stacks the readable samples. ``keep_size`` (training) puts copies of readable samples of the
    batch in the places of unreadable ones, so a skipped file never changes the batch's shape
    (mixup pairs samples and needs an even batch; a compiled step wants a static one)."""
    good = [s for s in samples if not isinstance(s, BadImage)]
    bad = [s for s in samples if isinstance(s, BadImage)]
    if not good:
        return FileBatch(None, None, bad)
    if keep_size:
        good += [good[i % len(good)] for i in range(len(bad))]
    images = torch.stack([image for image, _ in good])
    return FileBatch(images, torch.tensor([label for _, label in good], dtype=torch.long), bad)


class ImageFiles(Dataset):
    """Decoded, transformed files. A training key is (index, epoch): the augmentation then draws
    from (seed, epoch, index) (``samplers.sample_rng``), the same in any worker, after any resume."""

    def __init__(self, files: FileList, transform, seed: int = 0):
        self.files, self.transform, self.seed = files, transform, seed

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: int | tuple[int, int]):
        i, epoch = key if isinstance(key, tuple) else (key, None)
        path, label = self.files[i]
        reads_files = getattr(self.transform, "reads_files", False)  # data.decode=fast: it decodes the file
        try:
            if reads_files:
                return self.transformed(path, i, epoch), label
            image = read_rgb(path)
        except (OSError, ValueError, SyntaxError) as e:  # what PIL raises for broken or unknown files
            return BadImage(str(path), f"{type(e).__name__}: {e}")
        return self.transformed(image, i, epoch), label

    def transformed(self, image, i: int, epoch: int | None):
        if epoch is None:
            return self.transform(image)
        with sample_rng(self.seed, epoch, i, torch_only=getattr(self.transform, "torch_draws_only", False)):
            return self.transform(image)


DECODES = ("fast", "pil", "gpu")


def checked_decode(decode: str) -> str:
    """``data.decode``: fast (``data/decode.py``), pil (PIL decodes each file whole, torchvision's
    transforms), or gpu (``data/gpu_decode.py``: training JPEGs decoded on the device)."""
    if decode not in DECODES:
        raise UserError(f"data.decode={decode!r}: expected one of {', '.join(DECODES)}")
    if decode == "gpu" and not torch.cuda.is_available():
        raise UserError("data.decode=gpu decodes JPEGs on the GPU and this machine has no CUDA device; "
                        "use data.decode=fast")  # fmt: skip
    if decode == "fast" and not jpeg_crop.available():
        log.warning("data.decode=fast decodes whole JPEGs, not only their crops (about a fifth slower): %s",
                    jpeg_crop.missing)  # fmt: skip
    return decode


class ImageFolderDataModule(ShardedDataModule):
    per_image_transforms = True  # run.build hands the augmentation to the loader workers

    def __init__(
        self,
        root: str,
        img_size: int = 224,
        num_classes: int | None = None,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        mean: list[float] = (0.485, 0.456, 0.406),
        std: list[float] = (0.229, 0.224, 0.225),
        eval_crop_fraction: float = 0.875,
        interpolation: str = "bicubic",
        decode: str = "fast",
        val_size: int = 0,
        split_seed: int = 0,
        skip_bad_images: bool = False,
        num_workers: int | None = None,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        train_dir: str = "train",
        val_dir: str = "val",
        run_seed: int = 0,
    ):
        super().__init__()
        self.run_seed = run_seed
        self.root = Path(root).expanduser().absolute()
        self.train_root, self.val_root = self.root / train_dir, self.root / val_dir
        self.classes = self.find_classes(root)
        if num_classes is not None and num_classes != len(self.classes):
            raise UserError(
                f"data.num_classes={num_classes}, but {self.train_root} holds {len(self.classes)} class folders; "
                "set data.num_classes=null to take the folder's count"
            )
        self.num_classes = len(self.classes)
        self.img_size, self.batch_size = img_size, batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.mean, self.std = list(mean), list(std)
        self.eval_crop_fraction, self.interpolation = eval_crop_fraction, T.InterpolationMode(interpolation)
        self.decode = checked_decode(decode)
        self.val_size, self.split_seed = val_size, split_seed
        self.skip_bad_images = skip_bad_images
        self.num_workers = num_workers
        self.pin_memory, self.persistent_workers = pin_memory, persistent_workers
        self.train_transform = None  # set by run.build from the augment config
        self.files: dict[str, FileList] = {}
        self.skipped: dict[str, str] = {}  # path -> why it could not be read

    def find_classes(self, root: str) -> list[str]:
        """The class names, from the train split's folders (both splits must exist)."""
        for split_dir in (self.train_root, self.val_root):
            if not split_dir.is_dir():
                raise UserError(
                    f"data.root={root}: there is no {split_dir}. An image folder holds {self.train_root}/<class>/* "
                    f"and {self.val_root}/<class>/* (ImageNet: val images sorted into class folders); "
                    "point data.root (or MAELAB_IMAGENET) at it, or read any folder of images with data=folder"
                )
        return class_folders(self.train_root)

    def setup(self, stage: str | None = None) -> None:
        if self.files:
            return
        _, train = list_image_folder(self.train_root)
        _, val = list_image_folder(self.val_root, self.classes)
        for split, files in (("train", train), ("val", val)):
            if not files:
                raise UserError(f"{self.root / split}: no image files under its class folders")
        self.files = {"train": train, "val": val, "test": val}
        if self.val_size:
            if not 0 < self.val_size < len(train):
                raise UserError(f"data.val_size={self.val_size} must be between 0 and {len(train) - 1}")
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.split_seed)).tolist()
            cut = len(train) - self.val_size
            self.files["train"], self.files["val"] = (
                train.subset(sorted(order[:cut])),
                train.subset(sorted(order[cut:])),
            )
        log.info("%s: %s", self.root, ", ".join(f"{k} {len(v)} images" for k, v in self.files.items()))

    def eval_transform(self):
        """Resize the short side to img_size / crop fraction, then the center crop (official)."""
        resize = int(self.img_size / self.eval_crop_fraction)
        if self.decode in ("fast", "gpu"):  # gpu: training decodes on the device; evaluation as fast
            return FastResizeCenterCrop(self.img_size, resize, self.interpolation.value)
        return T.Compose([T.Resize(resize, self.interpolation), T.CenterCrop(self.img_size), T.PILToTensor()])

    def _loader(self, split: str, transform, train: bool) -> DataLoader:
        dataset = ImageFiles(self.files[split], transform, self.run_seed)
        workers = self.workers(cap=10)
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            sampler=self.train_sampler(dataset, with_epoch=True) if train else self.eval_sampler(dataset),
            drop_last=train,
            num_workers=workers,
            collate_fn=partial(collate_encoded if isinstance(transform, CropFromHeader) else collate, keep_size=train),
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            # kept alive between epochs for training; evaluation's would idle, holding memory
            persistent_workers=train and self.persistent_workers and workers > 0,
            worker_init_fn=worker_init,
            generator=self.loader_generator(),
        )

    def train_dataloader(self) -> DataLoader:
        # augment=none trains on the evaluation view
        return self._loader("train", self.train_transform or self.eval_transform(), train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_transform(), train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_transform(), train=False)

    def on_before_batch_transfer(self, batch: FileBatch, dataloader_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(batch, EncodedBatch) and batch.samples:  # data.decode=gpu: decoded on the device
            trainer = getattr(self, "trainer", None)
            device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
            images = decode_batch(batch, self.img_size, device, self.interpolation.value)
            batch = FileBatch(images, None if images is None else batch.labels.to(device), batch.bad)
        for bad in batch.bad:
            if not self.skip_bad_images:
                raise UserError(
                    f"{bad.path}: cannot be read as an image ({bad.reason}). Replace or delete the file, or set "
                    "data.skip_bad_images=true to skip unreadable files (each is logged and counted)"
                )
            if bad.path not in self.skipped:  # logged once; skipped every epoch
                self.skipped[bad.path] = bad.reason
                log.warning("skipped %s (%s); %d unreadable file(s) so far", bad.path, bad.reason, len(self.skipped))
        if getattr(batch, "images", None) is None:
            raise UserError(f"no image of a batch could be read, e.g. {batch.bad[0].path}: check {self.root}")
        return batch.images, batch.labels

    def state_dict(self) -> dict:
        # every rank's skipped files, so a resumed run keeps counting them (all ranks dump the
        # checkpoint's state before rank 0 writes it, so the gather is collective)
        skipped = dict(self.skipped)
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.world_size > 1:
            import torch.distributed as dist

            per_rank = [None] * trainer.world_size
            dist.all_gather_object(per_rank, skipped)
            skipped = {path: why for rank in per_rank for path, why in rank.items()}
        return {**super().state_dict(), "skipped": skipped}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.skipped.update(state.get("skipped", {}))

    def preview_images(self, n: int, split: str = "val") -> tuple[torch.Tensor, torch.Tensor]:
        """n images evenly spaced through a split (uint8, CPU, the evaluation view; unreadable
        files left out with ``skip_bad_images``)."""
        self.setup()
        files = self.files[split]
        index = torch.linspace(0, len(files) - 1, min(n, len(files))).long().tolist()
        transform = self.eval_transform()
        picked = [(self.read(files[i][0]), files[i][1]) for i in index]
        picked = [(transform(image), label) for image, label in picked if image is not None]
        return torch.stack([image for image, _ in picked]), torch.tensor([label for _, label in picked])

    def read(self, path: Path):
        """The image, or None for an unreadable file with ``skip_bad_images`` (counted as training counts it)."""
        try:
            return read_rgb(path)
        except (OSError, ValueError, SyntaxError) as e:
            why = f"{type(e).__name__}: {e}"
            if not self.skip_bad_images:
                raise UserError(f"{path}: cannot be read as an image ({why}); replace or delete it, or set "
                                "data.skip_bad_images=true") from None  # fmt: skip
            self.skipped.setdefault(str(path), why)
            return None
