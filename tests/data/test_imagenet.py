"""The ImageFolder (ImageNet) data module on a generated tree of awkward real-world files."""

import json

import numpy as np
import pytest
import torch

from maelab.data.files import read_rgb
from maelab.data.imagenet import ImageFolderDataModule
from maelab.errors import UserError
from maelab.run.fit import run
from tests.conftest import TREE_CLASSES, compose_config, corrupt_one_file, make_tree


def test_awkward_files_read_as_upright_rgb(tmp_path):
    tree = make_tree(tmp_path)
    odd = tree / "train" / TREE_CLASSES[0]
    for name in ("gray", "cmyk", "png_inside", "rotated"):
        image = read_rgb(odd / f"{name}.JPEG")
        assert image.mode == "RGB", name
    assert read_rgb(odd / "rotated.JPEG").size == (30, 60)  # EXIF orientation applied
    gray = np.asarray(read_rgb(odd / "gray.JPEG"))
    assert np.array_equal(gray[..., 0], gray[..., 2])


def _datamodule(root, **kwargs) -> ImageFolderDataModule:
    args = dict(img_size=32, batch_size=4, eval_batch_size=5, num_workers=0)
    dm = ImageFolderDataModule(str(root), **{**args, **kwargs})
    dm.setup()
    return dm


def _batches(dm, loader):
    return [dm.on_before_batch_transfer(b, 0) for b in loader]


def test_batches_are_uint8_at_the_input_size_and_every_val_image_is_seen_once(tmp_path):
    dm = _datamodule(make_tree(tmp_path))
    assert dm.num_classes == 3 and dm.classes == TREE_CLASSES
    assert len(dm.files["train"]) == 3 * 6 + 4 and len(dm.files["val"]) == 6
    images, labels = _batches(dm, dm.train_dataloader())[0]
    assert images.dtype == torch.uint8 and images.shape == (4, 3, 32, 32)
    val = _batches(dm, dm.val_dataloader())
    assert sum(len(labels) for _, labels in val) == 6
    assert torch.cat([labels for _, labels in val]).tolist() == [0, 0, 1, 1, 2, 2]


def test_evaluation_resizes_to_img_size_over_the_crop_fraction_then_center_crops(tmp_path):
    dm = _datamodule(make_tree(tmp_path), img_size=224, decode="pil")
    resize, crop = dm.eval_transform().transforms[:2]
    assert resize.size == 256 and crop.size == (224, 224)
    assert resize.interpolation.value == "bicubic"


def test_the_class_count_follows_the_folders_and_mismatches_are_named(tmp_path):
    tree = make_tree(tmp_path)
    with pytest.raises(UserError, match="data.num_classes=1000, but .* holds 3 class folders"):
        ImageFolderDataModule(str(tree), num_classes=1000)
    (tree / "val" / "n99999999").mkdir()
    with pytest.raises(UserError, match=r"not in train: \['n99999999'\]"):
        _datamodule(tree)
    with pytest.raises(UserError, match="there is no .*missing/train"):
        ImageFolderDataModule(str(tmp_path / "missing"))


def test_an_unreadable_file_stops_with_its_name(tmp_path):
    tree = make_tree(tmp_path)
    bad = corrupt_one_file(tree)
    dm = _datamodule(tree, batch_size=len(list(tree.glob("train/*/*"))))  # one batch holds every file
    with pytest.raises(UserError, match=f"{bad}: cannot be read as an image .*data.skip_bad_images=true"):
        _batches(dm, dm.train_dataloader())


def test_a_skipped_file_keeps_the_training_batch_full_and_its_count_survives_a_resume(tmp_path):
    tree = make_tree(tmp_path)
    bad = corrupt_one_file(tree)
    dm = _datamodule(tree, batch_size=23, skip_bad_images=True)  # one batch holds every file
    [(images, labels)] = _batches(dm, dm.train_dataloader())
    assert images.shape == (23, 3, 32, 32) and labels.shape == (23,)  # mixup needs the batch it asked for
    assert list(dm.skipped) == [str(bad)]
    resumed = _datamodule(tree, batch_size=23, skip_bad_images=True)
    resumed.load_state_dict(dm.state_dict())
    assert list(resumed.skipped) == [str(bad)]


def test_skip_bad_images_drops_counts_and_reports_them(tmp_path, caplog):
    tree = make_tree(tmp_path)
    bad = corrupt_one_file(tree)
    overrides = [
        "data=imagenet",
        "model=vit_tiny",
        f"data.root={tree}",
        "data.img_size=32",
        "data.batch_size=23",  # every training image in one batch, so the bad one is met
        "data.num_workers=2",
        "data.skip_bad_images=true",
        "callbacks.knn_monitor=null",
        "model.embed_dim=32",
        "model.depth=1",
        "model.num_heads=2",
        "model.patch_size=8",
        "task.decoder_width=16",
        "task.decoder_depth=1",
        "task.decoder_heads=2",
        "trainer.max_epochs=2",
        "task.warmup_epochs=1",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
    ]
    results = run(compose_config(overrides, tmp_path / "run"))
    assert results["global_step"] == 2
    assert results["skipped_images"] == 1  # met in both epochs, counted once
    assert json.loads((tmp_path / "run" / "results.json").read_text())["skipped_images"] == 1
    assert f"skipped {bad} (" in caplog.text
    assert sorted(p.name for p in (tmp_path / "run" / "reconstructions").iterdir()) == ["epoch_0001.png"]


def test_worker_augmentation_is_a_function_of_seed_epoch_and_sample(tmp_path):
    """Any worker count draws the same crops, and a loader resumed mid-epoch continues with exactly
    the batches the uninterrupted one would have given: preemption resumes bit-identical."""
    from maelab.data.transforms import RandomResizedCropFlip

    tree = make_tree(tmp_path)

    def epoch_batches(workers: int, resume_batches: int = 0) -> list[torch.Tensor]:
        dm = _datamodule(tree, batch_size=4, num_workers=workers)
        dm.train_transform = RandomResizedCropFlip(32).per_image()
        if resume_batches:
            dm.load_state_dict({"train_position": {"epoch": 1, "batches": resume_batches, "layout": dm._layout()}})
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(1)
        return [images for images, _ in _batches(dm, loader)]

    straight = epoch_batches(workers=0)
    assert len(straight) == 5  # 22 images, batch 4
    for a, b in zip(straight, epoch_batches(workers=2)):
        assert torch.equal(a, b)
    resumed = epoch_batches(workers=2, resume_batches=2)
    assert len(resumed) == 3
    for a, b in zip(straight[2:], resumed):
        assert torch.equal(a, b)
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    epoch_batches(workers=0)  # augmenting in the main process leaves its random stream alone
    assert torch.equal(torch.rand(1), before)
