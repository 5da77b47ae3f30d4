"""Datamodules: synthetic shapes, CIFAR-10 in both on-disk formats, the decode cache, errors."""

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from maelab.data import cifar10 as cifar10_module
from maelab.data.cifar10 import CIFAR10DataModule, DatasetNotFound
from maelab.data.synthetic import SyntheticDataModule, make_shapes
from maelab.errors import UserError

STATS = dict(mean=[0.5] * 3, std=[0.25] * 3)
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def cifar(root, **kwargs) -> CIFAR10DataModule:
    args = dict(root=str(root), download=False, batch_size=4, img_size=32, num_classes=10, **STATS)
    return CIFAR10DataModule(**{**args, **kwargs})


def test_synthetic_shapes_are_deterministic_labelled_and_varied():
    a, la = make_shapes(200, 32, 10, seed=3)
    b, lb = make_shapes(200, 32, 10, seed=3)
    c, _ = make_shapes(200, 32, 10, seed=4)
    assert a.dtype == torch.uint8 and a.shape == (200, 3, 32, 32)
    assert torch.equal(a, b) and torch.equal(la, lb) and not torch.equal(a, c)
    assert set(la.tolist()) == set(range(10))
    assert a.float().std() > 40  # shapes, stripes and colours, not a flat image


def test_in_memory_batches_are_gathered_from_indices():
    dm = SyntheticDataModule(num_train=64, num_test=16, batch_size=8, img_size=16, num_classes=4, **STATS)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch.split == "train" and batch.indices.shape == (8,)
    images, labels = dm.on_after_batch_transfer(batch, 0)
    assert images.dtype == torch.uint8 and images.shape == (8, 3, 16, 16)
    assert torch.equal(images, dm.splits["train"][0][batch.indices])
    assert torch.equal(labels, dm.splits["train"][1][batch.indices])
    assert len(dm.train_dataloader()) == 8 and len(dm.val_dataloader()) == 2


def test_val_size_holds_out_part_of_train():
    dm = SyntheticDataModule(num_train=64, num_test=16, batch_size=8, img_size=16, num_classes=4, val_size=10, **STATS)
    dm.setup()
    assert len(dm.splits["train"][0]) == 54 and len(dm.splits["val"][0]) == 10
    assert len(dm.splits["test"][0]) == 16


def write_image_folder(root: Path, per_class: int = 2) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = np.full((32, 32, 3), label * 20, dtype=np.uint8)
                pixels[0, 0] = rng.integers(0, 255, 3)
                Image.fromarray(pixels).save(folder / f"{i:04d}.png")


def test_image_folder_loads_labels_by_sorted_class_and_caches(tmp_path, monkeypatch):
    write_image_folder(tmp_path)
    dm = cifar(tmp_path)
    dm.prepare_data()
    dm.setup()
    images, labels = dm.splits["train"]
    assert images.shape == (20, 3, 32, 32) and images.dtype == torch.uint8
    assert dm.classes == CLASSES
    assert labels.tolist() == [i // 2 for i in range(20)]
    assert torch.all(images[labels == 3][:, :, 5, 5] == 60)  # PNG is lossless: the pixel we wrote
    assert len(list((tmp_path / ".maelab_cache").glob("cifar10_*.pt"))) == 2

    def no_decoding(path):
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(cifar10_module, "decode_image", no_decoding)
    again = cifar(tmp_path)
    again.setup()
    assert torch.equal(again.splits["train"][0], images)


def test_a_changed_folder_is_decoded_again(tmp_path):
    write_image_folder(tmp_path)
    cifar(tmp_path).setup()
    extra = tmp_path / "train" / "cat" / "9999.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(extra)
    dm = cifar(tmp_path)
    dm.setup()
    assert len(dm.splits["train"][0]) == 21
    assert len(list((tmp_path / ".maelab_cache").glob("cifar10_train_*.pt"))) == 1  # the stale one is gone


def test_torchvision_batches_format(tmp_path):
    batches = tmp_path / "cifar-10-batches-py"
    batches.mkdir()
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}", 3) for i in range(1, 6)] + [("test_batch", 4)]:
        entry = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": list(range(n))}
        (batches / name).write_bytes(pickle.dumps(entry))
    (batches / "batches.meta").write_bytes(pickle.dumps({"label_names": CLASSES}))
    dm = cifar(tmp_path)
    dm.setup()
    images, labels = dm.splits["train"]
    assert images.shape == (15, 3, 32, 32) and labels.tolist() == [0, 1, 2] * 5
    first = pickle.loads((batches / "data_batch_1").read_bytes())["data"][0]
    assert torch.equal(images[0].flatten(), torch.from_numpy(first))  # rows are CHW, R plane first
    assert len(dm.splits["test"][0]) == 4 and dm.classes == CLASSES


