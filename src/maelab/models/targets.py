"""Reconstruction targets: what the decoder predicts for each patch.

A target maps images ``(N, C, H, W)`` to per-patch vectors ``(N, L, out_dim)``; the decoder's
prediction head is sized from ``out_dim``. Targets that live in pixel space also map predictions
back to pixels (``to_pixels``) so reconstructions can be drawn; others set ``in_pixel_space`` to
False. Adding a target is one class here and one YAML file under ``conf/target/``.
"""

import torch
import torch.nn.functional as F
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


class HOGTarget(nn.Module):
    """Histograms of oriented gradients of each patch, as MaskFeat predicts them (Wei et al.,
    2022): per colour channel, Sobel gradients; each pixel votes its gradient magnitude into one
    of ``bins`` unsigned orientation bins (0-180 degrees); votes are summed over ``cell`` x
    ``cell`` cells and each cell's histogram is L2-normalised. A 16-px patch with 8-px cells has
    3 channels x 4 cells x 9 bins = 108 values. All convolutions and pooling on the device.
    MaskFeat's optional Gaussian weighting of the magnitudes within a patch is left out."""

    in_pixel_space = False

    def __init__(self, patch_size: int, in_chans: int = 3, bins: int = 9, cell: int | None = None):
        super().__init__()
        from maelab.errors import UserError

        cell = cell or min(8, patch_size)  # 8 px (MaskFeat at 224 px), or the whole of a smaller patch
        if patch_size % cell:
            raise UserError(
                f"target.cell={cell} does not divide the {patch_size}-px patches; choose a divisor of {patch_size}"
            )
        self.patch_size, self.in_chans, self.bins, self.cell = patch_size, in_chans, bins, cell
        self.out_dim = in_chans * (patch_size // cell) ** 2 * bins
        sobel = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
        kernels = torch.stack([sobel, sobel.T]).unsqueeze(1).repeat(in_chans, 1, 1, 1)  # (2C, 1, 3, 3): x, y
        self.register_buffer("kernels", kernels, persistent=False)

    @torch.no_grad()
    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        with torch.autocast(imgs.device.type, enabled=False):  # bf16 gradients would move votes between bins
            return self._hog(imgs.float())

    def _hog(self, imgs: torch.Tensor) -> torch.Tensor:
        N, C, H, W = imgs.shape
        x = F.pad(imgs, (1, 1, 1, 1), mode="reflect")
        grad = F.conv2d(x, self.kernels, groups=C).view(N, C, 2, H, W)
        gx, gy = grad[:, :, 0], grad[:, :, 1]
        magnitude = torch.hypot(gx, gy)
        orientation = torch.atan2(gy, gx)  # (-pi, pi]; opposite directions share a bin (unsigned)
        bin_index = (orientation / torch.pi * self.bins).floor().long() % self.bins
        votes = torch.stack([magnitude * (bin_index == b) for b in range(self.bins)], dim=2)  # (N, C, bins, H, W)
        cells = F.avg_pool2d(votes.flatten(1, 2), self.cell) * self.cell**2  # summed over each cell
        cells = F.normalize(cells.view(N, C, self.bins, H // self.cell, W // self.cell), dim=2)  # L2 per cell
        # (N, C, bins, H/cell, W/cell) -> (N, L, C * cells per patch * bins)
        k = self.patch_size // self.cell
        h, w = H // self.patch_size, W // self.patch_size
        cells = cells.view(N, C, self.bins, h, k, w, k).permute(0, 3, 5, 1, 4, 6, 2)
        return cells.reshape(N, h * w, self.out_dim)


class PCATarget(nn.Module):
    """Patch pixels projected on their top-``k`` principal components: a low-pass target that
    keeps the patch's dominant structure and drops the rest. The components are estimated once,
    at the start of training, from ``num_patches`` patches of training images (``fit``); they are
    buffers, so they travel in every checkpoint and a resumed run keeps them. With ``whiten``
    each component is divided by its standard deviation, so all of them weigh the same in the
    loss. Predictions map back to pixels (mean + components x coefficients), so reconstructions
    are drawn: the best a k-dimensional code can show."""

    in_pixel_space = True

    def __init__(self, patch_size: int, in_chans: int = 3, k: int | None = None, whiten: bool = False,
                 num_patches: int = 100_000):  # fmt: skip
        super().__init__()
        from maelab.errors import UserError

        dim = patch_size * patch_size * in_chans
        k = k or max(1, dim // 4)
        if not 0 < k <= dim:
            raise UserError(f"target.k={k}: a {patch_size}-px patch has {dim} values; choose 1 to {dim} components")
        self.patch_size, self.out_dim, self.whiten, self.num_patches = patch_size, k, whiten, num_patches
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("components", torch.zeros(dim, k))  # orthonormal columns
        self.register_buffer("scale", torch.ones(k))  # per-component std when whitening, else 1
        self.register_buffer("fitted", torch.tensor(False))
        self.ready = False  # fitted, kept on the host: checking the buffer would sync every step

    @torch.no_grad()
    def fit(self, imgs: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Estimates the components from (normalised) images (N, C, H, W)."""
        patches = patchify(imgs.float(), self.patch_size).flatten(0, 1)  # (N * L, D)
        if len(patches) > self.num_patches:
            pick = torch.randperm(len(patches), generator=generator)[: self.num_patches]
            patches = patches[pick.to(patches.device)]
        mean = patches.mean(0)
        centred = patches - mean
        covariance = centred.T @ centred / max(1, len(centred) - 1)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance.double())  # ascending
        top = eigenvectors[:, -self.out_dim :].flip(-1).float()  # (D, k), largest first
        top = top * torch.sign(top.sum(0, keepdim=True) + 1e-12)  # a fixed sign per component
        self.mean.copy_(mean)
        self.components.copy_(top)
        std = eigenvalues[-self.out_dim :].flip(-1).clamp_min(1e-12).sqrt().float()
        self.scale.copy_(std if self.whiten else torch.ones_like(std))
        self.fitted.fill_(True)
        self.ready = True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.ready = bool(self.fitted)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        if not self.ready:
            raise RuntimeError("PCATarget.fit(images) must run before the first step (PretrainModule does it)")
        with torch.autocast(imgs.device.type, enabled=False):  # the target in full precision
            return (patchify(imgs.float(), self.patch_size) - self.mean) @ self.components / self.scale  # (N, L, k)

    def to_pixels(self, pred: torch.Tensor, imgs: torch.Tensor) -> torch.Tensor:
        with torch.autocast(pred.device.type, enabled=False):
            return (pred.float() * self.scale) @ self.components.T + self.mean
