"""The command line, run in subprocesses the way users run it."""

import re
from pathlib import Path

import pytest
from PIL import Image

from maelab.config import config_dir
from tests.conftest import maelab

EXPERIMENT_FILES = sorted(p.stem for p in Path(config_dir(), "experiment").glob("*.yaml"))
EXPERIMENTS = [name for name in EXPERIMENT_FILES if not name.startswith("_")]  # _*.yaml: bases they share


@pytest.mark.slow
def test_quickstart_writes_checkpoint_reconstructions_and_results(tmp_path):
    run_dir = tmp_path / "run"
    done = maelab("train", "+experiment=quickstart", "trainer.max_epochs=2", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (run_dir / "checkpoints" / "last.ckpt").stat().st_size > 1_000_000
    png = run_dir / "reconstructions" / "epoch_0001.png"
    with Image.open(png) as im:
        # 8 rows x 3 columns of 32 px images with 2 px padding, enlarged 3x to be legible
        assert im.size == (3 * (3 * 32 + 4 * 2), 3 * (8 * 32 + 9 * 2))
    assert (run_dir / ".hydra" / "config.yaml").is_file() and (run_dir / "results.json").is_file()


@pytest.mark.parametrize(
    "override,message",
    [
        ("task.mask_ratio=1.5", "task.mask_ratio=1.5: expected a number in (0, 1)"),
        ("task.mask_ratio=abc", "task.mask_ratio='abc': expected a number in (0, 1)"),
        ("data.img_size=30", "data.img_size=30: must be divisible by model.patch_size=4"),
        ("model.num_heads=3", "model.embed_dim=128: must be divisible by model.num_heads=3"),
        ("data.batch_size=0", "data.batch_size=0: expected a positive integer"),
        ("trainer.max_epochs=0", "trainer.max_epochs=0: expected a positive integer, or -1"),
        ("augment.scale=[0.5,0.2]", "augment.scale=[0.5, 0.2]: expected [min, max] area fractions"),
        ("signal_check_every_n_steps=0", "signal_check_every_n_steps=0: expected a positive integer"),
    ],
)
def test_a_bad_value_stops_before_training_with_one_clear_message(tmp_path, override, message):
    done = maelab("train", "+experiment=quickstart", override, cwd=tmp_path)
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "outputs").exists() or not list((tmp_path / "outputs").rglob("*.ckpt"))


def test_a_typo_in_a_key_names_the_key(tmp_path):
    done = maelab("train", "+experiment=quickstart", "task.mask_ration=0.9", cwd=tmp_path)
    assert done.returncode == 2
    assert "did you mean task.mask_ratio?" in done.stderr


