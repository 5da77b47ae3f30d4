"""Mask sampling strategies.

A strategy draws one score per patch, ``(N, L)``; ``MaskedAutoencoder.random_masking`` keeps the
``int(L * (1 - mask_ratio))`` lowest-scored patches of each sample. Every strategy therefore keeps
the same number of patches per sample, batches stay rectangular, and passing explicit scores
(``noise=``) reproduces a mask exactly. A structured strategy (block, grid) gives its kept patches
low scores and its masked patches high ones; adding a strategy is one class and one YAML file
under ``conf/masking/``.
"""

import torch


class RandomMasking:
    """Per-patch uniform random masking, the paper's default: scores are i.i.d. U(0, 1)."""

    def noise(
        self,
        batch_size: int,
        grid_size: tuple[int, int],
        mask_ratio: float,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        num_patches = grid_size[0] * grid_size[1]
        return torch.rand(batch_size, num_patches, device=device, generator=generator)  # (N, L)

    def __repr__(self) -> str:
        return "RandomMasking()"
