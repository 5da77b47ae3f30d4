"""Weight-decay groups, the lr scaling rule from a real Trainer, and the warmup + cosine curve."""

import math

import lightning as L
import pytest
import torch

from maelab.data.synthetic import SyntheticDataModule
from maelab.models.classifier import ViTClassifier
from maelab.models.mae import MaskedAutoencoder
from maelab.modules.optim import param_groups_layer_decay, param_groups_weight_decay, warmup_cosine
from tests.conftest import SMALL, tiny_pretrain_module


def test_weight_decay_only_on_weight_matrices():
    model = MaskedAutoencoder(
        img_size=16,
        patch_size=4,
        embed_dim=32,
        depth=1,
        num_heads=2,
        decoder_width=16,
        decoder_depth=1,
        decoder_heads=2,
    )
    decay, no_decay = param_groups_weight_decay(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decay_names = {names[id(p)] for p in decay["params"]}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {
        "blocks.0.attn.qkv.weight",
        "blocks.0.mlp.fc1.weight",
        "patch_embed.proj.weight",
        "decoder_embed.weight",
        "decoder_pred.weight",
    } <= decay_names
    assert {
        "cls_token",
        "mask_token",
        "blocks.0.norm1.weight",
        "blocks.0.attn.qkv.bias",
        "norm.bias",
        "decoder_norm.weight",
    } <= no_decay_names
    assert all(n.endswith("weight") and "norm" not in n for n in decay_names)
    # the fixed sin-cos tables are not trained at all
    assert "pos_embed" not in decay_names | no_decay_names
    assert "decoder_pos_embed" not in decay_names | no_decay_names


def test_warmup_then_half_cycle_cosine():
    assert warmup_cosine(0, 10, 110) == 0.0
    assert warmup_cosine(5, 10, 110) == 0.5
    assert warmup_cosine(10, 10, 110) == 1.0
    assert math.isclose(warmup_cosine(60, 10, 110), 0.5)
    assert math.isclose(warmup_cosine(110, 10, 110, min_ratio=0.1), 0.1)
    assert math.isclose(warmup_cosine(500, 10, 110), 0.0)  # past the end it stays at the floor


@pytest.mark.parametrize("accumulate", [1, 4])
def test_lr_follows_the_effective_batch_and_steps_each_optimizer_step(accumulate, tmp_path):
    dm = SyntheticDataModule(
        num_train=256, num_test=16, batch_size=8, img_size=16, num_classes=4, mean=[0.5] * 3, std=[0.25] * 3
    )
    pm = tiny_pretrain_module(base_lr=1e-3, warmup_epochs=1)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=10,
        max_steps=3,
        accumulate_grad_batches=accumulate,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(pm, datamodule=dm)
    effective = 8 * accumulate
    assert pm.effective_batch_size == effective
    assert math.isclose(pm.lr, 1e-3 * effective / 256)
    steps_per_epoch = 256 // 8 // accumulate
    assert pm.schedule == {"warmup_steps": steps_per_epoch, "total_steps": 10 * steps_per_epoch}
    # three optimizer steps into a linear warmup
    lr_now = trainer.optimizers[0].param_groups[0]["lr"]
    assert math.isclose(lr_now, pm.lr * 3 / steps_per_epoch)


@pytest.mark.parametrize(
    "pool,batchnorm,frozen,wd",
    [
        ("avg", False, False, 0.05),
        ("token", False, False, 0.05),
        ("token", True, True, 0.0),
        ("avg", False, False, 0.0),
    ],
)
def test_timm_layer_decay_groups_are_the_ones_maelab_checkpoints_hold(pool, batchnorm, frozen, wd):
    # maelab grouped by hand before it used timm's helper; optimizer states in checkpoints follow
    # the groups' order, so a run started before still resumes: same groups, params, scales, order
    model = ViTClassifier(10, global_pool=pool, head_batchnorm=batchnorm, **SMALL)
    if frozen:
        for module in model.encoder_modules():
            module.requires_grad_(False)
        model.cls_token.requires_grad_(False)
    depth = len(model.blocks)

    def layer(name: str) -> int:
        if name.startswith(("cls_token", "pos_embed", "patch_embed")):
            return 0
        return int(name.split(".")[1]) + 1 if name.startswith("blocks.") else depth + 1

    before: dict = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            decays = not (p.ndim <= 1 or name.endswith(".bias") or name in ("cls_token", "pos_embed"))
            group = before.setdefault((layer(name), decays), {"params": [], "weight_decay": wd if decays else 0.0})
            group["lr_scale"] = 0.75 ** (depth + 1 - layer(name))
            group["params"].append(p)
    expected = [before[key] for key in sorted(before)]
    groups = param_groups_layer_decay(model, weight_decay=wd, layer_decay=0.75)
    assert [[id(p) for p in g["params"]] for g in groups] == [[id(p) for p in g["params"]] for g in expected]
    for group, reference in zip(groups, expected, strict=True):
        assert (group["lr_scale"], group["weight_decay"]) == pytest.approx(
            (reference["lr_scale"], reference["weight_decay"])
        )


def test_layer_decay_scales_and_no_decay_sets():
    model = ViTClassifier(10, **SMALL)  # depth 3: layers 0..4
    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.5)
    by_param = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    expected = {
        "cls_token": (0.5**4, 0.0),
        "patch_embed.proj.weight": (0.5**4, 0.05),
        "patch_embed.proj.bias": (0.5**4, 0.0),
        "pos_embed": (0.5**4, 0.0),
        "blocks.0.attn.qkv.weight": (0.5**3, 0.05),
        "blocks.0.norm1.weight": (0.5**3, 0.0),
        "blocks.2.mlp.fc2.weight": (0.5**1, 0.05),
        "blocks.2.mlp.fc2.bias": (0.5**1, 0.0),
        "fc_norm.weight": (1.0, 0.0),
        "head.weight": (1.0, 0.05),
        "head.bias": (1.0, 0.0),
    }
    for name, (scale, wd) in expected.items():
        group = by_param[id(named[name])]
        assert (group["lr_scale"], group["weight_decay"]) == pytest.approx((scale, wd)), name
    assert sum(len(g["params"]) for g in groups) == len([p for p in model.parameters() if p.requires_grad])


