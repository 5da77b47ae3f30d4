"""``data.decode=fast``: the loader workers' crop, decoded and resized with less work.

The official pipeline decodes the whole file with PIL, crops, resizes with PIL's bicubic filter,
then makes a float tensor and normalises it on the CPU. Here, per image:

1. the crop box is drawn from the file's header (its size, turned by its EXIF orientation)
   before any pixel is decoded, with torchvision's own ``RandomResizedCrop.get_params`` and the
   same draws from the global torch RNG, so the crops (and, with ``sample_rng``, each sample's
   crop) are exactly those of ``data.decode=pil``;
2. a JPEG whose crop spans at least ``r * size`` pixels on each side is decoded at 1/r
   (r = 2, 4 or 8: libjpeg's DCT-domain scaling, PIL's ``draft``), so the crop is still never
   smaller than the full-size path's on the output; a plain RGB JPEG otherwise goes through
   torchvision's ``decode_jpeg`` straight into a uint8 tensor (PIL's decoder and its 4-byte
   pixels cost a quarter more); any other file or mode is read as ``files.read_rgb`` reads it;
3. the crop is resized by torch's uint8 antialiased kernel (PIL's filter, vectorised: a quarter
   of PIL's time), or, decoded at 1/r, by PIL's resize, which takes the box's fractional edges
   as they are; it is flipped as a tensor; the batch stays uint8, normalised on the device.

A transform here reads the file itself (``reads_files``): ``ImageFiles`` hands it the path and
turns its OSError / ValueError into a skipped or reported file. Given a PIL image instead (a
preview, or a folder's grayscale view) it crops that image the same way.
"""

import io
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torchvision import transforms as T
from torchvision.io import ImageReadMode, decode_jpeg

from maelab.data.files import read_rgb

ORIENTATION = 0x0112  # EXIF tag; 5 to 8 turn the image by 90 degrees
REDUCTIONS = (8, 4, 2)  # libjpeg's DCT scales 1/8, 1/4, 1/2


def reduction(height: float, width: float, size: int) -> int:
    """The largest r in 8, 4, 2 that leaves a height x width crop at least ``size`` pixels on each
    side when the file is decoded at 1/r; 1 when none does."""
    return next((r for r in REDUCTIONS if min(height, width) >= r * size), 1)


PIL_FILTERS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


def chw(im: Image.Image) -> torch.Tensor:
    """A PIL image as a uint8 (C, H, W) tensor (a view of one copy of its pixels)."""
    pixels = torch.from_numpy(np.array(im))
    return pixels[None] if pixels.ndim == 2 else pixels.permute(2, 0, 1)


