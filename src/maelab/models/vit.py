"""Vision Transformer encoder (Dosovitskiy et al. 2021) as MAE uses it, on timm's ``Block`` as the
official ``models_mae.py`` is.

Parameter names match timm's ``VisionTransformer`` and the official MAE checkpoints
(``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``blocks.{i}.norm1|attn.qkv|attn.proj|
norm2|mlp.fc1|mlp.fc2``, ``norm``), so released weights load without renaming. The position
embedding is the fixed 2-D sin-cos table, stored as a frozen parameter like the official code.
"""

from functools import partial

import torch
from timm.models.vision_transformer import Block as TimmBlock
from torch import nn

from maelab.models.pos_embed import get_2d_sincos_pos_embed

LAYER_NORM_EPS = 1e-6  # the official MAE and timm ViTs
LayerNorm = partial(nn.LayerNorm, eps=LAYER_NORM_EPS)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> linear embedding, as a strided convolution."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(
                f"image size {img_size} is not divisible by patch size {patch_size}; "
                f"use an image size that is a multiple of {patch_size}"
            )
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        if imgs.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"expected images of {self.img_size}x{self.img_size} px, got shape {tuple(imgs.shape)}")
        return self.proj(imgs).flatten(2).transpose(1, 2)  # (N, L, D)


def transformer_block(dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0) -> nn.Module:
    """timm's pre-norm transformer block, as the official MAE builds it: x + attn(norm1(x)), then
    x + mlp(norm2(x)); fused qkv, attention through ``scaled_dot_product_attention`` (flash /
    memory-efficient kernels where available), stochastic depth ``drop_path``."""
    return TimmBlock(dim, num_heads, mlp_ratio, qkv_bias=True, drop_path=drop_path, norm_layer=LayerNorm)


class VisionTransformer(nn.Module):
    """ViT encoder: patch embedding + fixed sin-cos positions + cls token + pre-norm blocks."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        num_positions = self.patch_embed.num_patches + 1
        self.pos_embed = nn.Parameter(torch.zeros(1, num_positions, embed_dim), requires_grad=False)
        rates = [drop_path_rate * i / max(1, depth - 1) for i in range(depth)]  # deeper blocks drop more
        self.blocks = nn.ModuleList(transformer_block(embed_dim, num_heads, mlp_ratio, r) for r in rates)
        self.norm = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        self._init_encoder_weights()

    def _init_encoder_weights(self) -> None:
        pos = get_2d_sincos_pos_embed(self.embed_dim, self.patch_embed.grid_size, cls_token=True)
        self.pos_embed.data.copy_(pos.unsqueeze(0))
        # patch projection initialised like a linear layer (xavier on the flattened kernel)
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        self.apply(init_linear_and_norm)

    def patch_tokens(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, L, D) patch embeddings with their positions added (no cls)."""
        return self.patch_embed(imgs) + self.pos_embed[:, 1:, :]

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, D) patch tokens -> (N, 1 + T, D): prepend cls, run the blocks, final norm."""
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """All patches, no masking: (N, 3, H, W) -> (N, 1 + L, D)."""
        return self.forward_blocks(self.patch_tokens(imgs))

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.forward_features(imgs)


def init_linear_and_norm(m: nn.Module) -> None:
    """The official MAE initialisation: xavier-uniform linear weights, zero biases, LayerNorm 1/0."""
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
