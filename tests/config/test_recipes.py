"""The paper's ImageNet recipes as experiments: their values are the official ones
(PRETRAIN.md, FINETUNE.md and the linear-probing recipe of the official MAE repository)."""

import pytest
from omegaconf import OmegaConf

from tests.conftest import compose_config

PRETRAIN = {
    "data.img_size": 224,
    "task.mask_ratio": 0.75,
    "task.decoder_width": 512,
    "task.decoder_depth": 8,
    "task.decoder_heads": 16,
    "task.effective_batch_size": 4096,
    "task.base_lr": 1.5e-4,
    "task.weight_decay": 0.05,
    "task.betas": [0.9, 0.95],
    "task.warmup_epochs": 40,
    "trainer.max_epochs": 800,
    "target._target_": "maelab.models.targets.NormPixelTarget",
    "masking._target_": "maelab.models.masking.RandomMasking",
    "augment._target_": "maelab.data.transforms.RandomResizedCropFlip",
    "augment.scale": [0.2, 1.0],
    "augment.interpolation": "bicubic",
    "augment.hflip": True,
}
FINETUNE = {
    "data.img_size": 224,
    "data.eval_crop_fraction": 0.875,
    "task.global_pool": "avg",
    "task.effective_batch_size": 1024,
    "task.betas": [0.9, 0.999],
    "task.weight_decay": 0.05,
    "task.min_lr": 1e-6,
    "task.warmup_epochs": 5,
    "task.label_smoothing": 0.1,
    "task.mixup": 0.8,
    "task.cutmix": 1.0,
    "task.freeze_encoder": False,
    "augment._target_": "maelab.data.timm_augment.TimmTrainTransform",
    "augment.auto_augment": "rand-m9-mstd0.5-inc1",
    "augment.re_prob": 0.25,
    "augment.re_mode": "pixel",
    "augment.re_count": 1,
    "augment.interpolation": "bicubic",
}
LINPROBE = {
    "data.img_size": 224,
    "data.eval_crop_fraction": 0.875,
    "task.freeze_encoder": True,
    "task.global_pool": "token",
    "task.head_batchnorm": True,
    "task.head_init_std": 0.01,
    "task.optimizer": "lars",
    "task.base_lr": 0.1,
    "task.weight_decay": 0.0,
    "task.effective_batch_size": 16384,
    "task.warmup_epochs": 10,
    "task.mixup": 0.0,
    "task.cutmix": 0.0,
    "trainer.max_epochs": 90,
    "augment._target_": "maelab.data.transforms.RandomResizedCropFlip",
    "augment.scale": [0.08, 1.0],
    "augment.interpolation": "bicubic",
}
SIZES = {  # model, patch; fine-tuning epochs, base lr, layer decay, drop path
    "vitb": ({"embed_dim": 768, "depth": 12, "num_heads": 12, "patch_size": 16}, (100, 5e-4, 0.65, 0.1)),
    "vitl": ({"embed_dim": 1024, "depth": 24, "num_heads": 16, "patch_size": 16}, (50, 1e-3, 0.75, 0.2)),
    "vith": ({"embed_dim": 1280, "depth": 32, "num_heads": 16, "patch_size": 14}, (50, 1e-3, 0.75, 0.3)),
}


def _values(cfg, expected: dict) -> dict:
    return {
        key: OmegaConf.to_object(v) if OmegaConf.is_config(v := OmegaConf.select(cfg, key)) else v for key in expected
    }


@pytest.mark.parametrize("size", SIZES)
def test_pretraining_recipes_are_the_official_ones(tmp_path, size):
    cfg = compose_config([f"+experiment=mae_{size}"], tmp_path)
    model, _ = SIZES[size]
    assert _values(cfg, PRETRAIN) == PRETRAIN
    assert {k: cfg.model[k] for k in model} == model
    assert cfg.data._target_.endswith("ImageFolderDataModule")
    long = compose_config([f"+experiment=mae_{size}", "trainer.max_epochs=1600"], tmp_path)
    assert long.trainer.max_epochs == 1600 and long.task.warmup_epochs == 40


@pytest.mark.parametrize("size", SIZES)
def test_fine_tuning_recipes_are_the_official_ones(tmp_path, size):
    cfg = compose_config([f"+experiment=finetune_{size}"], tmp_path)
    model, (epochs, base_lr, layer_decay, drop_path) = SIZES[size]
    assert _values(cfg, FINETUNE) == FINETUNE
    assert {k: cfg.model[k] for k in model} == model
    assert (cfg.trainer.max_epochs, cfg.task.base_lr, cfg.task.layer_decay) == (epochs, base_lr, layer_decay)
    assert cfg.task.drop_path_rate == drop_path
    assert OmegaConf.is_missing(cfg.task, "pretrained")  # a pretrained encoder must be named


@pytest.mark.parametrize("size", SIZES)
def test_linear_probe_recipes_are_the_official_ones(tmp_path, size):
    cfg = compose_config([f"+experiment=linprobe_{size}"], tmp_path)
    model, _ = SIZES[size]
    assert _values(cfg, LINPROBE) == LINPROBE
    assert {k: cfg.model[k] for k in model} == model


@pytest.mark.parametrize("experiment", [f"{kind}_{size}" for kind in ("mae", "finetune", "linprobe") for size in SIZES])
def test_recipe_per_device_batches_divide_the_effective_batch_on_one_to_many_gpus(tmp_path, experiment):
    cfg = compose_config([f"+experiment={experiment}"], tmp_path)
    for gpus in (1, 2, 4, 8, 16, 32):
        per_step = cfg.data.batch_size * gpus
        assert cfg.task.effective_batch_size % per_step == 0 or per_step > cfg.task.effective_batch_size