def test_an_unknown_experiment_lists_the_known_ones(tmp_path):
    done = maelab("train", "+experiment=quikstart", cwd=tmp_path)
    assert done.returncode != 0
    assert "quikstart" in done.stderr and "quickstart" in done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(tmp_path, experiment):
    done = maelab("train", f"+experiment={experiment}", "--cfg", "job", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"name: {experiment}" in done.stdout
    # every callback the run will have is in the composed config, the always-on ones too
    callbacks = re.split(r"\n\S", done.stdout.split("\ncallbacks:\n")[1])[0]
    for name in ("last_checkpoint", "throughput", "random_state", "metric_history", "elapsed_time", "preemption"):
        assert f"\n  {name}:\n    _target_: maelab." in "\n" + callbacks, (experiment, name)


def test_help_lists_commands_and_config_groups(tmp_path):
    top = maelab("--help", cwd=tmp_path)
    assert top.returncode == 0 and "train" in top.stdout and "export" in top.stdout
    train_help = maelab("train", "--help", cwd=tmp_path)
    assert train_help.returncode == 0
    for group in (
        "task: finetune, linprobe, pretrain, scratch",
        "model: vit_base, vit_huge, vit_large, vit_small, vit_tiny",
        "target: hog, norm_pixel, pca, pixel",
        "masking: block, grid, random",
        "logger: csv, tensorboard, wandb",
        "experiment: " + ", ".join(EXPERIMENT_FILES),
    ):
        assert group in train_help.stdout, train_help.stdout
    wrong = maelab("trian", cwd=tmp_path)
    assert wrong.returncode == 2 and "invalid choice: 'trian'" in wrong.stderr


@pytest.mark.slow
def test_a_multirun_of_ddp_jobs_keeps_each_job_and_its_workers_together(tmp_path):
    """Lightning re-launches DDP workers with the command line: each job's worker must run that
    job alone, in that job's directory, and the next job must start its own workers."""
    import json

    sweep = tmp_path / "sweep"
    done = maelab(
        "train", "-m", "+experiment=quickstart", "task.mask_ratio=0.5,0.75",
        "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp", "trainer.max_epochs=1",
        "data.num_train=256", "trainer.enable_progress_bar=false", f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    for job, ratio in ((0, 0.5), (1, 0.75)):
        results = json.loads((sweep / str(job) / "results.json").read_text())
        assert results["config"]["task"]["mask_ratio"] == ratio
        assert results["effective_batch_size"] == 2 * 64  # both processes trained this job
        assert results["global_step"] == 256 // 128
        assert (sweep / str(job) / "train_ddp_process_1.log").is_file()  # the worker ran here
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"]  # no stray run directories


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_passes_the_checks_and_builds(tmp_path, experiment):
    import torch

    from maelab.config.checks import validate
    from maelab.run.build import build
    from tests.conftest import compose_config

    cfg = compose_config([f"+experiment={experiment}"], tmp_path)
    if cfg.data._target_.endswith("ImageFolderDataModule"):
        from tests.conftest import make_tree

        cfg.data.root = str(make_tree(tmp_path / "imagenet"))  # classes: the tree's 3
    if cfg.task._target_.endswith("ClassifierModule"):
        cfg.task.pretrained = None  # the random weights of the right shapes
    validate(cfg)
    with torch.device("meta"):  # the real sizes, no memory
        _, module, _ = build(cfg)
    assert sum(p.numel() for p in module.parameters()) > 10_000


@pytest.mark.slow
def test_the_chain_pretrain_then_fine_tune_probe_and_export(tmp_path):
    """The README's chain on synthetic data: each stage a separate command on the last one's
    last.ckpt, each writing results.json."""
    import json

    from tests.conftest import TINY, TINY_CLASSIFIER

    pre = tmp_path / "pre"
    done = maelab(
        "train",
        *TINY,
        "trainer.max_epochs=2",
        "callbacks.knn_monitor.every_n_epochs=1",
        f"hydra.run.dir={pre}",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    pre_results = json.loads((pre / "results.json").read_text())
    assert 0.0 <= pre_results["last"]["val/knn_acc"] <= 1.0
    assert "val/knn_acc" in (pre / "csv" / "metrics.csv").read_text().splitlines()[0]
    ckpt = pre / "checkpoints" / "last.ckpt"

    stages = {  # fine-tuning with its RandAugment in two loader workers, mixup and cutmix
        "finetune": ["+experiment=finetune_vitt_cifar10", "data.num_workers=2", "task.effective_batch_size=64"],
        "linprobe": ["+experiment=linprobe_vitt_cifar10"],
    }
    for stage, overrides in stages.items():
        out = tmp_path / stage
        args = [*overrides, *TINY_CLASSIFIER, "trainer.max_epochs=2", f"task.pretrained={ckpt}"]
        done = maelab("train", *args, f"hydra.run.dir={out}", cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        results = json.loads((out / "results.json").read_text())
        assert results["best"]["epoch"] in (0, 1) and 0.0 <= results["test"]["test/acc1"] <= 1.0
        assert results["config"]["task"]["pretrained"] == str(ckpt)

    done = maelab("export", str(tmp_path / "finetune" / "checkpoints" / "last.ckpt"), "vit.pth", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "timm.create_model('vit_base_patch16_224', pretrained=False, img_size=16" in done.stdout
    assert "global_pool='avg'" in done.stdout and "num_classes=10" in done.stdout
    assert (tmp_path / "vit.pth").is_file() and (tmp_path / "vit.pth.json").is_file()


@pytest.mark.slow
def test_a_classifier_without_a_checkpoint_says_what_to_pass(tmp_path):
    done = maelab("train", "+experiment=finetune_vitt_cifar10", cwd=tmp_path)
    assert done.returncode == 2
    assert "task.pretrained is required" in done.stderr and "last.ckpt" in done.stderr
