"""``data.decode=gpu``: JPEG batches decoded on the training device (nvJPEG through
``torchvision.io.decode_jpeg``), then cropped and resized there. Loader workers only read the
file's bytes and its header: they draw the crop from the header's size, with torchvision's
RandomResizedCrop rule and the sample's own random stream, so the crops are the CPU path's
distribution. A file the device decoder cannot take as PIL would (not an RGB or grayscale JPEG:
PNG, CMYK; or EXIF-rotated) is decoded and cropped by PIL in the worker as the CPU path does, and
travels already done; a JPEG the device refuses at decode time is decoded by libjpeg on the CPU.

The logic is device-agnostic: on the CPU (``device='cpu'``) the same functions run with
libjpeg, which is how the tests check the batching, the crops and the fallback; a run asks for
``decode=gpu`` only with a GPU (the datamodule refuses it otherwise)."""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

from maelab.data.decode import CropBoxes
from maelab.data.files import BadImage, read_rgb

DEVICE_MODES = ("RGB", "L")  # what nvJPEG decodes to RGB as the CPU path would


@dataclass
class Encoded:
    """One sample as a worker hands it over: the file's bytes and the crop to take from it, or
    (fallback) the finished uint8 crop."""

    data: torch.Tensor  # uint8: the file's bytes (1-D), or the decoded crop (3, size, size)
    box: tuple[int, int, int, int]  # top, left, height, width in the upright image
    flip: bool
    path: str = ""

    @property
    def done(self) -> bool:
        return self.data.dim() == 3


@dataclass
class EncodedBatch:
    samples: list[Encoded]
    labels: torch.Tensor
    bad: list = field(default_factory=list)


def device_decodable(image: Image.Image) -> bool:
    """A JPEG nvJPEG decodes to the pixels PIL would give: baseline colour spaces, upright."""
    orientation = image.getexif().get(0x0112, 1)
    return image.format == "JPEG" and image.mode in DEVICE_MODES and orientation == 1


class CropFromHeader:
    """The training view of ``data.decode=gpu``: a RandomResizedCrop box drawn from the header's
    size (and a flip), the bytes left encoded; PIL's full path for what the device cannot decode."""

    reads_files = True  # ImageFiles hands it the path

    def __init__(self, size: int, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), hflip: bool = True, interpolation="bicubic"):
        self.size, self.box, self.hflip = size, CropBoxes(scale, ratio), hflip  # torchvision's draws
        self.mode = T.InterpolationMode(interpolation)

    def __call__(self, path) -> Encoded:
        from torchvision.io import read_file

        with Image.open(path) as image:
            on_device = device_decodable(image)
            width, height = image.size
        if on_device:
            box = self.box(height, width)
            flip = self.hflip and bool(torch.rand(1) < 0.5)
            return Encoded(read_file(str(path)), box, flip, str(path))
        image = read_rgb(path)  # the CPU path, whole
        top, left, h, w = self.box(image.height, image.width)
        crop = T.functional.resized_crop(image, top, left, h, w, [self.size, self.size], self.mode, antialias=True)
        flip = self.hflip and bool(torch.rand(1) < 0.5)
        tensor = T.functional.pil_to_tensor(crop)
        return Encoded(tensor.flip(-1) if flip else tensor, (top, left, h, w), flip, str(path))


def collate_encoded(samples: list, keep_size: bool = False) -> EncodedBatch:
    """``imagenet.collate`` for encoded samples: ``keep_size`` (training) fills the places of
    unreadable files with copies of readable samples of the batch."""
    good = [s for s in samples if isinstance(s, tuple)]  # (Encoded, label); the rest: imagenet.BadImage
    bad = [s for s in samples if not isinstance(s, tuple)]
    if good and keep_size:
        good += [good[i % len(good)] for i in range(len(bad))]
    labels = torch.tensor([label for _, label in good], dtype=torch.long)
    return EncodedBatch([encoded for encoded, _ in good], labels, bad)


def decode_all(files: list[torch.Tensor], device: torch.device) -> list:
    """The decoded images, one call for all; if that fails, one by one, a file the device refuses
    decoded by libjpeg on the CPU (some valid JPEGs nvJPEG does not take), None for a file neither
    decodes."""
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return decode_jpeg(files, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        images = []
        for data in files:
            for where in dict.fromkeys([device, torch.device("cpu")]):
                try:
                    images.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=where).to(device))
                    break
                except RuntimeError:
                    continue
            else:
                images.append(None)
        return images


def decode_batch(
    batch: EncodedBatch, size: int, device: torch.device, interpolation: str = "bicubic"
) -> torch.Tensor | None:
    """uint8 (N, 3, size, size) on ``device``: the encoded samples decoded together there, each
    cropped to its box, resized (antialiased) and flipped; finished fallbacks put in place. A file
    whose header read but whose data does not decode (truncated) joins ``batch.bad`` and its place
    takes a copy of a good image, as the CPU path's training batches keep their size."""
    out = torch.empty(len(batch.samples), 3, size, size, dtype=torch.uint8, device=device)
    pending = [i for i, s in enumerate(batch.samples) if not s.done]
    good = [i for i, s in enumerate(batch.samples) if s.done]
    for i in good:
        out[i] = batch.samples[i].data.to(device)
    decoded = decode_all([batch.samples[i].data for i in pending], device) if pending else []
    for i, image in zip(pending, decoded):
        if image is None:
            batch.bad.append(BadImage(batch.samples[i].path, "its JPEG data does not decode (a truncated file?)"))
            continue
        top, left, h, w = batch.samples[i].box
        crop = image[None, :, top : top + h, left : left + w].float()
        crop = F.interpolate(crop, size=(size, size), mode=interpolation, antialias=interpolation != "nearest")
        crop = crop.round_().clamp_(0, 255).to(torch.uint8)[0]
        out[i] = crop.flip(-1) if batch.samples[i].flip else crop
        good.append(i)
    if not good:
        return None  # nothing in the batch decodes: named by the caller, as the CPU path's
    failed = [i for i, image in zip(pending, decoded) if image is None]
    for n, i in enumerate(failed):
        if good:  # the copy's label with it
            out[i], batch.labels[i] = out[good[n % len(good)]], batch.labels[good[n % len(good)]]
    return out
