"""data=folder: any folder of images, labelled or not, RGB or grayscale, odd files included,
trained end to end through the real config (pretrain, fine-tune, export)."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from maelab.data.files import read_rgb
from maelab.data.folder import FolderDataModule
from maelab.errors import UserError
from maelab.run.fit import run
from tests.conftest import FROM_FILES, compose_config

FOLDER = ["data=folder", *FROM_FILES, "trainer.max_epochs=2"]
GRAY = ["data.channels=1", "data.mean=[0.5]", "data.std=[0.25]"]


def odd_files(folder, n: int = 24, seed: int = 0) -> None:
    """Photos as people have them: in dated folders, of every mode and format, one rotated by
    EXIF, plus a file that is not an image."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        d = folder / f"2024-0{i % 3 + 1}"
        d.mkdir(parents=True, exist_ok=True)
        rgb = rng.integers(0, 255, (30 + i % 5, 40, 3), dtype=np.uint8)
        kind = i % 6
        if kind == 0:
            Image.fromarray(rgb).save(d / f"{i}.jpg", quality=90)
        elif kind == 1:  # 16-bit grayscale, as scans and microscopes write them
            Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(d / f"{i}.png")
        elif kind == 2:
            Image.fromarray(rgb).convert("P").save(d / f"{i}.png")
        elif kind == 3:
            Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(d / f"{i}.png")  # RGBA
        elif kind == 4:
            Image.fromarray(rgb[..., 0]).save(d / f"{i}.webp")
        else:
            image = Image.fromarray(rgb)
            exif = image.getexif()
            exif[0x0112] = 6  # rotated 90 degrees: the upright image is 40 x 30+
            image.save(d / f"{i}.jpg", exif=exif)
    (folder / "notes.txt").write_text("not an image")


