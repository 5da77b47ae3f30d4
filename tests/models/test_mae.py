"""The MAE model: patches, masking, loss, position embeddings, names and initialisation."""

import math
from pathlib import Path

import pytest
import timm
import torch
from omegaconf import OmegaConf

from maelab.config import config_dir
from maelab.models.mae import MaskedAutoencoder
from maelab.models.patches import patchify, unpatchify
from maelab.models.pos_embed import get_2d_sincos_pos_embed
from maelab.models.vit import VisionTransformer


def tiny_mae(**kwargs) -> MaskedAutoencoder:
    args = dict(
        img_size=32,
        patch_size=4,
        embed_dim=32,
        depth=2,
        num_heads=2,
        decoder_width=16,
        decoder_depth=1,
        decoder_heads=2,
    )
    return MaskedAutoencoder(**{**args, **kwargs})


@pytest.mark.parametrize("size,patch", [(32, 2), (32, 4), (224, 16), (224, 14)])
def test_patchify_round_trip(size, patch):
    imgs = torch.randn(2, 3, size, size)
    x = patchify(imgs, patch)
    L = (size // patch) ** 2
    assert x.shape == (2, L, patch * patch * 3)
    assert torch.equal(unpatchify(x, patch, (size // patch, size // patch)), imgs)


def test_patch_layout_is_row_major_with_channels_last():
    imgs = torch.randn(1, 3, 8, 8)
    x = patchify(imgs, 4)  # 2x2 patches
    # patch 1 is the top-right one; its first entry is pixel (0, 4), all three channels
    assert torch.equal(x[0, 1, :3], imgs[0, :, 0, 4])
    # patch 2 is bottom-left; its entry for pixel (1, 2) of the patch
    assert torch.equal(x[0, 2, (1 * 4 + 2) * 3 : (1 * 4 + 2) * 3 + 3], imgs[0, :, 5, 2])


def test_masking_keeps_exact_count_differs_per_sample_and_unshuffles():
    model = tiny_mae()
    N, L, D = 6, 64, 5
    x = torch.arange(N * L * D, dtype=torch.float32).reshape(N, L, D)
    for ratio in (0.5, 0.75, 0.9):
        visible, mask, ids_restore = model.random_masking(x, ratio)
        keep = int(L * (1 - ratio))
        assert visible.shape == (N, keep, D)
        assert torch.all(mask.sum(1) == L - keep)
        assert len({tuple(m.tolist()) for m in mask}) == N  # a different mask for every sample
        # the visible tokens are exactly the unmasked positions, in shuffled order
        for n in range(N):
            assert sorted(visible[n, :, 0].tolist()) == sorted(x[n, mask[n] == 0, 0].tolist())
        # unshuffling [visible, placeholders] with ids_restore puts every token back in place
        filler = torch.full((N, L - keep, D), -1.0)
        restored = torch.gather(torch.cat([visible, filler], 1), 1, ids_restore.unsqueeze(-1).expand(-1, -1, D))
        assert torch.equal(restored[mask == 0], x[mask == 0])
        assert torch.all(restored[mask == 1] == -1)


def test_noise_reproduces_the_mask_and_the_loss():
    model = tiny_mae().eval()
    imgs = torch.randn(3, 3, 32, 32)
    noise = torch.rand(3, 64)
    loss1, pred1, mask1 = model(imgs, 0.75, noise)
    loss2, pred2, mask2 = model(imgs, 0.75, noise)
    assert torch.equal(mask1, mask2) and torch.equal(pred1, pred2) and loss1 == loss2
    _, _, mask3 = model(imgs, 0.75)
    assert not torch.equal(mask1, mask3)
    with pytest.raises(ValueError, match=r"noise must have shape \(3, 64\)"):
        model(imgs, 0.75, torch.rand(3, 63))


def test_loss_ignores_predictions_at_visible_patches():
    model = tiny_mae()
    imgs = torch.randn(2, 3, 32, 32)
    _, pred, mask = model(imgs, 0.75)
    pred = pred.detach()
    loss = model.forward_loss(imgs, pred, mask)
    changed_visible = pred + 100.0 * (1 - mask).unsqueeze(-1)
    changed_masked = pred + 1.0 * mask.unsqueeze(-1)
    assert model.forward_loss(imgs, changed_visible, mask) == loss
    assert model.forward_loss(imgs, changed_masked, mask) > loss + 0.5


def test_loss_is_zero_for_a_perfect_prediction_of_each_target():
    from maelab.models.targets import NormPixelTarget, PixelTarget

    imgs = torch.randn(2, 3, 32, 32)
    for target in (PixelTarget(4), NormPixelTarget(4)):
        model = tiny_mae(target=target)
        mask = (torch.rand(2, 64) < 0.75).float()
        assert model.forward_loss(imgs, target(imgs), mask).item() < 1e-10
        # and to_pixels undoes the target: the predicted pixels are the image
        assert torch.allclose(unpatchify(target.to_pixels(target(imgs), imgs), 4, (8, 8)), imgs, atol=1e-5)


def test_mask_ratio_that_keeps_nothing_is_refused():
    model = tiny_mae(img_size=8, patch_size=4)  # 4 patches
    with pytest.raises(ValueError, match="keeps 0 of 4 patches"):
        model(torch.randn(1, 3, 8, 8), 0.9)


def test_sincos_known_values():
    emb = get_2d_sincos_pos_embed(8, (2, 2), cls_token=True)  # (1 + 4, 8)
    assert emb.shape == (5, 8)
    assert torch.all(emb[0] == 0)  # cls position is zero
    # patch 1 = row 0, column 1. First half encodes the column (width axis first):
    # omega = [1, 1/100]: [sin(1), sin(.01), cos(1), cos(.01)]; second half the row 0: [0, 0, 1, 1]
    expected = torch.tensor([math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01), 0, 0, 1, 1])
    assert torch.allclose(emb[2], expected.float(), atol=1e-7)
    # patch 2 = row 1, column 0
    expected = torch.tensor([0, 0, 1, 1, math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01)])
    assert torch.allclose(emb[3], expected.float(), atol=1e-7)


TIMM_NAMES = {
    "vit_tiny": "vit_tiny_patch16_224",
    "vit_small": "vit_small_patch16_224",
    "vit_base": "vit_base_patch16_224",
    "vit_large": "vit_large_patch16_224",
    "vit_huge": "vit_huge_patch14_224",
}


@pytest.mark.parametrize("size", sorted(TIMM_NAMES))
def test_named_sizes_have_timm_parameter_names_and_shapes(size):
    # the group's file as a run composes it: in_chans follows data.channels, 3 without one
    group = OmegaConf.create({"model": OmegaConf.load(Path(config_dir(), "model", f"{size}.yaml"))})
    model_cfg = OmegaConf.to_container(group.model, resolve=True)
    with torch.device("meta"):  # shapes and names only: ViT-H allocates nothing
        ours = VisionTransformer(img_size=224, **model_cfg)
        theirs = timm.create_model(TIMM_NAMES[size], pretrained=False, num_classes=0)
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    theirs_shapes = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert ours_shapes == theirs_shapes


def test_encoder_computes_what_timm_computes_with_the_same_weights():
    ours = VisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4).eval()
    theirs = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=0,
        img_size=32,
        patch_size=4,
        embed_dim=64,
        depth=2,
        num_heads=4,
    ).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(ours.forward_features(imgs), theirs.forward_features(imgs), atol=1e-5)


def test_initialisation_follows_the_official_code():
    torch.manual_seed(0)
    model = MaskedAutoencoder(
        img_size=32,
        patch_size=4,
        embed_dim=192,
        depth=2,
        num_heads=3,
        decoder_width=128,
        decoder_depth=2,
        decoder_heads=4,
    )
    assert abs(model.cls_token.std().item() - 0.02) < 0.01
    assert abs(model.mask_token.std().item() - 0.02) < 0.01
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.LayerNorm):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0), name
        if isinstance(m, torch.nn.Linear):
            bound = math.sqrt(6 / (m.in_features + m.out_features))  # xavier-uniform
            assert m.weight.abs().max() <= bound and m.weight.abs().max() > 0.9 * bound, name
            assert torch.all(m.bias == 0), name
    w = model.patch_embed.proj.weight.flatten(1)
    bound = math.sqrt(6 / (w.shape[0] + w.shape[1]))
    assert 0.9 * bound < w.abs().max() <= bound  # xavier, not the convolution's default init
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad
    assert torch.equal(model.pos_embed[0], get_2d_sincos_pos_embed(192, (8, 8), cls_token=True))
