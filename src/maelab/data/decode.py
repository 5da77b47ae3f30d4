"""``data.decode=fast``: the loader workers' crop, decoded and resized with less work.

The official pipeline decodes the whole file with PIL, crops, resizes with PIL's bicubic filter,
then makes a float tensor and normalises it on the CPU. Here, per image:

1. the crop box is drawn from the file's header (its size, turned by its EXIF orientation)
   before any pixel is decoded, by torchvision's ``RandomResizedCrop.get_params`` rule with the
   same draws from the global torch RNG (``CropBoxes``), so the crops (and, with ``sample_rng``,
   each sample's crop) are those of ``data.decode=pil``;
2. a JPEG is decoded by libjpeg-turbo only where the crop is (``jpeg_crop``: the crop's rows and
   columns, nothing below its last row; for an EXIF-turned file the same pixels of the stored
   image, turned after), bit for bit the pixels a whole decode gives there. Where the crop spans
   at least ``r * size`` pixels on each side it is decoded at 1/r (r = 2, 4 or 8: libjpeg's
   DCT-domain scaling, as PIL's ``draft``), so it is still never smaller than the output; its
   edges then fall on the stored image's 1/r grid, at most r/2 full-size pixels from the drawn
   box's (``reduced_box``). Without the compiled decoder (``jpeg_crop.missing``), and for a JPEG
   that does not end with its end marker, a plain upright RGB JPEG is decoded whole by
   torchvision's ``decode_jpeg``, and at 1/r by PIL; CMYK JPEGs and any other file are read as
   ``files.read_rgb`` reads them;
3. the crop is resized by torch's antialiased uint8 kernel (PIL's filter, vectorised: a quarter
   of PIL's time) and flipped as a tensor; the batch stays uint8, normalised on the device.

A transform here reads the file itself (``reads_files``): ``ImageFiles`` hands it the path, and
``ImageShards`` the file's bytes, and each turns its OSError / ValueError into a skipped or
reported file. Given a PIL image instead (a preview, or a folder's grayscale view) it crops that
image the same way.
"""

import io
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from maelab.data import jpeg_crop
from maelab.data.files import read_rgb

ORIENTATION = 0x0112  # EXIF tag; 5 to 8 turn the image by 90 degrees
REDUCTIONS = (8, 4, 2)  # libjpeg's DCT scales 1/8, 1/4, 1/2


def reduction(box: tuple[int, int, int, int], size: int, on_grid: bool = False) -> int:
    """The largest r in 8, 4, 2 that leaves the box (top, left, height, width) at least ``size``
    pixels on each side when the file is decoded at 1/r; 1 when none does. ``on_grid`` (the
    evaluation view, whose figures are compared across runs and decode paths): only an r on whose
    grid the box's edges fall, so nothing is rounded (``reduced_box``)."""
    top, left, height, width = box
    edges = (top, left, top + height, left + width)
    fits = lambda r: min(height, width) >= r * size and not (on_grid and any(e % r for e in edges))  # noqa: E731
    return next((r for r in REDUCTIONS if fits(r)), 1)


def reduced_box(box: tuple[int, int, int, int], r: int) -> tuple[int, int, int, int]:
    """The box (top, left, height, width) in the pixels of libjpeg's 1/r image, each edge on the
    nearest pixel edge: at most r/2 full-size pixels off, on a box at least r * size pixels wide,
    so the crop is the drawn one to a fraction of a percent of its side, and a whole number of
    pixels, which torch's resize needs. (PIL's resize takes fractional edges, at four times the
    cost.) Half-up rounding of both edges keeps the box at least ``size`` pixels."""
    top, left, height, width = box
    first_row, first_column = math.floor(top / r + 0.5), math.floor(left / r + 0.5)
    end_row, end_column = math.floor((top + height) / r + 0.5), math.floor((left + width) / r + 0.5)
    return first_row, first_column, end_row - first_row, end_column - first_column


def chw(im: Image.Image) -> torch.Tensor:
    """A PIL image as a uint8 (C, H, W) tensor (a view of one copy of its pixels)."""
    pixels = torch.from_numpy(np.array(im))
    return pixels[None] if pixels.ndim == 2 else pixels.permute(2, 0, 1)


