"""Images <-> sequences of flattened patches, in the official MAE layout (row-major patches,
each flattened as (p, p, C))."""

import torch


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, L, p*p*C)."""
    N, C, H, W = imgs.shape
    p = patch_size
    if H % p or W % p:
        raise ValueError(f"image shape {tuple(imgs.shape)} is not divisible into {p}x{p} patches")
    h, w = H // p, W // p
    x = imgs.reshape(N, C, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(N, h * w, p * p * C)


def unpatchify(x: torch.Tensor, patch_size: int, grid_size: tuple[int, int]) -> torch.Tensor:
    """(N, L, p*p*C) -> (N, C, H, W)."""
    N, L, D = x.shape
    p = patch_size
    h, w = grid_size
    C = D // (p * p)
    if L != h * w or D != p * p * C:
        raise ValueError(f"cannot unpatchify shape {tuple(x.shape)} into a {h}x{w} grid of {p}x{p} patches")
    x = x.reshape(N, h, w, p, p, C)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(N, C, h * p, w * p)