def read_pixels(path: Path, size: int, choose_box):
    """(pixels, box, full size): the file's upright RGB pixels, decoded at the lowest resolution
    the box allows, the box (top, left, height, width) in their coordinates, and the upright
    (height, width) of the file. ``choose_box(height, width)`` draws the box in full-size pixels
    before any pixel is decoded. The pixels are a uint8 (3, H, W) tensor, or, decoded at 1/r, a PIL
    image and a box in fractions of its pixels. Raises OSError for a file that cannot be decoded
    (a truncated one included), as ``files.read_rgb`` does."""
    data = Path(path).read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        orientation = im.getexif().get(ORIENTATION, 1)
        height, width = (im.width, im.height) if orientation in (5, 6, 7, 8) else (im.height, im.width)
        box = choose_box(height, width)
        jpeg = im.format == "JPEG" and im.mode in ("L", "RGB", "CMYK")  # a JPEG's modes; read_rgb converts them
        r = reduction(box[2], box[3], size) if jpeg else 1
        if r > 1:
            im.draft("RGB", (im.width // r, im.height // r))  # libjpeg's 1/r: pixel k holds the full k*r..k*r+r-1
            image = (ImageOps.exif_transpose(im) if orientation != 1 else im).convert("RGB")
            r = round(width / image.width)  # the scale libjpeg took
            return image, tuple(x / r for x in box), (height, width)
        if jpeg and im.mode == "RGB" and orientation == 1:
            return decode_rgb_jpeg(data), box, (height, width)
    return chw(read_rgb(path)), box, (height, width)  # any other file, as every path reads it


def decode_rgb_jpeg(data: bytes) -> torch.Tensor:
    """A plain RGB JPEG straight into a uint8 (3, H, W) tensor (libjpeg-turbo, as PIL's)."""
    try:
        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError as e:  # torchvision's word for a truncated or corrupt file
        raise OSError(str(e).rsplit(", ", 1)[-1]) from None


def decoded(source, size: int, choose_box):
    """``read_pixels`` for a path; an image already decoded (PIL) is only boxed."""
    if isinstance(source, Image.Image):
        pixels = chw(source)
        return pixels, choose_box(*pixels.shape[1:]), tuple(pixels.shape[1:])
    return read_pixels(source, size, choose_box)


def resized_crop(pixels, box, out: tuple[int, int], interpolation: str) -> torch.Tensor:
    """The box of the pixels resized to uint8 (C, *out). A tensor (integer box) goes through
    torch's antialiased uint8 kernel (PIL's filter, vectorised; nearest has none); a reduced
    decode's PIL image through PIL's resize, which takes the fractional box as it is."""
    top, left, h, w = box
    if isinstance(pixels, Image.Image):
        return chw(pixels.resize(out[::-1], PIL_FILTERS[interpolation], box=(left, top, left + w, top + h)))
    crop = pixels[None, :, top : top + h, left : left + w]
    if crop.shape[-2:] != out:
        crop = crop.contiguous(memory_format=torch.channels_last)  # the layout of the vectorised uint8 kernel
        crop = F.interpolate(crop, size=out, mode=interpolation, antialias=interpolation != "nearest")
    return crop[0]


class FastRandomResizedCropFlip:
    """RandomResizedCrop(size, scale, ratio) + RandomHorizontalFlip from a file -> uint8
    (3, size, size): the boxes and flips of torchvision's transforms, drawn in their order from
    the global torch RNG."""

    reads_files = True

    def __init__(self, size: int, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), hflip: bool = True, interpolation="bicubic"):
        self.size, self.scale, self.ratio = size, tuple(scale), tuple(ratio)
        self.hflip, self.interpolation = hflip, interpolation

    def box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """torchvision's rule and draws (it reads only the size of what it is given)."""
        return T.RandomResizedCrop.get_params(torch.empty(0, height, width), list(self.scale), list(self.ratio))

    def __call__(self, source) -> torch.Tensor:
        pixels, box, _ = decoded(source, self.size, self.box)
        image = resized_crop(pixels, box, (self.size, self.size), self.interpolation)
        if self.hflip and torch.rand(1) < 0.5:  # RandomHorizontalFlip's draw
            image = image.flip(-1)
        return image.contiguous()


class FastResizeCenterCrop:
    """Resize(resize) + CenterCrop(size) (the evaluation view) from a file -> uint8 (3, size,
    size), decoded at 1/r where the short side keeps ``resize`` pixels."""

    reads_files = True

    def __init__(self, size: int, resize: int, interpolation: str = "bicubic"):
        self.size, self.resize, self.interpolation = size, resize, interpolation

    def __call__(self, source) -> torch.Tensor:
        pixels, box, (height, width) = decoded(source, self.resize, lambda height, width: (0, 0, height, width))
        long = int(self.resize * max(height, width) / min(height, width))  # torchvision's Resize(int)
        new_h, new_w = (self.resize, long) if height <= width else (long, self.resize)
        image = resized_crop(pixels, box, (new_h, new_w), self.interpolation)
        top, left = int(round((new_h - self.size) / 2.0)), int(round((new_w - self.size) / 2.0))
        return image[:, top : top + self.size, left : left + self.size].contiguous()
