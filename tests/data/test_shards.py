"""maelab prepare-data and data=shards: a folder packed into LitData chunks as its files' bytes,
streamed back through the real config, disjoint over two ranks, resumed mid-epoch exactly."""

import csv
import io
import json
import logging
import signal
import sys

import numpy as np
import pytest
import torch
from litdata import StreamingDataset
from PIL import Image

from maelab.commands.prepare_data import main as prepare
from maelab.data.folder import FolderDataModule
from maelab.data.shards import ImageShards, ShardsDataModule
from maelab.errors import UserError
from maelab.run.fit import run
from tests.conftest import FROM_FILES, REPO, compose_config, maelab, weights
from tests.ddp_probe import fingerprint

SHARDS = [
    "+experiment=quickstart",
    "data=shards",
    *FROM_FILES,
    "callbacks.knn_monitor=null",  # it needs a split held in memory; shards stream
]


def pictures(folder, per_class: int = 24, classes=("cat", "dog"), seed: int = 0) -> None:
    """Distinct random images in class folders (or loose with classes=()): JPEG, PNG and 16-bit PNG."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes or [""]):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            rgb = rng.integers(0, 255, (20 + i % 5, 24, 3), dtype=np.uint8)
            if i % 3 == 0:
                Image.fromarray(rgb).save(folder / name / f"{c}_{i}.jpg", quality=90)
            elif i % 3 == 1:
                Image.fromarray(rgb).save(folder / name / f"{c}_{i}.png")
            else:
                Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(folder / name / f"{c}_{i}.png")


def shards(tmp_path, *args: str, per_class: int = 24, classes=("cat", "dog")):
    pictures(tmp_path / "src", per_class, classes)
    assert prepare([str(tmp_path / "src"), str(tmp_path / "shards"), "--workers", "1", *args]) == 0
    return tmp_path / "shards"


def test_a_labelled_folder_becomes_chunks_of_its_files_bytes_with_the_folders_held_out_share(tmp_path):
    out = shards(tmp_path, "--val-size", "0.25", "--chunk-bytes", "8KB")
    meta = json.loads((out / "maelab.json").read_text())
    assert meta["classes"] == ["cat", "dog"] and meta["counts"] == {"train": 36, "val": 12}
    assert meta["source"] == str(tmp_path / "src") and meta["skipped"] == []
    assert len(json.loads((out / "train" / "index.json").read_text())["chunks"]) > 2  # ~1.5 KB files, 8 KB chunks
    train = StreamingDataset(str(out / "train"))
    names = set()
    for i in range(len(train)):
        item = train[i]
        name = bytes(item["name"]).decode()
        assert bytes(item["image"]) == (tmp_path / "src" / name).read_bytes()  # not re-encoded
        assert item["label"] == ["cat", "dog"].index(name.split("/")[0])
        names.add(name)
    assert len(names) == 36
    # the same images held out as data=folder holds out with the same val_size and split_seed
    folder = FolderDataModule(str(tmp_path / "src"), val_size=0.25, num_workers=0)
    folder.setup()
    held = {str(p.relative_to(tmp_path / "src")) for p, _ in folder.files["val"]}
    val = StreamingDataset(str(out / "val"))
    assert {bytes(val[i]["name"]).decode() for i in range(len(val))} == held


def test_unlabelled_images_with_a_validation_folder_train_as_grayscale(tmp_path):
    pictures(tmp_path / "val", per_class=5, classes=())
    out = shards(tmp_path, "--val-dir", str(tmp_path / "val"), per_class=16, classes=())
    meta = json.loads((out / "maelab.json").read_text())
    assert meta["classes"] == [] and meta["counts"] == {"train": 16, "val": 5}
    gray = ShardsDataModule(str(out), channels=1, mean=[0.5], std=[0.25], img_size=16, batch_size=4, num_workers=0)
    assert gray.num_classes == 0
    images, labels = gray.on_before_batch_transfer(next(iter(gray.train_dataloader())), 0)
    assert images.dtype == torch.uint8 and images.shape == (4, 1, 16, 16) and (labels == -1).all()
    images, labels = gray.preview_images(3)
    assert images.shape == (3, 1, 16, 16)
    # an object store's URL goes through LitData's downloader and cache (local: is its local stand-in)
    remote = ShardsDataModule(f"local:{out}", cache_dir=str(tmp_path / "cache"), img_size=16, num_workers=0)
    assert remote.preview_images(2)[0].shape == (2, 3, 16, 16)


def test_the_epoch_order_is_the_run_seeds(tmp_path):
    out = shards(tmp_path, "--val-size", "8", per_class=12)

    def order(seed: int, epoch: int = 0) -> list[str]:
        dm = ShardsDataModule(str(out), img_size=16, batch_size=4, num_workers=0, run_seed=seed)
        loader = dm.train_dataloader()
        loader.next_epoch = lambda: epoch
        return [fingerprint(image) for batch in loader for image in batch.images]

    first = order(0)
    assert len(first) == 16 and order(0) == first
    assert order(1) != first and order(0, epoch=1) != first


def test_unreadable_files_stop_preparation_with_their_name_or_are_listed(tmp_path):
    pictures(tmp_path / "src", per_class=6)
    bad = tmp_path / "src" / "cat" / "broken.jpg"
    data = io.BytesIO()
    Image.new("RGB", (40, 40)).save(data, format="JPEG")
    bad.write_bytes(data.getvalue()[:200])  # a truncated download: its header opens, its pixels do not
    (tmp_path / "src" / "dog" / "empty.png").write_bytes(b"")
    args = [str(tmp_path / "src"), str(tmp_path / "out"), "--workers", "2", "--val-size", "2"]
    with pytest.raises(UserError, match=r"cat/broken.jpg: cannot be read as an image .*1 more.*--skip-bad-images"):
        prepare(args)
    assert prepare([*args, "--skip-bad-images"]) == 0
    meta = json.loads((tmp_path / "out" / "maelab.json").read_text())
    assert sorted(s["path"] for s in meta["skipped"]) == [str(bad), str(tmp_path / "src" / "dog" / "empty.png")]
    assert meta["counts"] == {"train": 10, "val": 2}
    with pytest.raises(UserError, match=r"OUT .*out is not empty; .*--overwrite"):
        prepare([*args, "--skip-bad-images"])
    assert prepare([*args, "--skip-bad-images", "--overwrite", "--val-size", "3"]) == 0
    assert json.loads((tmp_path / "out" / "maelab.json").read_text())["counts"] == {"train": 9, "val": 3}


def test_bad_sources_and_settings_are_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    out = str(tmp_path / "out")
    for argv, message in [
        ([str(tmp_path / "missing"), out], r"SRC .*missing: no such folder"),
        ([str(tmp_path / "empty"), out], r"empty: no image files \(.*\.jpg.*\) under it"),
        ([str(tmp_path / "empty"), "s3://bucket/shards"], r"write the shards to a folder, then copy it"),
        ([str(tmp_path / "empty"), out, "--chunk-bytes", "lots"], r"--chunk-bytes lots: expected a size"),
    ]:
        with pytest.raises(UserError, match=message):
            prepare(argv)
    pictures(tmp_path / "src", per_class=2)
    with pytest.raises(UserError, match=r"--val-size and --val-dir: choose one"):
        prepare([str(tmp_path / "src"), out, "--val-dir", str(tmp_path / "src"), "--val-size", "1"])
    with pytest.raises(UserError, match=r"--val-size=4 holds out 4 of 4 images"):
        prepare([str(tmp_path / "src"), out, "--val-size", "4"])
    with pytest.raises(UserError, match=r"data.root=.*nowhere: no maelab.json there; .*prepare-data"):
        ShardsDataModule(str(tmp_path / "nowhere"))


def corrupt_one_training_image(out, src) -> str:
    """Overwrites a PNG's header inside its chunk, as a bad disk or a broken copy would: its name."""
    train = StreamingDataset(str(out / "train"))
    name = next(n for n in (bytes(train[i]["name"]).decode() for i in range(len(train))) if n.endswith(".png"))
    png = (src / name).read_bytes()
    for chunk in (out / "train").glob("chunk-*.bin"):
        data = chunk.read_bytes()
        if png in data:
            at = data.index(png) + 8  # past the PNG signature: the IHDR chunk
            chunk.write_bytes(data[:at] + bytes(16) + data[at + 16 :])
            return name
    raise AssertionError(f"{name} is in no chunk")


