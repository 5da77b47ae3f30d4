"""Batched image transforms that run on the training device.

Images arrive as uint8 ``(N, C, H, W)`` batches (a gather from a device-resident dataset, or a
DataLoader batch) and are augmented per image in a handful of kernels, so no CPU worker sits in
the training loop. ``RandomResizedCropFlip`` draws its boxes exactly as torchvision's
``RandomResizedCrop.get_params`` does (area and log-aspect sampling, ten attempts, then a
center-crop fallback), but for a whole batch at once.
"""

import math

import torch
import torch.nn.functional as F


def normalize(imgs: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 (N, C, H, W) in [0, 255] -> float32, channel-normalised."""
    if imgs.dtype != torch.uint8:
        raise TypeError(f"expected a uint8 image batch, got {imgs.dtype}")
    m = torch.tensor(mean, device=imgs.device).view(1, -1, 1, 1) * 255.0
    s = torch.tensor(std, device=imgs.device).view(1, -1, 1, 1) * 255.0
    return (imgs.float() - m) / s


def model_input(images: torch.Tensor, mean: list[float], std: list[float], size: int, augment=None) -> torch.Tensor:
    """A batch as the model takes it: uint8 (N, C, H, W) on the device -> normalised float at
    ``size``, augmented by ``augment`` (a batched device transform) when given. Float batches
    come from a DataLoader transform that already normalised them, and pass through."""
    if images.dtype != torch.uint8:
        return images
    if len(mean) == 1 and images.shape[1] == 3:  # RGB images for a grayscale model: PIL's "L" luma
        from torchvision.transforms.functional import rgb_to_grayscale

        images = rgb_to_grayscale(images)
    x = normalize(images, mean, std)
    if augment is not None:
        return augment(x)  # crops to size
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True)
    return x


def denormalize(imgs: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """Inverse of ``normalize``, to [0, 1] floats (clamped only for display)."""
    m = torch.tensor(mean, device=imgs.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=imgs.device).view(1, -1, 1, 1)
    return imgs * s + m


def resized_crops(
    imgs: torch.Tensor,
    boxes: torch.Tensor,
    size: int,
    flip: torch.Tensor | None = None,
    interpolation: str = "bilinear",
) -> torch.Tensor:
    """Crop each image to its box and resize it to size x size in one ``grid_sample``.
    imgs: (N, C, H, W) float; boxes: (N, 4) as (top, left, height, width) in pixels;
    flip: (N,) bool, mirror horizontally."""
    N, C, H, W = imgs.shape
    top, left, h, w = boxes.to(imgs.dtype).unbind(1)
    sx, sy = w / W, h / H
    if flip is not None:
        sx = torch.where(flip, -sx, sx)
    theta = torch.zeros(N, 2, 3, device=imgs.device, dtype=imgs.dtype)
    theta[:, 0, 0] = sx
    theta[:, 0, 2] = (2 * left + w) / W - 1  # box centre in [-1, 1] coordinates
    theta[:, 1, 1] = sy
    theta[:, 1, 2] = (2 * top + h) / H - 1
    grid = F.affine_grid(theta, [N, C, size, size], align_corners=False)
    return F.grid_sample(imgs, grid, mode=interpolation, padding_mode="border", align_corners=False)


class RandomResizedCropFlip:
    """RandomResizedCrop(size, scale, ratio) + RandomHorizontalFlip(0.5), per image, batched."""

    def __init__(
        self,
        size: int,
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: bool = True,
        interpolation: str = "bicubic",
        attempts: int = 10,
    ):
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"crop scale must satisfy 0 < min <= max <= 1, got {list(scale)}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"crop ratio must satisfy 0 < min <= max, got {list(ratio)}")
        if interpolation not in ("bilinear", "bicubic", "nearest"):
            raise ValueError(f"interpolation must be bilinear, bicubic or nearest, got {interpolation!r}")
        self.size, self.scale, self.ratio = size, tuple(scale), tuple(ratio)
        self.hflip, self.interpolation, self.attempts = hflip, interpolation, attempts

    def sample_boxes(self, n: int, height: int, width: int, device=None, generator=None) -> torch.Tensor:
        """(n, 4) integer boxes (top, left, height, width), torchvision's sampling rule."""

        def rand(*shape):
            return torch.rand(*shape, device=device, generator=generator)

        area = height * width
        target_area = area * (self.scale[0] + (self.scale[1] - self.scale[0]) * rand(n, self.attempts))
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = torch.exp(log_lo + (log_hi - log_lo) * rand(n, self.attempts))
        w = torch.round(torch.sqrt(target_area * aspect))
        h = torch.round(torch.sqrt(target_area / aspect))
        valid = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first = valid.int().argmax(dim=1, keepdim=True)  # first valid attempt per image
        w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
        top = torch.floor(rand(n) * (height - h + 1))
        left = torch.floor(rand(n) * (width - w + 1))

        # fallback when no attempt fits: the largest center crop within the ratio range
        in_ratio = width / height
        fw, fh = float(width), float(height)
        if in_ratio < self.ratio[0]:
            fh = float(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            fw = float(round(height * self.ratio[1]))
        ok = valid.any(dim=1)
        h = torch.where(ok, h, torch.full_like(h, fh))
        w = torch.where(ok, w, torch.full_like(w, fw))
        top = torch.where(ok, top, torch.full_like(top, (height - fh) // 2))
        left = torch.where(ok, left, torch.full_like(left, (width - fw) // 2))
        return torch.stack([top, left, h, w], dim=1)

    def per_image(self):
        """The same augmentation for one PIL image at a time, in DataLoader workers (images of
        varied sizes, such as ImageNet's): torchvision's RandomResizedCrop + flip -> uint8
        (3, size, size); normalisation then happens on the device."""
        from torchvision import transforms as T

        mode = T.InterpolationMode(self.interpolation)  # bicubic, bilinear or nearest
        steps = [T.RandomResizedCrop(self.size, self.scale, self.ratio, mode)]
        if self.hflip:
            steps.append(T.RandomHorizontalFlip())
        return T.Compose([*steps, T.PILToTensor()])

    def per_file(self):
        """``per_image()``'s crops and flips, the same draws, from the file (``data.decode=fast``):
        the box is drawn from the header, then only what it needs is decoded (``data/decode.py``)."""
        from maelab.data.decode import FastRandomResizedCropFlip

        return FastRandomResizedCropFlip(self.size, self.scale, self.ratio, self.hflip, self.interpolation)

    def per_device(self):
        """``data.decode=gpu``: the same draws from each file's header in the workers, the JPEG
        decoded, cropped and resized on the device (``data/gpu_decode.py``)."""
        from maelab.data.gpu_decode import CropFromHeader

        return CropFromHeader(self.size, self.scale, self.ratio, self.hflip, self.interpolation)

    def __call__(self, imgs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """imgs: (N, C, H, W) float -> (N, C, size, size)."""
        N, _, H, W = imgs.shape
        boxes = self.sample_boxes(N, H, W, device=imgs.device, generator=generator)
        flip = None
        if self.hflip:
            flip = torch.rand(N, device=imgs.device, generator=generator) < 0.5
        return resized_crops(imgs, boxes, self.size, flip, self.interpolation)


class PadCropFlip:
    """The standard CIFAR augmentation, batched: pad by ``padding`` pixels (reflect), crop a
    random size x size window, mirror half of the images. One gather for the whole batch: every
    image's rows and columns are indexed at once, a flip being columns read backwards."""

    def __init__(self, size: int, padding: int = 4, hflip: bool = True, padding_mode: str = "reflect"):
        if padding_mode not in ("reflect", "replicate"):  # a constant would differ between the device
            raise ValueError(f"padding_mode must be reflect or replicate, got {padding_mode!r}")  # and PIL paths
        if padding_mode == "reflect" and not 0 <= padding < size:  # reflection mirrors at most size - 1 pixels
            raise ValueError(f"padding must be 0 to {size - 1} pixels for reflect padding of {size} px, got {padding}")
        if padding < 0:
            raise ValueError(f"padding must be 0 or more pixels, got {padding}")
        self.size, self.padding, self.hflip, self.padding_mode = size, padding, hflip, padding_mode

    def per_image(self):
        """The same for one PIL image at a time, in DataLoader workers: resize, then torchvision's
        RandomCrop with padding + flip -> uint8 (3, size, size)."""
        from torchvision import transforms as T

        mode = "edge" if self.padding_mode == "replicate" else "reflect"
        steps = [T.Resize(self.size), T.CenterCrop(self.size), T.RandomCrop(self.size, self.padding, padding_mode=mode)]
        if self.hflip:
            steps.append(T.RandomHorizontalFlip())
        return T.Compose([*steps, T.PILToTensor()])

    def __call__(self, imgs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """imgs: (N, C, H, W) float -> (N, C, size, size)."""
        N, _, H, W = imgs.shape
        if H != W:
            raise ValueError(f"PadCropFlip takes square images, got {H}x{W}; use rrc_flip for other shapes")
        if H != self.size:
            imgs = F.interpolate(imgs, size=(self.size, self.size), mode="bicubic", antialias=True)
        p, s, dev = self.padding, self.size, imgs.device
        padded = F.pad(imgs, (p, p, p, p), mode=self.padding_mode)
        top = torch.randint(0, 2 * p + 1, (N, 1), device=dev, generator=generator)
        left = torch.randint(0, 2 * p + 1, (N, 1), device=dev, generator=generator)
        steps = torch.arange(s, device=dev)
        rows = top + steps  # (N, s)
        cols = left + steps
        if self.hflip:
            flip = torch.rand(N, 1, device=dev, generator=generator) < 0.5
            cols = torch.where(flip, cols.flip(1), cols)
        n = torch.arange(N, device=dev)[:, None, None]
        crops = padded.permute(0, 2, 3, 1)[n, rows[:, :, None], cols[:, None, :]]  # (N, s, s, C)
        return crops.permute(0, 3, 1, 2).contiguous()
