"""CIFAR-10 held in device memory.

``root`` may hold torchvision's ``cifar-10-batches-py`` or an image-folder layout
``train/<class>/*`` and ``test/<class>/*`` (the JPEG copy under ``../shared/datasets``); with
neither and ``download=true`` torchvision downloads the original. Image folders are decoded once
into a uint8 tensor cached on disk, keyed by the folder's listing, so later starts take a second.
"""

import hashlib
import logging
import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from maelab.atomic import write_atomically
from maelab.data.files import list_image_folder, read_rgb
from maelab.data.in_memory import InMemoryImageDataModule
from maelab.errors import UserError

log = logging.getLogger(__name__)

CIFAR_SIZE = 32
BATCHES_DIR = "cifar-10-batches-py"
BATCH_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


class DatasetNotFound(UserError):
    pass


def read_cifar_batches(batches_dir: Path, split: str) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """torchvision's pickled format: (class names, uint8 (N, 3, 32, 32), int64 (N,))."""
    arrays, labels = [], []
    for name in BATCH_FILES[split]:
        path = batches_dir / name
        if not path.is_file():
            raise UserError(f"{path}: missing; {batches_dir} should hold {', '.join(BATCH_FILES[split])}")
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        arrays.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, CIFAR_SIZE, CIFAR_SIZE))
        labels.extend(entry["labels"])
    with open(batches_dir / "batches.meta", "rb") as f:
        classes = pickle.load(f, encoding="latin1")["label_names"]
    return classes, torch.from_numpy(np.concatenate(arrays)), torch.tensor(labels, dtype=torch.long)


def decode_image(path: Path) -> np.ndarray:
    try:
        array = np.asarray(read_rgb(path))
    except Exception as e:  # PIL raises many types for broken files
        raise UserError(f"{path}: cannot be read as an image ({e})") from e
    if array.shape != (CIFAR_SIZE, CIFAR_SIZE, 3):
        raise UserError(f"{path}: is {array.shape[1]}x{array.shape[0]} px; CIFAR-10 images are 32x32")
    return array


class CIFAR10DataModule(InMemoryImageDataModule):
    def __init__(self, root: str, download: bool = True, cache_dir: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.root = Path(root).expanduser().absolute()
        self.download = download
        self.cache_dir = Path(cache_dir).expanduser().absolute() if cache_dir else self.root / ".maelab_cache"
        self.classes: list[str] = []

    # --- finding the data -------------------------------------------------------------------
    def _layout(self) -> str | None:
        if (self.root / BATCHES_DIR).is_dir():
            return "batches"
        if (self.root / "train").is_dir() and (self.root / "test").is_dir():
            return "folder"
        return None

    def prepare_data(self) -> None:
        """Runs on one process: download if needed, and build the decode cache."""
        if self._layout() is None and self.download:
            from torchvision.datasets import CIFAR10

            try:
                for train in (True, False):
                    CIFAR10(str(self.root), train=train, download=True)
            except Exception as e:
                raise self._not_found(f"the download failed: {e}") from e
        if self._layout() is None:
            raise self._not_found("download is off (data.download=false)")
        if self._layout() == "folder":
            for split in ("train", "test"):
                self._load_folder(split)

    def _not_found(self, why: str) -> DatasetNotFound:
        return DatasetNotFound(
            f"CIFAR-10 not found: looked for {self.root / BATCHES_DIR} (torchvision's format) and for "
            f"{self.root}/train/<class>/ + {self.root}/test/<class>/ (an image folder), and {why}. "
            "Point data.root (or the MAELAB_CIFAR10 environment variable) at a folder holding one of "
            "these, e.g. `tar xzf cifar10-jpeg.tar.gz -C data` then data.root=data/cifar10-jpeg."
        )

    # --- reading a split --------------------------------------------------------------------
    def load_split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        layout = self._layout()
        if layout is None:
            raise self._not_found("nothing was downloaded")
        if layout == "batches":
            self.classes, images, labels = read_cifar_batches(self.root / BATCHES_DIR, split)
            return images, labels
        return self._load_folder(split)

    def _load_folder(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        classes, files = list_image_folder(self.root / split)
        if self.classes and classes != self.classes:
            raise UserError(f"{self.root / split}: classes {classes} differ from the train split's {self.classes}")
        if len(classes) != self.num_classes:
            raise UserError(
                f"{self.root / split}: found {len(classes)} class folders, data.num_classes is {self.num_classes}"
            )
        self.classes = classes
        fingerprint = hashlib.sha1()  # the cache is valid while names, sizes and times are unchanged
        for path, _ in files:
            st = path.stat()
            fingerprint.update(f"{path.relative_to(self.root)} {st.st_size} {st.st_mtime_ns}\n".encode())
        cache = self.cache_dir / f"cifar10_{split}_{fingerprint.hexdigest()[:16]}.pt"
        if cache.exists():
            data = torch.load(cache, weights_only=True)
            return data["images"], data["labels"]

        log.info("decoding %d images from %s (once; cached in %s)", len(files), self.root / split, cache)
        with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
            arrays = list(pool.map(decode_image, (p for p, _ in files), chunksize=256))
        images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
        labels = torch.tensor([label for _, label in files], dtype=torch.long)
        self._write_cache(cache, {"images": images, "labels": labels, "classes": classes})
        return images, labels

    def _write_cache(self, cache: Path, data: dict) -> None:
        try:
            write_atomically(cache, lambda f: torch.save(data, f))  # a crash never leaves a half-written cache
            for stale in cache.parent.glob(cache.name.rsplit("_", 1)[0] + "_*.pt"):
                if stale != cache:
                    stale.unlink()  # the cache of an earlier state of the folder
        except OSError as e:
            log.warning(
                "could not write the decode cache %s (%s); set data.cache_dir to a writable folder "
                "to start faster next time",
                cache,
                e,
            )
