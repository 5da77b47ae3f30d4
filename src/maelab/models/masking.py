"""Mask sampling strategies (``masking=random|block|grid``).

A strategy draws one score per patch, ``(N, L)``; ``MaskedAutoencoder.random_masking`` keeps the
``int(L * (1 - mask_ratio))`` lowest-scored patches of each sample. Every strategy therefore keeps
the same number of patches per sample, batches stay rectangular, and passing explicit scores
(``noise=``) reproduces a mask exactly. A structured strategy (block, grid) scores the patches it
masks in [1, 2) and the others in [0, 1); adding a strategy is one class and one YAML file under
``conf/masking/``. Everything runs on the device, batched, with no host synchronisation.
"""

import math

import torch

from maelab.errors import UserError


def _patch_coordinates(grid_size: tuple[int, int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column index of every patch, shaped (1, H, 1) and (1, 1, W) to broadcast."""
    H, W = grid_size
    return torch.arange(H, device=device).view(1, H, 1), torch.arange(W, device=device).view(1, 1, W)


def _random(draw, *args, generator: torch.Generator | None = None, **kwargs) -> torch.Tensor:
    """``draw(*args, **kwargs)`` (torch.rand, torch.randint) from ``generator`` when one is given.
    An explicit ``generator=None`` would stop torch.compile from tracing the draw with a symbolic
    batch size, which it uses once a model has met two batch sizes."""
    return draw(*args, **kwargs) if generator is None else draw(*args, generator=generator, **kwargs)


def _masked_count(num_patches: int, mask_ratio: float) -> int:
    return num_patches - int(num_patches * (1 - mask_ratio))  # the complement of num_visible


class RandomMasking:
    """Per-patch uniform random masking, the paper's default: scores are i.i.d. U(0, 1)."""

    def check(self, grid_size: tuple[int, int], mask_ratio: float) -> None:
        pass  # any ratio MaskedAutoencoder.num_visible accepts

    def noise(
        self,
        batch_size: int,
        grid_size: tuple[int, int],
        mask_ratio: float,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        num_patches = grid_size[0] * grid_size[1]
        return _random(torch.rand, batch_size, num_patches, device=device, generator=generator)  # (N, L)

    def __repr__(self) -> str:
        return "RandomMasking()"


class BlockMasking(RandomMasking):
    """BEiT's block-wise masking (Bao et al., 2022): rectangles of random area (at least
    ``min_patches``, at most what is left to mask) and aspect ratio (log-uniform in
    [min_aspect, 1 / min_aspect]) are masked until the ratio is reached.

    Batched: each round proposes one rectangle per sample and accepts it where it adds patches
    without passing the sample's target, as BEiT accepts a block, so blocks never overshoot.
    After ``rounds`` rounds the few patches still missing, if any, are masked at random."""

    def __init__(self, min_patches: int = 16, min_aspect: float = 0.3, rounds: int = 40):
        if not 0 < min_aspect <= 1:
            raise UserError(f"masking.min_aspect={min_aspect}: choose an aspect ratio in (0, 1], e.g. 0.3")
        self.min_patches, self.min_aspect, self.rounds = min_patches, min_aspect, rounds

    def blocks(self, batch_size: int, grid_size: tuple[int, int], mask_ratio: float, device=None, generator=None):
        """(N, H, W) bool: the rectangles' union, at most the ratio's count of patches per sample."""
        H, W = grid_size
        target = _masked_count(H * W, mask_ratio)
        rows, cols = _patch_coordinates(grid_size, device)
        masked = torch.zeros(batch_size, H, W, dtype=torch.bool, device=device)
        count = torch.zeros(batch_size, device=device)
        log_aspect = math.log(self.min_aspect)

        def uniform() -> torch.Tensor:
            return _random(torch.rand, batch_size, device=device, generator=generator)

        for _ in range(self.rounds):
            remaining = target - count
            smallest = remaining.clamp(max=self.min_patches)
            area = smallest + uniform() * (remaining - smallest)
            aspect = torch.exp(log_aspect + uniform() * -2 * log_aspect)
            h = torch.sqrt(area * aspect).round().clamp(1, H)
            w = torch.sqrt(area / aspect).round().clamp(1, W)
            top = (uniform() * (H - h + 1)).floor()
            left = (uniform() * (W - w + 1)).floor()
            inside = (
                (rows >= top.view(-1, 1, 1))
                & (rows < (top + h).view(-1, 1, 1))
                & (cols >= left.view(-1, 1, 1))
                & (cols < (left + w).view(-1, 1, 1))
            )
            new = inside & ~masked
            added = new.sum(dim=(1, 2))
            accept = (added > 0) & (count + added <= target)
            masked |= new & accept.view(-1, 1, 1)
            count += added * accept
        return masked

    def noise(self, batch_size, grid_size, mask_ratio, device=None, generator=None) -> torch.Tensor:
        masked = self.blocks(batch_size, grid_size, mask_ratio, device, generator)
        return super().noise(batch_size, grid_size, mask_ratio, device, generator) + masked.flatten(1)

    def __repr__(self) -> str:
        return f"BlockMasking(min_patches={self.min_patches}, min_aspect={self.min_aspect})"


class GridMasking(RandomMasking):
    """The paper's grid-wise sampling: keep one patch in every ``cell`` x ``cell`` group (the same
    corner of every group within a sample, a random one per sample) and mask the others, a ratio
    of 1 - 1/cell² (0.75 for 2x2). A higher ratio keeps a random subset of those patches."""

    def __init__(self, cell: int = 2):
        self.cell = cell

    def check(self, grid_size: tuple[int, int], mask_ratio: float) -> None:
        H, W = grid_size
        c = self.cell
        if H % c or W % c:
            raise UserError(
                f"masking=grid groups patches {c}x{c}, but the patch grid is {H}x{W}; choose an image and patch "
                f"size with a multiple of {c} patches per side, or masking.cell dividing {H} and {W}"
            )
        L = H * W
        if L - _masked_count(L, mask_ratio) > L // (c * c):
            raise UserError(
                f"task.mask_ratio={mask_ratio} with masking=grid: keeping one patch in every {c}x{c} group masks "
                f"{1 - 1 / c**2:g} of the patches at least; choose task.mask_ratio >= {1 - 1 / c**2:g}"
            )

    def noise(self, batch_size, grid_size, mask_ratio, device=None, generator=None) -> torch.Tensor:
        self.check(grid_size, mask_ratio)
        c = self.cell
        corner = _random(torch.randint, 0, c * c, (batch_size, 1, 1), device=device, generator=generator)
        rows, cols = _patch_coordinates(grid_size, device)
        kept = (rows % c == corner // c) & (cols % c == corner % c)
        return super().noise(batch_size, grid_size, mask_ratio, device, generator) + (~kept).flatten(1)

    def __repr__(self) -> str:
        return f"GridMasking(cell={self.cell})"