def test_lars_steps_weight_matrices_by_trust_ratio_and_biases_plainly():
    """The official LARS update: a weight matrix moves by lr x 0.001 x |w| / |g| x g (momentum
    aside), a bias by lr x g."""
    from timm.optim import Lars

    from maelab.modules.optim import lars_groups, param_groups_weight_decay

    head = torch.nn.Linear(3, 2)
    w, b = head.weight, head.bias
    with torch.no_grad():
        w.fill_(2.0), b.zero_()
    w.grad, b.grad = torch.full((2, 3), 0.5), torch.tensor([1.0, -1.0])
    Lars(lars_groups(param_groups_weight_decay(head, 0.0)), lr=10.0, momentum=0.9, trust_coeff=0.001).step()
    trust = 0.001 * (2.0 * 6**0.5) / (0.5 * 6**0.5)
    assert torch.allclose(w.detach(), torch.full((2, 3), 2.0 - 10.0 * trust * 0.5))
    assert torch.allclose(b.detach(), torch.tensor([-10.0, 10.0]))


@pytest.mark.parametrize("wd", [0.05, 0.0])
def test_weight_decay_groups_keep_their_two_kinds_apart_at_any_weight_decay(wd):
    # maelab's checkpoints hold two groups, decayed first, also for weight_decay=0 (timm would merge)
    model = MaskedAutoencoder(
        img_size=16,
        patch_size=4,
        embed_dim=32,
        depth=1,
        num_heads=2,
        decoder_width=16,
        decoder_depth=1,
        decoder_heads=2,
    )
    decay, no_decay = param_groups_weight_decay(model, wd)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (wd, 0.0)
    assert all(p.ndim > 1 for p in decay["params"]) and len(no_decay["params"]) > 0
