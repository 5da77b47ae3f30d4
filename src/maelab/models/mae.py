"""Masked Autoencoder (He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022).

Mask a large random subset of patches, encode only the visible ones, decode all of them with a
light decoder that sees shared mask tokens, and regress the target of the masked patches.
Parameter names follow the official ``models_mae.py``, so its checkpoints load unchanged. Pure
PyTorch: lift this file (with vit.py, pos_embed.py, patches.py, targets.py, masking.py) into a
notebook and it works.
"""

import torch
from torch import nn

from maelab.models.masking import RandomMasking
from maelab.models.patches import patchify, unpatchify
from maelab.models.pos_embed import get_2d_sincos_pos_embed
from maelab.models.targets import NormPixelTarget
from maelab.models.vit import LAYER_NORM_EPS, VisionTransformer, init_linear_and_norm, transformer_block


class MaskedAutoencoder(VisionTransformer):
    """ViT encoder (inherited, so its parameter names stay flat) plus the MAE decoder."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        decoder_width: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        target: nn.Module | None = None,
        masking: object | None = None,
    ):
        super().__init__(img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio)
        self.target = target if target is not None else NormPixelTarget(patch_size, in_chans)
        self.masking = masking if masking is not None else RandomMasking()
        num_patches = self.patch_embed.num_patches

        self.decoder_embed = nn.Linear(embed_dim, decoder_width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_width))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_width), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            transformer_block(decoder_width, decoder_heads, mlp_ratio) for _ in range(decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(decoder_width, eps=LAYER_NORM_EPS)
        self.decoder_pred = nn.Linear(decoder_width, self.target.out_dim)  # sized by the target
        self._init_decoder_weights()

    def _init_decoder_weights(self) -> None:
        grid = self.patch_embed.grid_size
        pos = get_2d_sincos_pos_embed(self.decoder_pos_embed.shape[-1], grid, cls_token=True)
        self.decoder_pos_embed.data.copy_(pos.unsqueeze(0))
        nn.init.normal_(self.mask_token, std=0.02)
        for module in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            module.apply(init_linear_and_norm)

    @property
    def patch_size(self) -> int:
        return self.patch_embed.patch_size

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, L, p*p*3)"""
        return patchify(imgs, self.patch_size)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, L, p*p*3) -> (N, 3, H, W)"""
        return unpatchify(x, self.patch_size, self.patch_embed.grid_size)

    def num_visible(self, mask_ratio: float) -> int:
        """Patches each sample keeps: int(L * (1 - mask_ratio)), at least one, fewer than L."""
        L = self.patch_embed.num_patches
        len_keep = int(L * (1 - mask_ratio))
        if not 0 < len_keep < L:
            raise ValueError(
                f"mask_ratio={mask_ratio} keeps {len_keep} of {L} patches; choose a ratio that "
                f"keeps between 1 and {L - 1} (for example 0.75 keeps {int(L * 0.25)})"
            )
        return len_keep

    def random_masking(
        self, x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-sample masking by sorting scores: keep the lowest-scored patches.
        x: (N, L, D). Returns visible tokens (N, len_keep, D), mask (N, L) with 1 = masked, and
        ids_restore (N, L), the permutation that puts shuffled tokens back in order."""
        N, L, D = x.shape
        len_keep = self.num_visible(mask_ratio)
        if noise is None:
            noise = self.masking.noise(N, self.patch_embed.grid_size, mask_ratio, device=x.device)
        elif noise.shape != (N, L):
            raise ValueError(f"noise must have shape {(N, L)} (batch, patches), got {tuple(noise.shape)}")

        ids_shuffle = torch.argsort(noise, dim=1)  # ascending: the first len_keep are kept
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_visible = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))

        mask = torch.ones(N, L, device=x.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)  # back to patch order
        return x_visible, mask, ids_restore

    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.patch_tokens(imgs)  # (N, L, D), positions added
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)  # (N, len_keep, D)
        latent = self.forward_blocks(x)  # (N, 1 + len_keep, D): the encoder sees visible tokens only
        return latent, mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(latent)  # (N, 1 + len_keep, Dd)
        N, T, Dd = x.shape
        mask_tokens = self.mask_token.expand(N, ids_restore.shape[1] + 1 - T, -1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # (N, L, Dd), shuffled order
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, Dd))  # unshuffle
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed  # (N, 1 + L, Dd)
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_pred(self.decoder_norm(x))  # (N, 1 + L, out_dim)
        return x[:, 1:, :]  # drop cls: (N, L, out_dim)

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error on masked patches only. imgs: (N, 3, H, W), pred: (N, L, out_dim),
        mask: (N, L) with 1 = masked."""
        target = self.target(imgs)  # (N, L, out_dim)
        loss = ((pred.float() - target) ** 2).mean(dim=-1)  # (N, L), per patch
        return (loss * mask).sum() / mask.sum()

    def forward(
        self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)  # (N, L, out_dim)
        loss = self.forward_loss(imgs, pred, mask)
        return loss, pred, mask
