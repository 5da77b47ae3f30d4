"""Distributed training through the command line (two CPU processes over gloo) and the
effective batch under several device and node counts."""

import json
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from maelab.errors import UserError
from maelab.run.build import derive_accumulation
from tests.conftest import REPO, maelab


@pytest.mark.slow
def test_two_ddp_ranks_see_disjoint_samples_draw_different_masks_and_end_identical(tmp_path):
    probe = tmp_path / "probe"
    done = maelab(
        "train", "+experiment=quickstart", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
        "trainer.max_epochs=1", "data.num_train=256", "data.num_test=33", "data.batch_size=32",
        "trainer.enable_progress_bar=false", "callbacks.knn_monitor=null",
        "+callbacks.probe._target_=tests.ddp_probe.RecordRanks", f"+callbacks.probe.out_dir={probe}",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path, env={"PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    r0, r1 = (torch.load(probe / f"rank{r}.pt", weights_only=False) for r in (0, 1))

    # 256 images / (32 x 2 ranks) = 4 steps; each rank trained on its own 128
    assert len(r0["train"]) == len(r1["train"]) == 128
    assert not set(r0["train"]) & set(r1["train"])
    # validation: each of the 33 test images exactly once over both ranks (no padding to 34)
    assert len(r0["val"]) + len(r1["val"]) == 33 and len(set(r0["val"]) | set(r1["val"])) == 33

    assert len(r0["noise"]) == len(r1["noise"]) == 4
    for a, b in zip(r0["noise"], r1["noise"]):
        assert not torch.equal(a, b)  # each rank its own masks

    assert r0["weights"].keys() == r1["weights"].keys()
    for key in r0["weights"]:
        assert torch.equal(r0["weights"][key], r1["weights"][key]), key


def _fake_trainer(devices: int, nodes: int) -> SimpleNamespace:
    return SimpleNamespace(num_devices=devices, num_nodes=nodes, world_size=devices * nodes, accumulate_grad_batches=1)


@pytest.mark.parametrize(
    "batch,devices,nodes,accumulate",
    [(256, 1, 1, 16), (512, 8, 1, 1), (64, 8, 1, 8), (64, 8, 4, 2), (128, 4, 2, 4), (32, 8, 16, 1)],
)
def test_accumulation_makes_up_the_recipe_batch_for_any_device_and_node_count(batch, devices, nodes, accumulate):
    cfg = OmegaConf.create({"task": {"effective_batch_size": 4096}, "data": {"batch_size": batch}, "trainer": {}})
    trainer = _fake_trainer(devices, nodes)
    derive_accumulation(cfg, trainer)
    assert trainer.accumulate_grad_batches == accumulate
    assert batch * devices * nodes * accumulate == 4096


def test_an_effective_batch_the_hardware_cannot_divide_is_refused_with_the_numbers():
    cfg = OmegaConf.create({"task": {"effective_batch_size": 4096}, "data": {"batch_size": 96}, "trainer": {}})
    with pytest.raises(UserError, match=r"4096 is not a multiple of data.batch_size=96 x 8 device\(s\) x 2 node"):
        derive_accumulation(cfg, _fake_trainer(8, 2))


@pytest.mark.slow
def test_a_bad_file_met_by_both_ranks_is_counted_once(tmp_path):
    from maelab.data.imagenet import ImageFolderDataModule
    from maelab.data.samplers import EpochShuffleSampler
    from tests.conftest import corrupt_one_file, make_tree

    tree = make_tree(tmp_path / "tree")
    bad = str(corrupt_one_file(tree))
    files = ImageFolderDataModule(str(tree), img_size=32)
    files.setup()
    index = [str(p) for p, _ in files.files["train"]].index(bad)
    met = {  # the ranks whose shard holds the bad file in each of the 3 epochs (seed 0, 23 files, 2 x 8)
        rank
        for epoch in range(3)
        for rank in (0, 1)
        if index in list(_epoch(EpochShuffleSampler(files.files["train"], 2, rank, seed=0, step_samples=8), epoch))
    }
    assert met == {0, 1}  # the case this test is about: a sum over ranks would count it twice
    done = maelab(
        "train", "data=imagenet", f"data.root={tree}", "data.img_size=32", "data.batch_size=8", "data.num_workers=1",
        "data.skip_bad_images=true", "model=vit_tiny", "model.embed_dim=32", "model.depth=1", "model.num_heads=2",
        "model.patch_size=8", "task.decoder_width=16", "task.decoder_depth=1", "task.decoder_heads=2",
        "task.warmup_epochs=1", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_epochs=3",
        "trainer.enable_progress_bar=false", "callbacks.knn_monitor=null", f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path, env={"PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["skipped_images"] == 1 and results["global_step"] == 3


def _epoch(sampler, epoch):
    sampler.set_epoch(epoch)
    return iter(sampler)
