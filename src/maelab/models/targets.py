"""Reconstruction targets: what the decoder predicts for each patch.

A target maps images ``(N, C, H, W)`` to per-patch vectors ``(N, L, out_dim)``; the decoder's
prediction head is sized from ``out_dim``. Targets that live in pixel space also map predictions
back to pixels (``to_pixels``) so reconstructions can be drawn; others set ``in_pixel_space`` to
False. Adding a target is one class here and one YAML file under ``conf/target/``.
"""

import torch
from torch import nn

from maelab.models.patches import patchify


class PixelTarget(nn.Module):
    """Raw (normalised-image) pixels of each patch (paper Table 1d, 'pixel (w/o norm)')."""

    in_pixel_space = True

    def __init__(self, patch_size: int, in_chans: int = 3):
        super().__init__()
        self.patch_size = patch_size
        self.out_dim = patch_size * patch_size * in_chans

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return patchify(imgs, self.patch_size)  # (N, L, p*p*C)

    def to_pixels(self, pred: torch.Tensor, imgs: torch.Tensor) -> torch.Tensor:
        return pred


class NormPixelTarget(PixelTarget):
    """Pixels normalised by each patch's own mean and variance: the paper's default
    (``norm_pix_loss``), which improves representations (Table 1d)."""

    def __init__(self, patch_size: int, in_chans: int = 3, eps: float = 1e-6):
        super().__init__(patch_size, in_chans)
        self.eps = eps

    def _stats(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = patches.mean(dim=-1, keepdim=True)
        var = patches.var(dim=-1, keepdim=True)  # unbiased, as the official code
        return mean, (var + self.eps) ** 0.5

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        patches = patchify(imgs, self.patch_size)
        mean, std = self._stats(patches)
        return (patches - mean) / std  # (N, L, p*p*C)

    def to_pixels(self, pred: torch.Tensor, imgs: torch.Tensor) -> torch.Tensor:
        """Undo the normalisation with each patch's statistics, taken from the true image."""
        mean, std = self._stats(patchify(imgs, self.patch_size))
        return pred * std + mean
