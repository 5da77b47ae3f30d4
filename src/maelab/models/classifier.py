"""The MAE encoder with a classification head, for fine-tuning, linear probing and training from
scratch. Parameter names are timm's ``VisionTransformer`` and the official ``models_vit.py``:
the encoder's (``patch_embed``, ``cls_token``, ``pos_embed``, ``blocks``, ``norm``) plus
``fc_norm`` and ``head``.

Pooling follows timm and the official fine-tuning code: with global average pooling the final
LayerNorm moves after the pooling (``norm`` is an identity, ``fc_norm`` a LayerNorm); with the
cls token, ``norm`` stays and ``fc_norm`` is an identity. The linear-probe head puts a
BatchNorm without affine parameters before the linear layer (``head.0``, ``head.1``), as the
official linear-probing code does; with average pooling that BatchNorm replaces ``fc_norm``.
"""

import torch
from torch import nn

from maelab.models.vit import LAYER_NORM_EPS, VisionTransformer

GLOBAL_POOLS = ("avg", "token")


class ViTClassifier(VisionTransformer):
    def __init__(
        self,
        num_classes: int,
        global_pool: str = "avg",
        head_batchnorm: bool = False,
        head_init_std: float = 2e-5,
        train_pos_embed: bool = True,
        **encoder,  # VisionTransformer's: img_size, patch_size, embed_dim, depth, num_heads, drop_path_rate, ...
    ):
        super().__init__(**encoder)
        embed_dim = self.embed_dim
        if global_pool not in GLOBAL_POOLS:
            raise ValueError(f"global_pool={global_pool!r}: expected one of {GLOBAL_POOLS}")
        self.global_pool = global_pool
        self.num_classes = num_classes
        if global_pool == "avg":
            self.norm = nn.Identity()
            self.fc_norm = nn.Identity() if head_batchnorm else nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        else:
            self.fc_norm = nn.Identity()
        linear = nn.Linear(embed_dim, num_classes)
        nn.init.trunc_normal_(linear.weight, std=head_init_std)
        nn.init.zeros_(linear.bias)
        if head_batchnorm:
            self.head = nn.Sequential(nn.BatchNorm1d(embed_dim, affine=False, eps=1e-6), linear)
        else:
            self.head = linear
        # The official fine-tuning trains the position embedding (timm's is a parameter) from the
        # pretrained sin-cos values; linear probing freezes it with the rest of the encoder.
        self.pos_embed.requires_grad_(train_pos_embed)

    def features(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, D): the pooled, normalised feature the head sees."""
        x = self.forward_features(imgs)
        pooled = x[:, 1:].mean(dim=1) if self.global_pool == "avg" else x[:, 0]
        return self.fc_norm(pooled)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(imgs))

    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameters by depth, as timm's VisionTransformer declares them (timm's layer-wise lr
        decay reads this): embeddings, then each block, then the final norms and the head."""
        return {
            "stem": r"^cls_token|^pos_embed|^patch_embed",
            "blocks": r"^blocks\.(\d+)",
            "head": r"^norm|^fc_norm|^head",  # its own depth, as the official fine-tuning's layer decay
        }

    def encoder_modules(self) -> list[nn.Module]:
        """Everything before the head's own normalisation, in order (the part a probe freezes)."""
        return [self.patch_embed, *self.blocks, self.norm]
