"""Any folder of images (``data=folder``): the files under ``root``, searched recursively, with
labels only where the folder has them. Pretraining needs none; the most common MAE request is
pretraining on one's own unlabelled photos, scans or frames.

- Labels: ``labels: auto`` takes the first-level folders as classes when every image sits in
  one (an ImageFolder tree, ``root/<class>/...``) and there are at least two; ``folders`` requires
  that; ``none`` ignores the folders (photos sorted by date are not classes).
- Validation: a held-out share of the files (``val_size``: a fraction, or a number of images),
  drawn with ``split_seed``, the same in every run. Pretraining validates on its reconstruction
  loss; the k-NN monitor needs labels and says it is skipped when there are none.
- Channels: ``channels: 1`` reads every file as grayscale, for a single-channel MAE
  (``model.in_chans`` follows ``data.channels``); 3 reads RGB. Any mode, bit depth or EXIF
  orientation is converted as ``files.read_rgb`` does.
- Files that are not images (by suffix) are left out with one log line counting them by suffix;
  a folder with no image file, or none readable, stops with one line.

Loading, augmentation in the loader workers, unreadable-file handling and resuming are the
image-folder module's (``data/imagenet.py``)."""

import logging
from collections import Counter
from pathlib import Path

import torch
from torchvision import transforms as T

from maelab.data.files import IMAGE_SUFFIXES, FileList
from maelab.data.imagenet import ImageFolderDataModule
from maelab.errors import UserError

log = logging.getLogger(__name__)

LABELS = ("auto", "folders", "none")


def list_files(root: Path) -> tuple[list[Path], Counter]:
    """Image files under ``root`` (sorted; hidden files and folders left out) and a count of the
    other files by suffix."""
    images, others = [], Counter()
    for path in sorted(root.rglob("*")):
        if any(part.startswith(".") for part in path.relative_to(root).parts) or not path.is_file():
            continue
        if path.suffix.lower() in IMAGE_SUFFIXES:
            images.append(path)
        else:
            others[path.suffix.lower() or "(no suffix)"] += 1
    return images, others


def not_images(root: Path, others: Counter) -> str:
    """The line that says which files of ``root`` were left out for not being images."""
    listed = ", ".join(f"{n} {suffix}" for suffix, n in others.most_common(5))
    return f"{root}: left out {sum(others.values())} files that are not images ({listed})"


def hold_out(n: int, share: float, seed: int, key: str) -> tuple[list[int], list[int]]:
    """(training, held-out) indices of n files: ``share`` is a fraction (at least one file) or a
    number of files, drawn with ``seed`` (the same in every run and in ``maelab prepare-data``)."""
    held = max(1, round(share * n)) if share < 1 else int(share)
    if not 0 < held < n:
        raise UserError(
            f"{key}={share:g} holds out {held} of {n} images; hold out at least one and leave some to train on "
            "(a fraction in (0, 1) or a number of images)"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[held:]), sorted(order[:held])


def folder_labels(root: Path, files: list[Path], labels: str) -> list[str]:
    """The class names (empty: unlabelled) by the ``labels`` rule."""
    parts = [f.relative_to(root).parts for f in files]
    in_folders = all(len(p) > 1 for p in parts)
    classes = sorted({p[0] for p in parts}) if in_folders else []
    if labels == "folders" and len(classes) < 2:
        loose = next((f for f, p in zip(files, parts) if len(p) == 1), None)
        why = f"{loose} is not in a class folder" if loose else f"only one class folder ({classes[0]})"
        raise UserError(f"data.labels=folders: {why}; use data.labels=auto or none for unlabelled images")
    return classes if labels != "none" and len(classes) >= 2 else []


class FolderDataModule(ImageFolderDataModule):
    def __init__(
        self,
        root: str,
        labels: str = "auto",
        val_size: float = 0.02,
        channels: int = 3,
        mean: list[float] = (0.485, 0.456, 0.406),
        std: list[float] = (0.229, 0.224, 0.225),
        **kwargs,  # the image-folder module's: img_size, batch_size, num_workers, skip_bad_images, ...
    ):
        if labels not in LABELS:
            raise UserError(f"data.labels={labels!r}: expected one of {', '.join(LABELS)}")
        if channels not in (1, 3):
            raise UserError(f"data.channels={channels}: expected 1 (grayscale) or 3 (RGB)")
        for key, values in (("mean", mean), ("std", std)):
            if len(values) != channels:
                raise UserError(
                    f"data.{key} has {len(values)} values for data.channels={channels}: give one per channel "
                    f"(grayscale: data.mean=[0.449] data.std=[0.226], ImageNet's averaged)"
                )
        self.labels_rule, self.channels, self.share = labels, channels, val_size
        super().__init__(root, mean=mean, std=std, **kwargs)
        if channels == 1 and self.decode == "gpu":
            raise UserError("data.decode=gpu decodes RGB JPEGs; with data.channels=1 use data.decode=fast")

    def find_classes(self, root: str) -> list[str]:
        self.train_root = self.val_root = self.root  # the one folder both splits come from (messages)
        if not self.root.is_dir():
            raise UserError(f"data.root={root}: no such folder ({self.root}); point it at a folder of images")
        self.all_files, others = list_files(self.root)
        if others:
            log.info(not_images(self.root, others))
        if not self.all_files:
            raise UserError(f"data.root={root}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) under {self.root}")
        return folder_labels(self.root, self.all_files, self.labels_rule)

    def setup(self, stage: str | None = None) -> None:
        if self.files:
            return
        n = len(self.all_files)
        kept, held = hold_out(n, self.share, self.split_seed, "data.val_size")
        labels = [self.classes.index(f.relative_to(self.root).parts[0]) if self.classes else -1 for f in self.all_files]
        files = FileList.of(list(zip(self.all_files, labels)))
        train, val = files.subset(kept), files.subset(held)
        self.files = {"train": train, "val": val, "test": val}
        kind = f"{len(self.classes)} classes" if self.classes else "no labels"
        log.info(f"{self.root}: {n} images ({kind}, {self.channels} channel(s)): train {len(train)}, val {len(val)}")

    def as_channels(self, transform):
        """``transform`` on the image in this module's channels."""
        return T.Compose([T.Grayscale(1), transform]) if self.channels == 1 else transform

    def eval_transform(self) -> T.Compose:
        return self.as_channels(super().eval_transform())

    def train_dataloader(self):
        transform = self.as_channels(self.train_transform) if self.train_transform else self.eval_transform()
        return self._loader("train", transform, train=True)

    def split_on(self, split: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """A whole split's evaluation view on ``device``, for the k-NN monitor: decoded once and
        kept on the CPU as uint8 (a folder of 10,000 images at 224 px holds 1.5 GB)."""
        self.setup()
        cached = getattr(self, "_splits", {})
        if split not in cached:
            files, transform = self.files[split], self.eval_transform()
            read = [(self.read(path), label) for path, label in files]
            kept = [(transform(image), label) for image, label in read if image is not None]
            images = torch.stack([image for image, _ in kept])
            cached[split] = images, torch.tensor([label for _, label in kept])
            self._splits = cached
            log.info(f"{self.root}: the {split} split held for the k-NN monitor: {images.numel() / 1e6:.0f} MB")
        images, labels = cached[split]
        return images.to(device), labels.to(device)
