"""``maelab embed``: the encoder's unmasked features of every image, with names and labels, and
the k-NN top-1 the monitor would compute."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from maelab.callbacks.knn_monitor import knn_accuracy
from maelab.commands.embed import main, split_images
from maelab.data.transforms import model_input
from maelab.errors import UserError
from maelab.modules.pretrain import PretrainModule
from maelab.run.fit import run
from tests.conftest import TINY, compose_config


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pretrain")
    return Path(run(compose_config(TINY + ["trainer.max_epochs=1"], out))["last_checkpoint"])


def module_of(checkpoint: Path) -> PretrainModule:
    state = torch.load(checkpoint, weights_only=True)
    module = PretrainModule(**state["hyper_parameters"])
    module.load_state_dict(state["state_dict"])
    return module.eval()


def test_the_features_are_the_encoder_s_unmasked_tokens_and_knn_votes_as_the_monitor(checkpoint, tmp_path, capsys):
    out = tmp_path / "test.pt"
    assert main([str(checkpoint), "--images", "synthetic", "--out", str(out), "--knn", "--batch-size", "100"]) == 0
    saved = torch.load(out, weights_only=True)
    module = module_of(checkpoint)
    images, _, labels = split_images("synthetic", "test", module.img_size)
    with torch.no_grad():
        tokens = module.model.forward_features(model_input(images, module.mean, module.std, module.img_size))
    assert saved["features"].shape == (256, 32) and torch.allclose(saved["features"], tokens[:, 0], atol=1e-5)
    assert torch.equal(saved["labels"], labels) and saved["names"][:2] == ["synthetic/test/0", "synthetic/test/1"]

    bank_images, _, bank_labels = split_images("synthetic", "train", module.img_size)
    with torch.no_grad():
        bank = module.model.forward_features(model_input(bank_images, module.mean, module.std, module.img_size))[:, 0]
    expected = knn_accuracy(bank, bank_labels, tokens[:, 0], labels, num_classes=10, k=20)
    assert f"k-NN top-1 (k=20, test against train): {expected:.4f}" in capsys.readouterr().out
    assert expected > 0.1  # above chance on 10 classes

    assert main([str(checkpoint), "--images", "synthetic", "--out", str(tmp_path / "m.npz"), "--pool", "mean"]) == 0
    mean = np.load(tmp_path / "m.npz")
    assert np.allclose(mean["features"], tokens[:, 1:].mean(dim=1).numpy(), atol=1e-5)
    assert list(mean["labels"][:5]) == labels[:5].tolist()


def write_folder(root: Path, classes: bool) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(6):
        folder = root / (("cat", "dog")[i % 2] if classes else "")
        folder.mkdir(parents=True, exist_ok=True)
        paths.append(folder / f"{i}.png")
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(paths[-1])
    return paths


def test_a_folder_gives_names_and_its_class_folders_labels_and_bad_files_are_named_or_skipped(checkpoint, tmp_path):
    write_folder(tmp_path / "labelled", classes=True)
    main([str(checkpoint), "--images", str(tmp_path / "labelled"), "--out", str(tmp_path / "a.pt")])
    saved = torch.load(tmp_path / "a.pt", weights_only=True)
    assert saved["names"][:2] == ["cat/0.png", "cat/2.png"] and saved["labels"].tolist() == [0, 0, 0, 1, 1, 1]

    paths = write_folder(tmp_path / "plain", classes=False)
    paths[2].write_bytes(b"not a png")
    with pytest.raises(UserError, match=rf"{paths[2]}: unreadable .*--skip-bad-images"):
        main([str(checkpoint), "--images", str(tmp_path / "plain"), "--out", str(tmp_path / "b.pt")])
    main([str(checkpoint), "--images", str(tmp_path / "plain"), "--out", str(tmp_path / "b.pt"), "--skip-bad-images"])
    saved = torch.load(tmp_path / "b.pt", weights_only=True)
    assert saved["features"].shape[0] == 5 and "2.png" not in saved["names"] and saved["labels"] is None

    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no image files"):
        main([str(checkpoint), "--images", str(tmp_path / "empty"), "--out", str(tmp_path / "c.pt")])
    with pytest.raises(UserError, match=r"expected a .pt .* or .npz"):
        main([str(checkpoint), "--images", "synthetic", "--out", str(tmp_path / "c.npy")])


@pytest.mark.skipif("MAELAB_CIFAR10" not in os.environ, reason="needs the CIFAR-10 copy (MAELAB_CIFAR10)")
def test_cifar10_s_test_split_is_embedded_whole_with_its_labels(checkpoint, tmp_path):
    main([str(checkpoint), "--images", "cifar10", "--out", str(tmp_path / "c.npz")])
    saved = np.load(tmp_path / "c.npz")
    assert saved["features"].shape == (10000, 32) and np.bincount(saved["labels"]).tolist() == [1000] * 10


def test_knn_on_a_folder_votes_with_its_train_split_against_the_split_asked_for(checkpoint, tmp_path, capsys):
    write_folder(tmp_path / "data" / "train", classes=True)
    write_folder(tmp_path / "data" / "val", classes=True)
    args = [str(checkpoint), "--images", str(tmp_path / "data"), "--out", str(tmp_path / "v.pt"), "--knn"]
    main([*args, "--split", "val"])
    top1 = float(capsys.readouterr().out.split("k-NN top-1 (k=20, val against train): ")[1])
    assert top1 == 1.0  # the same six images in both splits: each finds itself first
    with pytest.raises(UserError, match=r"--knn votes with train/ against test/, and .*data/test is missing"):
        main(args)
    write_folder(tmp_path / "plain" / "train", classes=False)
    write_folder(tmp_path / "plain" / "val", classes=False)
    with pytest.raises(UserError, match="has no class folders"):
        main([str(checkpoint), "--images", str(tmp_path / "plain"), "--out", str(tmp_path / "w.pt"), "--knn",
              "--split", "val"])  # fmt: skip


def test_imagenet_is_the_folder_of_maelab_imagenet_and_defaults_to_its_val_split(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("MAELAB_IMAGENET", str(tmp_path / "imagenet"))
    with pytest.raises(UserError, match=r"imagenet/val is not a folder; ImageNet has train/ and val/"):
        main([str(checkpoint), "--images", "imagenet", "--out", str(tmp_path / "i.pt")])
    write_folder(tmp_path / "imagenet" / "train", classes=True)
    write_folder(tmp_path / "imagenet" / "val", classes=True)
    extra = tmp_path / "imagenet" / "train" / "dog" / "extra.png"
    extra.write_bytes((tmp_path / "imagenet" / "train" / "dog" / "1.png").read_bytes())  # train/ has 7: val/ is read
    for workers in ("0", "2"):  # read in this process, and by two DataLoader workers: the same features
        main([str(checkpoint), "--images", "imagenet", "--out", str(tmp_path / f"i{workers}.pt"), "--workers", workers,
              "--batch-size", "4"])  # fmt: skip
    inline, parallel = (torch.load(tmp_path / f"i{w}.pt", weights_only=True) for w in ("0", "2"))
    assert torch.equal(inline["features"], parallel["features"]) and inline["names"] == parallel["names"]
    assert inline["names"][0] == "cat/0.png" and inline["labels"].tolist() == [0, 0, 0, 1, 1, 1]  # val/'s 6
