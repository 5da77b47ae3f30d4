"""Image files on disk: listing an ImageFolder tree and reading any file as RGB."""

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from maelab.errors import UserError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff"}


@dataclass
class BadImage:
    """A file a loader worker could not read, handed to the main process to name or skip."""

    path: str
    reason: str


def class_folders(split_dir: Path) -> list[str]:
    """Sorted names of the class folders (ImageFolder's label order)."""
    return sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))


class FileList:
    """(path, label) pairs held in two numpy arrays. DataLoader workers are forked copies of the
    main process: a list of 1.28M tuples is millions of Python objects whose reference counts
    every worker touches on access, so copy-on-write duplicates it in each worker, epoch after
    epoch. Two arrays are two objects, shared as they are."""

    def __init__(self, paths: np.ndarray, labels: np.ndarray):
        self.paths, self.labels = paths, labels

    @classmethod
    def of(cls, pairs: list[tuple[Path, int]]) -> "FileList":
        paths = np.array([os.fsencode(p) for p, _ in pairs], dtype=np.bytes_)
        return cls(paths, np.array([label for _, label in pairs], dtype=np.int64))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Path, int]:
        return Path(os.fsdecode(self.paths[i])), int(self.labels[i])

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def subset(self, index: list[int]) -> "FileList":
        return FileList(self.paths[index], self.labels[index])


def list_image_folder(split_dir: Path, classes: list[str] | None = None) -> tuple[list[str], FileList]:
    """Class names and (file, label) pairs in a stable order. ``classes`` (the train split's)
    fixes the labels; a split with other class folders is refused, naming the difference."""
    found = class_folders(split_dir)
    if classes is not None and found != classes:
        missing, extra = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
        raise UserError(
            f"{split_dir}: its class folders differ from the train split's ({len(found)} here, {len(classes)} there; "
            f"missing here: {missing[:5]}, not in train: {extra[:5]}); both splits need the same <class>/ folders"
        )
    files = []
    for label, name in enumerate(found):
        for path in sorted((split_dir / name).iterdir()):
            if path.name.startswith("."):
                continue
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                raise UserError(
                    f"{path}: not an image file; an image folder holds only "
                    f"{', '.join(sorted(IMAGE_SUFFIXES))} files under <split>/<class>/"
                )
            files.append((path, label))
    return found, FileList.of(files)


def eight_bit(im: Image.Image) -> Image.Image:
    """A 16- or 32-bit integer or float single-channel image as 8-bit grayscale, scaled, not
    clipped (PIL's own conversion clips: a 16-bit scan would come out white). 16-bit values
    (medical, astronomy and microscopy files) map 0-65535 to 0-255; floats in [0, 1] map to 0-255."""
    values = np.asarray(im, dtype=np.float64)
    if im.mode.startswith("I;16"):
        top = 65535.0
    elif im.mode == "F" and values.max() <= 1.0:
        top = 1.0
    else:  # 32-bit integers or floats: 16-bit data unless the values fit 8 bits
        top = 255.0 if values.max() <= 255 else 65535.0
    return Image.fromarray(np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8), mode="L")


def read_rgb(path: Path) -> Image.Image:
    """Any image file as an upright RGB image: grayscale (8 or 16 bit), CMYK, palette and alpha
    images are converted, EXIF orientation applied, and the format read from the content, not the name
    (ImageNet holds PNG and CMYK files named .JPEG). Raises OSError or ValueError for a file
    PIL cannot decode, truncated JPEGs included."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode.startswith(("I", "F")):
            im = eight_bit(im)
        if im.mode in ("P", "PA", "LA"):
            im = im.convert("RGBA")  # palette transparency is resolved before dropping alpha
        return im.convert("RGB")
