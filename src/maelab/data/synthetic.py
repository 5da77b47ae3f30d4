"""Procedural labelled images: coloured shapes on textured backgrounds, no files.

Class c draws shape ``c % 5`` (disc, square, triangle, ring, cross) in palette ``c // 5`` (warm or
cool) at a random position, size and shade, over a striped, noisy background. Everything is a
function of the seed, so tests and the quickstart see the same images on every machine. The
labels are learnable (shape and palette) and the pixels have structure worth reconstructing.
"""

import math

import torch

from maelab.data.in_memory import InMemoryImageDataModule
from maelab.errors import UserError

NUM_SHAPES = 5
MAX_CLASSES = 2 * NUM_SHAPES  # five shapes in two palettes


def shape_masks(kind: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """(N,) shape ids and (N, S, S) coordinates in units of the shape radius -> (N, S, S) bool."""
    r2 = dx**2 + dy**2
    masks = torch.stack(
        [
            r2 <= 1.0,  # disc
            torch.maximum(dx.abs(), dy.abs()) <= 0.8,  # square
            (dy <= 0.8) & (dx.abs() <= (dy + 0.9) * 0.55),  # triangle, apex up
            (r2 >= 0.35) & (r2 <= 1.0),  # ring
            ((dx.abs() <= 0.3) & (dy.abs() <= 0.95)) | ((dy.abs() <= 0.3) & (dx.abs() <= 0.95)),  # cross
        ],
        dim=1,
    )  # (N, 5, S, S)
    return masks[torch.arange(len(kind)), kind]


def make_shapes(n: int, size: int, num_classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n images uint8 (n, 3, size, size) and labels int64 (n,), a pure function of the seed."""
    if not 1 <= num_classes <= MAX_CLASSES:
        raise UserError(f"data.num_classes={num_classes}: synthetic shapes have 1 to {MAX_CLASSES} classes")
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.rand(*shape, generator=g)

    labels = torch.randint(0, num_classes, (n,), generator=g)
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size  # pixel centres in (0, 1)
    ys, xs = coords.view(1, -1, 1), coords.view(1, 1, -1)

    # background: a dim base colour, oriented stripes of random frequency, pixel noise
    base = 0.15 + 0.3 * rand(n, 3, 1, 1)
    angle = math.pi * rand(n, 1, 1)
    freq = 2 + 6 * rand(n, 1, 1)
    phase = 2 * math.pi * rand(n, 1, 1)
    stripes = torch.sin(2 * math.pi * freq * (xs * torch.cos(angle) + ys * torch.sin(angle)) + phase)
    background = base + 0.08 * stripes.unsqueeze(1) + 0.04 * torch.randn(n, 3, size, size, generator=g)

    # foreground: the class's shape and palette
    cx, cy = 0.3 + 0.4 * rand(n, 1, 1), 0.3 + 0.4 * rand(n, 1, 1)
    radius = 0.22 + 0.13 * rand(n, 1, 1)
    inside = shape_masks(labels % NUM_SHAPES, (xs - cx) / radius, (ys - cy) / radius).unsqueeze(1)
    warm = torch.stack([0.85 + 0.15 * rand(n), 0.2 + 0.6 * rand(n), 0.1 * rand(n)], dim=1)
    palette = (labels // NUM_SHAPES).view(n, 1)
    colour = torch.where(palette == 0, warm, warm.flip(1)).view(n, 3, 1, 1)  # cool = warm reversed
    img = torch.where(inside, colour, background)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8), labels


class SyntheticDataModule(InMemoryImageDataModule):
    """Synthetic shapes held in memory; 'test' (and 'val' unless held out) is its own seeded draw.
    ``seed`` (``data.seed``) draws the images; the run's seed (``run_seed``) only their order."""

    def __init__(self, num_train: int = 2048, num_test: int = 256, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.num_train, self.num_test, self.images_seed = num_train, num_test, seed

    def load_split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.num_train if split == "train" else self.num_test
        seed = self.images_seed if split == "train" else self.images_seed + 1
        return make_shapes(n, self.img_size, self.num_classes, seed)
