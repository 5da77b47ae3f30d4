"""The official fine-tuning augmentation through timm: RandomResizedCrop + flip + RandAugment
(``rand-m9-mstd0.5-inc1``) + random erasing, per PIL image in DataLoader workers.

RandAugment works on PIL images, so this one runs in the loader (``in_loader``) rather than
batched on the device; the datamodule then yields normalised float batches."""

import torch
from PIL import Image, ImageOps


def posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize with 0 bits kept meaning a black image, as Pillow < 11 computed it.
    RandAugment's increasing posterize reaches 0 bits at magnitude 10 (m9 with noise gets
    there), which newer Pillow refuses with an error that would stop the training run."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _patch_posterize(transform) -> int:
    """Point every posterize op of the RandAugment inside ``transform`` at ``posterize``."""
    from timm.data.auto_augment import RandAugment

    patched = 0
    for t in getattr(transform, "transforms", []):
        if isinstance(t, RandAugment):
            for op in t.ops:
                if op.name.startswith("Posterize"):
                    op.aug_fn = posterize
                    patched += 1
    return patched


class TimmTrainTransform:
    in_loader = True  # build() hands it to the datamodule's training DataLoader

    def __init__(
        self,
        size: int,
        mean: list[float],
        std: list[float],
        auto_augment: str | None = "rand-m9-mstd0.5-inc1",
        scale: tuple[float, float] = (0.08, 1.0),
        hflip: float = 0.5,
        interpolation: str = "bicubic",
        re_prob: float = 0.25,
        re_mode: str = "pixel",
        re_count: int = 1,
    ):
        from timm.data import create_transform

        # RandAugment's translations and timm's crop follow input_size, so 32 px images get
        # 32 px-sized operations; colour jitter is off when RandAugment is on, as in timm.
        self.transform = create_transform(
            input_size=size,
            is_training=True,
            scale=tuple(scale),
            hflip=hflip,
            auto_augment=auto_augment,
            interpolation=interpolation,
            re_prob=re_prob,
            re_mode=re_mode,
            re_count=re_count,
            mean=tuple(mean),
            std=tuple(std),
        )
        _patch_posterize(self.transform)

    def __call__(self, image: torch.Tensor | Image.Image) -> torch.Tensor:
        """uint8 (3, H, W) or an RGB PIL image -> normalised float (3, size, size)."""
        if isinstance(image, torch.Tensor):
            image = Image.fromarray(image.permute(1, 2, 0).numpy())
        return self.transform(image)
