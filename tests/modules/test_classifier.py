"""Fine-tuning, linear probing and the checkpoints users already have (official MAE, timm)."""

import json

import pytest
import torch

from maelab.run.fit import run
from tests.conftest import TINY_CLASSIFIER, compose_config


@pytest.mark.slow
def test_a_linear_probe_changes_the_head_only_and_beats_chance(pretrained, tmp_path):
    cfg = compose_config(
        ["+experiment=linprobe_vitt_cifar10", *TINY_CLASSIFIER, f"task.pretrained={pretrained}"]
        # LARS moves each weight by lr x 0.001 of its norm a step, so a probe of a few hundred steps
        # needs a high lr and a head that does not start near zero
        + ["data.batch_size=16", "trainer.max_epochs=20", "task.warmup_epochs=2", "task.base_lr=200"]
        + ["task.head_init_std=0.3", "augment=none"],
        tmp_path,
    )
    results = run(cfg)
    after = torch.load(results["last_checkpoint"], weights_only=False)["state_dict"]
    before = torch.load(pretrained, weights_only=False)["state_dict"]
    encoder_keys = [k for k in after if not k.startswith(("model.head", "model.fc_norm"))]
    assert all(torch.equal(after[k], before[k]) for k in encoder_keys)
    assert results["global_step"] == 20 * (192 // 16)
    # ... while the head learns: 10 classes, chance is 0.1 (a probe fitted to convergence: 0.4)
    assert results["best"]["val/acc1"] > 0.2
    assert results["test"]["test/acc1"] > 0.2
    assert json.loads((tmp_path / "results.json").read_text())["val_split"] == "64 held-out training images"


def test_partial_fine_tuning_trains_only_the_last_blocks(tmp_path):
    cfg = compose_config(
        ["+experiment=scratch_vitt_cifar10", *TINY_CLASSIFIER, "model.depth=3", "task.trainable_blocks=1"], tmp_path
    )
    from maelab.run.build import build

    _, module, _ = build(cfg)
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    module.train()
    assert not module.model.blocks[1].training and module.model.blocks[2].training  # no drop path when frozen
    assert trainable == {
        n for n, _ in module.model.named_parameters() if n.startswith(("blocks.2.", "fc_norm", "head"))
    }


def test_a_resumed_classifier_does_not_need_its_pretrained_file(pretrained, tmp_path):
    import shutil

    copy = tmp_path / "moved_later.ckpt"
    shutil.copy(pretrained, copy)
    base = ["+experiment=linprobe_vitt_cifar10", *TINY_CLASSIFIER, f"task.pretrained={copy}", "augment=none"]
    run(compose_config(base + ["trainer.max_epochs=1"], tmp_path / "run"))
    copy.unlink()
    results = run(compose_config(base + ["trainer.max_epochs=2", "ckpt_path=last"], tmp_path / "run"))
    assert results["epochs"] == 2 and results["best"]["epoch"] in (0, 1)
    assert (tmp_path / "run" / "checkpoints" / "best.ckpt").is_file()
