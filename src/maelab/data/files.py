"""Image files on disk: listing an ImageFolder tree and reading any file as RGB."""

from pathlib import Path

from PIL import Image, ImageOps

from maelab.errors import UserError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff"}


def class_folders(split_dir: Path) -> list[str]:
    """Sorted names of the class folders (ImageFolder's label order)."""
    return sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))


def list_image_folder(split_dir: Path, classes: list[str] | None = None) -> tuple[list[str], list[tuple[Path, int]]]:
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
    return found, files


def read_rgb(path: Path) -> Image.Image:
    """Any image file as an upright RGB image: grayscale, CMYK, palette and alpha images are
    converted, EXIF orientation applied, and the format read from the content, not the name
    (ImageNet holds PNG and CMYK files named .JPEG). Raises OSError or ValueError for a file
    PIL cannot decode, truncated JPEGs included."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("P", "PA", "LA"):
            im = im.convert("RGBA")  # palette transparency is resolved before dropping alpha
        return im.convert("RGB")