def stripes(folder, per_class: int = 24, seed: int = 1) -> None:
    """Two classes of grayscale images, horizontal and vertical stripes of random width and phase
    under noise: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    for name in ("horizontal", "vertical"):
        (folder / name).mkdir(parents=True)
        for i in range(per_class):
            period, phase = rng.integers(4, 9), rng.integers(0, 8)
            wave = ((np.arange(24) + phase) // (period // 2) % 2 * 160).astype(np.float64)
            image = np.tile(
                wave[:, None] if name == "horizontal" else wave[None, :], (1, 24) if name == "horizontal" else (24, 1)
            )
            image = np.clip(image + rng.normal(0, 30, (24, 24)) + 40, 0, 255).astype(np.uint8)
            Image.fromarray(image).save(folder / name / f"{i}.png")


def test_odd_files_load_upright_and_16_bit_scaled_not_clipped(tmp_path):
    odd_files(tmp_path)
    values = np.asarray(read_rgb(tmp_path / "2024-02" / "1.png"))
    assert values.shape == (31, 40, 3) and 100 < values.mean() < 155  # clipped, it would be ~255
    assert read_rgb(tmp_path / "2024-03" / "5.jpg").size == (30, 40)  # stored 40 x 30, EXIF-rotated upright


def test_a_folder_of_any_files_lists_its_images_labels_by_rule_and_holds_out_a_share(tmp_path, caplog):
    odd_files(tmp_path / "photos")
    with caplog.at_level(logging.INFO):
        dm = FolderDataModule(str(tmp_path / "photos"), img_size=16, batch_size=4, num_workers=0, val_size=0.25)
    assert "left out 1 files that are not images (1 .txt)" in caplog.text
    dm.setup()
    assert (len(dm.files["train"]), len(dm.files["val"])) == (18, 6) and dm.classes == ["2024-01", "2024-02", "2024-03"]
    images, labels = dm.on_before_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert images.dtype == torch.uint8 and images.shape == (4, 3, 16, 16)
    unlabelled = FolderDataModule(str(tmp_path / "photos"), labels="none", img_size=16, val_size=3, channels=1,
                                  mean=[0.5], std=[0.25], num_workers=0)  # fmt: skip
    unlabelled.setup()
    assert unlabelled.num_classes == 0 and len(unlabelled.files["val"]) == 3
    images, labels = unlabelled.on_before_batch_transfer(next(iter(unlabelled.val_dataloader())), 0)
    assert images.shape == (3, 1, 16, 16) and (labels == -1).all()
    same = FolderDataModule(str(tmp_path / "photos"), labels="none", img_size=16, val_size=3, num_workers=0)
    same.setup()
    assert list(same.files["val"].paths) == list(unlabelled.files["val"].paths)  # split_seed fixes the share


def test_bad_folders_and_settings_are_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("x")
    with pytest.raises(UserError, match=r"data.root=.*empty: no image files \(.*\.jpg.*\) under"):
        FolderDataModule(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="data.root=.*missing: no such folder"):
        FolderDataModule(str(tmp_path / "missing"))
    odd_files(tmp_path / "photos", n=6)
    with pytest.raises(UserError, match=r"data.mean has 3 values for data.channels=1"):
        FolderDataModule(str(tmp_path / "photos"), channels=1)
    with pytest.raises(UserError, match=r"data.val_size=6 holds out 6 of 6 images"):
        FolderDataModule(str(tmp_path / "photos"), val_size=6).setup()
    (tmp_path / "photos" / "loose.png").write_bytes((tmp_path / "photos" / "2024-01" / "0.jpg").read_bytes())
    with pytest.raises(UserError, match=r"data.labels=folders: .*loose.png is not in a class folder; use data.labels"):
        FolderDataModule(str(tmp_path / "photos"), labels="folders")
    (tmp_path / "broken").mkdir()
    for i in range(4):
        (tmp_path / "broken" / f"{i}.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    dm = FolderDataModule(str(tmp_path / "broken"), img_size=16, batch_size=2, val_size=1, num_workers=0)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    with pytest.raises(UserError, match=r"broken/\d.jpg: cannot be read as an image .*skip_bad_images"):
        dm.on_before_batch_transfer(batch, 0)


@pytest.mark.slow
def test_a_grayscale_mae_pretrains_unlabelled_then_fine_tunes_and_exports(tmp_path, caplog):
    """The single-channel chain: pretrain on unlabelled grayscale images (the k-NN monitor says it
    is skipped), fine-tune on labelled ones, export for timm and Hugging Face."""
    odd_files(tmp_path / "photos", n=48)
    pretrain = ["+experiment=quickstart", *FOLDER, *GRAY, f"data.root={tmp_path / 'photos'}", "data.labels=none"]
    with caplog.at_level(logging.INFO):
        results = run(compose_config([*pretrain, "data.val_size=8"], tmp_path / "pretrain"))
    assert "k-NN monitor skipped: the images have no labels" in caplog.text
    assert np.isfinite(results["last"]["val/loss"]) and "val/knn_acc" not in results["last"]
    ckpt = results["last_checkpoint"]
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert state["model.patch_embed.proj.weight"].shape == (32, 1, 4, 4)
    assert state["model.decoder_pred.weight"].shape[0] == 16  # 4 x 4 patches of one channel

    stripes(tmp_path / "labelled")
    finetune = ["+experiment=quickstart_finetune", *FOLDER, *GRAY, f"data.root={tmp_path / 'labelled'}",
                "data.val_size=12", "task.base_lr=0.05", f"task.pretrained={ckpt}", "trainer.max_epochs=6"]  # fmt: skip
    results = run(compose_config(finetune, tmp_path / "finetune"))
    assert results["last"]["val/acc1"] > 0.6  # two balanced classes: chance is 0.5 (this run: 0.83)

    from maelab.weights.hf_export import export_hf
    from maelab.weights.timm import export

    meta = export(results["last_checkpoint"], str(tmp_path / "gray.pth"))
    assert meta["kwargs"]["in_chans"] == 1
    import timm

    model = timm.create_model(meta["timm_model"], pretrained=False, **meta["kwargs"])
    model.load_state_dict(torch.load(tmp_path / "gray.pth"))
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 2)
    export_hf(ckpt, str(tmp_path / "hf"))
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["num_channels"] == 1

    with pytest.raises(UserError, match="a classifier needs labels and data.root=.* has none"):
        run(compose_config([*finetune[:-3], f"data.root={tmp_path / 'photos'}", "data.labels=none",
                            f"task.pretrained={ckpt}"], tmp_path / "unlabelled"))  # fmt: skip


def test_a_fraction_held_out_is_for_folders_only():
    from maelab.config.checks import validate

    cfg = compose_config(["+experiment=quickstart", "data.val_size=0.1"], Path("unused"))
    with pytest.raises(UserError, match=r"data.val_size=0.1: a fraction is for data=folder; give a number of images"):
        validate(cfg)