def test_pretraining_streams_from_shards_and_skips_or_names_a_corrupt_image(tmp_path):
    out = shards(tmp_path, "--val-size", "8")
    bad = corrupt_one_training_image(out, tmp_path / "src")
    overrides = [*SHARDS, f"data.root={out}", "trainer.max_epochs=2", "data.skip_bad_images=true"]
    results = run(compose_config(overrides, tmp_path / "run"))
    assert results["global_step"] == 2 * 40 // 8 and np.isfinite(results["last"]["val/loss"])
    assert results["skipped_images"] == 1  # met in both epochs, counted once
    assert list((tmp_path / "run").rglob("*.png"))  # the reconstruction grid drew val images
    dm = ShardsDataModule(str(out), img_size=16, batch_size=8, num_workers=0)
    with pytest.raises(UserError, match=rf"shards/train: {bad}: cannot be read as an image .*skip_bad_images"):
        for batch in dm.train_dataloader():
            dm.on_before_batch_transfer(batch, 0)


@pytest.mark.slow
def test_two_ranks_train_on_every_sample_once_an_epoch_and_validate_on_each_once(tmp_path):
    out = shards(tmp_path, "--val-size", "18", per_class=25)  # 32 training images: 2 ranks x 2 batches of 8
    probe = tmp_path / "probe"
    done = maelab(
        "train", *SHARDS, f"data.root={out}", "augment=none", "data.num_workers=1", "data.eval_batch_size=4",
        "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_epochs=2",
        "+callbacks.probe._target_=tests.ddp_probe.RecordRanks", f"+callbacks.probe.out_dir={probe}",
        f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, env={"PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    r0, r1 = (torch.load(probe / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    dm = ShardsDataModule(str(out), img_size=16, num_workers=0)
    every = {fingerprint(image) for image, _ in ImageShards(str(out / "train"), dm.eval_transform(), 0, False)}
    assert len(every) == 32 and len(r0["train"]) == len(r1["train"]) == 2 * 16
    for epoch in (0, 1):  # augment=none: an image's fingerprint names it
        mine = [r["train"][epoch * 16 : (epoch + 1) * 16] for r in (r0, r1)]
        assert sorted(mine[0] + mine[1]) == sorted(every)  # each image once, on one rank
    assert r0["train"][:16] != r0["train"][16:]  # another order each epoch
    # each validation: the 18 images once over both ranks (LitData gives the remainder to the last rank)
    assert len(r0["val"]) == 2 * 8 and len(r1["val"]) == 2 * 10
    assert len(set(r0["val"][:8] + r1["val"][:10])) == 18 and set(r0["val"] + r1["val"]) == set(
        r0["val"][:8] + r1["val"][:10]
    )


def test_what_a_resumed_epoch_keeps_when_the_run_changes(tmp_path, caplog):
    """The loader's state continues an epoch exactly in the same layout; with another worker count
    LitData finishes it without repeating or skipping a sample; with another batch size or seed the
    epoch starts again (a warning says so)."""
    out = shards(tmp_path, "--val-size", "8", per_class=12)  # 16 training images: 4 batches of 4

    def datamodule(**kwargs) -> ShardsDataModule:
        return ShardsDataModule(str(out), img_size=16, **{"batch_size": 4, "num_workers": 0, **kwargs})

    def names(batches) -> list[str]:
        return [fingerprint(image) for batch in batches for image in batch.images]

    def interrupted(**kwargs) -> tuple[list[str], dict]:
        dm = datamodule(**kwargs)
        batches = iter(dm.train_dataloader())
        trained = names([next(batches), next(batches)])
        position = {"epoch": 0, "batches": 2, "layout": dm._layout(), "stream": dm.stream()}
        return trained, {"train_position": {**position, "loader": dm.train_loader.state_dict()}, "skipped": {}}

    def resumed(state: dict, **kwargs) -> list[str]:
        dm = datamodule(**kwargs)
        dm.load_state_dict(state)
        return names(dm.train_dataloader())

    straight = names(datamodule().train_dataloader())
    trained, state = interrupted()
    assert trained == straight[:8] and resumed(state) == straight[8:]
    trained, state = interrupted(num_workers=2)
    rest = resumed(state, num_workers=1)
    assert len(rest) == 8 and sorted(trained + rest) == sorted(straight)
    with caplog.at_level(logging.WARNING):
        assert len(resumed(interrupted()[1], batch_size=2)) == 16  # the whole epoch in the new layout's order
        assert resumed(interrupted()[1], run_seed=1) == names(datamodule(run_seed=1).train_dataloader())
    assert "batch size 4 on 1 rank(s), this run has batch size 2" in caplog.text
    assert "seed 0, this run shards at" in caplog.text and "epoch 0 starts again from its first batch" in caplog.text


@pytest.mark.slow
def test_a_run_resumed_mid_epoch_or_at_an_epoch_end_matches_an_uninterrupted_one(tmp_path, monkeypatch):
    """Exact: the same batches (LitData's position, with 2 loader workers) and the same crops
    (each sample's from seed, epoch and index), so the same weights and losses."""
    out = shards(tmp_path, "--val-size", "8")  # 40 training images: 5 steps an epoch
    common = [*SHARDS, f"data.root={out}", "data.num_workers=2", "trainer.max_epochs=2"]
    straight = run(compose_config(common, tmp_path / "straight"))
    assert straight["global_step"] == 10

    crash = ["+callbacks.crash._target_=tests.conftest.CrashAt", "+callbacks.crash.step=7"]
    with pytest.raises(RuntimeError, match="node lost"):
        run(compose_config(common + crash, tmp_path / "crashed"))  # last.ckpt: the end of the first epoch
    ends = [run(compose_config(common + ["ckpt_path=last"], tmp_path / "crashed"))]

    signalled = common + ["+callbacks.signal._target_=tests.conftest.SignalAt", "+callbacks.signal.step=3"]
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    monkeypatch.setenv("SUBMITIT_LOCAL_JOB_ID", "4242")
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: sys.exit(3))  # submitit: requeue, exit
    try:
        with pytest.raises(SystemExit):
            run(compose_config(signalled, tmp_path / "job"))  # saved after step 3, 3 batches into the first epoch
    finally:
        signal.signal(signal.SIGUSR2, previous)
    ends.append(run(compose_config(signalled, tmp_path / "job")))  # the requeued job

    def losses(run_dir):
        rows = csv.DictReader((run_dir / "csv" / "metrics.csv").read_text().splitlines())
        return {int(r["step"]): float(r["train/loss"]) for r in rows if r["train/loss"]}

    for resumed, run_dir in zip(ends, ("crashed", "job")):
        a, b = weights(straight["last_checkpoint"]), weights(resumed["last_checkpoint"])
        assert all(torch.equal(a[key], b[key]) for key in a), run_dir
        assert losses(tmp_path / run_dir) == losses(tmp_path / "straight")