def test_missing_dataset_says_where_it_looked_and_what_to_set(tmp_path):
    with pytest.raises(DatasetNotFound) as err:
        cifar(tmp_path / "nowhere").prepare_data()
    message = str(err.value)
    assert "cifar-10-batches-py" in message and "nowhere/train/<class>/" in message
    assert "data.root" in message and "MAELAB_CIFAR10" in message


@pytest.mark.parametrize("problem", ["corrupt", "wrong_size", "not_an_image"])
def test_bad_files_stop_with_their_name(tmp_path, problem):
    write_image_folder(tmp_path, per_class=1)
    bad = tmp_path / "train" / "dog" / "bad.jpg"
    if problem == "corrupt":
        bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
    elif problem == "wrong_size":
        Image.fromarray(np.zeros((30, 32, 3), np.uint8)).save(bad)
    else:
        bad = bad.with_suffix(".txt")
        bad.write_text("notes")
    with pytest.raises(UserError, match=str(bad)):
        cifar(tmp_path).prepare_data()


@pytest.mark.slow
def test_real_cifar10_copy(cifar10_root):
    dm = cifar(cifar10_root)
    dm.prepare_data()
    dm.setup()
    train, test = dm.splits["train"], dm.splits["test"]
    assert train[0].shape == (50000, 3, 32, 32) and test[0].shape == (10000, 3, 32, 32)
    assert train[0].dtype == torch.uint8 and test[0].dtype == torch.uint8
    assert dm.classes == CLASSES
    assert torch.bincount(train[1]).tolist() == [5000] * 10
    assert torch.bincount(test[1]).tolist() == [1000] * 10
    # CIFAR-10's per-channel means (0.491, 0.482, 0.447), give or take JPEG
    means = train[0].float().mean(dim=(0, 2, 3)) / 255
    assert torch.allclose(means, torch.tensor([0.491, 0.482, 0.447]), atol=0.01)


def test_synthetic_images_follow_data_seed_and_the_run_seed_only_orders_them(tmp_path):
    from maelab.run.build import build
    from tests.conftest import TINY, compose_config

    def train_images(*overrides):
        datamodule, _, _ = build(compose_config([*TINY, *overrides], tmp_path))
        datamodule.setup()
        return datamodule.splits["train"][0]

    reference = train_images("seed=0", "data.seed=0")
    assert torch.equal(train_images("seed=1", "data.seed=0"), reference)  # another run seed: the same images
    assert not torch.equal(train_images("seed=0", "data.seed=1"), reference)  # another data seed: other images


def test_debug_short_wins_over_the_experiment_in_either_order(tmp_path):
    from maelab.config import apply_debug
    from tests.conftest import compose_config

    for order in (["+experiment=finetune_vitt_cifar10", "+debug=short"], ["+debug=short", "+experiment=mae_vitb"]):
        cfg = apply_debug(compose_config(order, tmp_path))
        assert (cfg.trainer.max_epochs, cfg.trainer.limit_train_batches, cfg.trainer.limit_test_batches) == (1, 16, 2)
        assert cfg.callbacks.get("knn_monitor") is None and cfg.debug is None