def read_pixels(source: Path | bytes, size: int, choose_box, on_grid: bool = False):
    """(pixels, box, full size): the file's upright RGB pixels as a uint8 (3, H, W) tensor, decoded
    at the lowest resolution the box allows and, for a JPEG, only where the box is, the box (top,
    left, height, width) in those pixels, and the upright (height, width) of the file.
    ``choose_box(height, width)`` draws the box in full-size upright pixels before any pixel is
    decoded; ``on_grid`` is ``reduction``'s. Raises OSError for a file that cannot be decoded (a
    truncated one included), as ``files.read_rgb`` does."""
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    if jpeg_crop.available() and jpeg_crop.is_jpeg(data) and jpeg_crop.complete(data):
        cropped = crop_decoded(data, size, choose_box, on_grid)
        if cropped is not None:
            return cropped
    with Image.open(io.BytesIO(data)) as im:
        orientation = im.getexif().get(ORIENTATION, 1)
        height, width = (im.width, im.height) if orientation in (5, 6, 7, 8) else (im.height, im.width)
        box = choose_box(height, width)
        jpeg = im.format == "JPEG" and im.mode in ("L", "RGB", "CMYK")  # a JPEG's modes; read_rgb converts them
        r = reduction(box, size, on_grid) if jpeg else 1
        if r > 1:
            stored_width = im.width
            im.draft("RGB", (im.width // r, im.height // r))  # libjpeg's 1/r: pixel k holds the full k*r..k*r+r-1
            r = round(stored_width / im.width)  # the scale libjpeg took
            top, left, h, w = reduced_box(stored_box(box, orientation, height, width), r)
            pixels = turned(chw(im.convert("RGB"))[:, top : top + h, left : left + w], orientation)
            return pixels, (0, 0, *pixels.shape[1:]), (height, width)
        if jpeg and im.mode == "RGB" and orientation == 1:
            return decode_rgb_jpeg(data), box, (height, width)
    return chw(read_rgb(io.BytesIO(data))), box, (height, width)  # any other file, as every path reads it


def crop_decoded(data: bytes, size: int, choose_box, on_grid: bool = False):
    """``read_pixels`` of a JPEG that libjpeg decodes to RGB, by the crop decoder: the box's pixels
    only, turned upright as its EXIF orientation says. None, before any box is drawn, for a file
    left to PIL: CMYK, an orientation PIL might read otherwise, more pixels than PIL opens
    (``Image.MAX_IMAGE_PIXELS``: PIL's decompression-bomb error), or a header libjpeg refuses (PIL
    then names the fault)."""
    try:
        header = jpeg_crop.header(data)
    except OSError:
        return None
    limit = Image.MAX_IMAGE_PIXELS
    if not header.rgb or header.orientation < 0 or (limit and header.height * header.width > 2 * limit):
        return None
    orientation = header.orientation
    height, width = (header.width, header.height) if orientation in (5, 6, 7, 8) else (header.height, header.width)
    box = choose_box(height, width)
    r = reduction(box, size, on_grid)
    stored = stored_box(box, orientation, height, width)
    pixels = turned(jpeg_crop.decode(data, reduced_box(stored, r) if r > 1 else stored, r), orientation)
    return pixels, (0, 0, *pixels.shape[1:]), (height, width)


# How PIL's exif_transpose turns a JPEG's stored pixels upright, for EXIF orientations 2 to 8:
# (transposed, then rows flipped, columns flipped). Any other value leaves them as they are.
TURNS = {2: (0, 0, 1), 3: (0, 1, 1), 4: (0, 1, 0), 5: (1, 0, 0), 6: (1, 0, 1), 7: (1, 1, 1), 8: (1, 1, 0)}


def stored_box(box: tuple[int, int, int, int], orientation: int, height: int, width: int) -> tuple:
    """The box (top, left, height, width) of the upright height x width image in the stored pixels
    that EXIF ``orientation`` turns upright: the same pixels, so a crop turned (``turned``) is the
    upright image's crop, and a reduced decode's grid is the stored image's."""
    top, left, h, w = box
    transposed, flip_rows, flip_columns = TURNS.get(orientation, (0, 0, 0))
    top, left = (height - top - h if flip_rows else top), (width - left - w if flip_columns else left)
    return (left, top, w, h) if transposed else (top, left, h, w)


def turned(pixels: torch.Tensor, orientation: int) -> torch.Tensor:
    """Stored (C, H, W) pixels turned upright as PIL's exif_transpose turns them."""
    transposed, flip_rows, flip_columns = TURNS.get(orientation, (0, 0, 0))
    pixels = pixels.transpose(-1, -2) if transposed else pixels
    dims = [dim for dim, flip in ((-2, flip_rows), (-1, flip_columns)) if flip]
    return pixels.flip(dims) if dims else pixels


def decode_rgb_jpeg(data: bytes) -> torch.Tensor:
    """A plain RGB JPEG straight into a uint8 (3, H, W) tensor (libjpeg-turbo, as PIL's)."""
    try:
        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError as e:  # torchvision's word for a truncated or corrupt file
        raise OSError(str(e).rsplit(", ", 1)[-1]) from None


def decoded(source, size: int, choose_box, on_grid: bool = False):
    """``read_pixels`` for a file's path or bytes (a shard's); an image already decoded (PIL) is
    only boxed."""
    if isinstance(source, Image.Image):
        pixels = chw(source)
        return pixels, choose_box(*pixels.shape[1:]), tuple(pixels.shape[1:])
    return read_pixels(source, size, choose_box, on_grid)


def resized_crop(pixels: torch.Tensor, box, out: tuple[int, int], interpolation: str) -> torch.Tensor:
    """The box of the pixels resized to uint8 (C, *out) by torch's antialiased uint8 kernel (PIL's
    filter, vectorised for channels-last pixels; nearest has no antialiasing)."""
    top, left, h, w = box
    crop = pixels[None, :, top : top + h, left : left + w]
    if crop.shape[-2:] != out:
        crop = crop.contiguous(memory_format=torch.channels_last)  # the layout of the vectorised uint8 kernel
        crop = F.interpolate(crop, size=out, mode=interpolation, antialias=interpolation != "nearest")
    return crop[0]


class CropBoxes:
    """torchvision's ``RandomResizedCrop.get_params`` for an image of a given size, draw for draw
    from the global torch RNG (a test holds the two equal), without the tensors get_params makes
    on each call: the ratio's logarithm (float32, as there) is taken once. Half the time per box."""

    def __init__(self, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.log_ratio = tuple(torch.log(torch.tensor(self.ratio, device="cpu")).tolist())
        self.draw = torch.empty(1, device="cpu")  # the CPU stream's draws, under any default device

    def __call__(self, height: int, width: int) -> tuple[int, int, int, int]:
        area = height * width
        for _ in range(10):
            target_area = area * self.draw.uniform_(*self.scale).item()
            aspect_ratio = torch.exp(self.draw.uniform_(*self.log_ratio)).item()
            w = round(math.sqrt(target_area * aspect_ratio))
            h = round(math.sqrt(target_area / aspect_ratio))
            if 0 < w <= width and 0 < h <= height:
                top = torch.randint(0, height - h + 1, size=(1,), device="cpu").item()
                return top, torch.randint(0, width - w + 1, size=(1,), device="cpu").item(), h, w
        if width / height < min(self.ratio):  # ten misses: torchvision's central crop
            w, h = width, round(width / min(self.ratio))
        elif width / height > max(self.ratio):
            w, h = round(height * max(self.ratio)), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w


class FastRandomResizedCropFlip:
    """RandomResizedCrop(size, scale, ratio) + RandomHorizontalFlip from a file -> uint8
    (3, size, size): the boxes and flips of torchvision's transforms, drawn in their order from
    the global torch RNG."""

    reads_files = True
    torch_draws_only = True  # sample_rng seeds torch's stream alone

    def __init__(self, size: int, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), hflip: bool = True, interpolation="bicubic"):
        self.size, self.box = size, CropBoxes(scale, ratio)
        self.hflip, self.interpolation = hflip, interpolation

    def __call__(self, source) -> torch.Tensor:
        pixels, box, _ = decoded(source, self.size, self.box)
        image = resized_crop(pixels, box, (self.size, self.size), self.interpolation)
        if self.hflip and torch.rand(1) < 0.5:  # RandomHorizontalFlip's draw
            image = image.flip(-1)
        return image.contiguous()


class FastResizeCenterCrop:
    """Resize(resize) + CenterCrop(size) (the evaluation view) from a file -> uint8 (3, size,
    size), decoded at 1/r where the short side keeps ``resize`` pixels and r divides both sides,
    so it is the full-size view, nothing rounded."""

    reads_files = True

    def __init__(self, size: int, resize: int, interpolation: str = "bicubic"):
        self.size, self.resize, self.interpolation = size, resize, interpolation

    def __call__(self, source) -> torch.Tensor:
        whole = lambda height, width: (0, 0, height, width)  # noqa: E731
        pixels, box, (height, width) = decoded(source, self.resize, whole, on_grid=True)
        long = int(self.resize * max(height, width) / min(height, width))  # torchvision's Resize(int)
        new_h, new_w = (self.resize, long) if height <= width else (long, self.resize)
        image = resized_crop(pixels, box, (new_h, new_w), self.interpolation)
        top, left = int(round((new_h - self.size) / 2.0)), int(round((new_w - self.size) / 2.0))
        return image[:, top : top + self.size, left : left + self.size].contiguous()
