"""Fixed 2-D sine-cosine position embeddings, laid out as in the official MAE code.

The first half of the channels encodes the column (width) coordinate, the second half the row,
and an optional all-zero row is prepended for the cls token. Loading official checkpoints and
comparing against them relies on this exact layout.
"""

import torch


def get_1d_sincos_pos_embed(embed_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, embed_dim): [sin(pos * w_k), cos(pos * w_k)], w_k = 10000^(-k/(D/2))."""
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding width must be even, got {embed_dim}")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega  # (D/2,)
    out = positions.reshape(-1).to(torch.float64)[:, None] * omega[None, :]  # (M, D/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # (M, D)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: tuple[int, int], cls_token: bool = False) -> torch.Tensor:
    """(grid_h * grid_w [+1], embed_dim) float32 table, patches in row-major order."""
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos embedding width must be divisible by 4, got {embed_dim}")
    grid_h, grid_w = grid_size
    rows, cols = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float64),
        torch.arange(grid_w, dtype=torch.float64),
        indexing="ij",
    )
    emb_w = get_1d_sincos_pos_embed(embed_dim // 2, cols)  # width axis first, as the official code
    emb_h = get_1d_sincos_pos_embed(embed_dim // 2, rows)
    emb = torch.cat([emb_w, emb_h], dim=1)  # (H*W, D)
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()
