"""Weight-decay groups, the lr scaling rule from a real Trainer, and the warmup + cosine curve."""

import math

import lightning as L
import pytest

from maelab.data.synthetic import SyntheticDataModule
from maelab.models.mae import MaskedAutoencoder
from maelab.modules.optim import param_groups_weight_decay, warmup_cosine
from tests.conftest import tiny_pretrain_module


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
