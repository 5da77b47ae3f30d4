"""Pipeline experiments (cifar10_fast, cifar10_best): stages as real ``maelab train`` processes,
the finetune stage reading the pretrain stage's checkpoint, timing and accuracy in results.json,
resumption after a kill."""

import json
import signal
import subprocess
import sys
import time

import pytest
from omegaconf import OmegaConf

from maelab.errors import UserError
from maelab.pipeline import check_stages
from tests.conftest import REPO, maelab

# cifar10_fast shrunk to seconds: 4 classes of synthetic shapes (32 px, 16 patches), a 2-block
# encoder, eager, few epochs, fine-tuned without mixup so that a few epochs learn something.
TINY_PIPELINE = [
    "+experiment=cifar10_fast",
    "data=synthetic",
    "data.num_train=512",
    "data.num_test=256",
    "data.num_classes=4",
    "data.batch_size=64",
    "data.img_size=32",
    "data.num_workers=0",
    "model.patch_size=8",
    "model.embed_dim=48",
    "model.depth=2",
    "model.num_heads=3",
    "task.effective_batch_size=null",
    "task.compile=false",
    "task.warmup_epochs=1",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
]
PRETRAIN = ["task.decoder_width=48", "task.decoder_depth=1", "task.base_lr=1.5e-3"]
FINETUNE = ["task.base_lr=2e-3", "task.mixup=0", "task.cutmix=0"]


def stage_lists(pretrain: list[str], finetune: list[str]) -> list[str]:
    """The stages' own override lists, as command-line overrides."""
    return [
        f"stages.{name}.overrides=[{','.join(repr(o) for o in lst)}]"
        for name, lst in (("pretrain", pretrain), ("finetune", finetune))
    ]


def test_a_pipeline_pretrains_then_fine_tunes_from_that_checkpoint_and_reports_time_and_accuracy(tmp_path):
    start = time.monotonic()
    stages = stage_lists(PRETRAIN + ["trainer.max_epochs=3"], FINETUNE)
    done = maelab("train", *TINY_PIPELINE, *stages, "trainer.max_epochs=8", f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    took = time.monotonic() - start
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    pre = json.loads((tmp_path / "pretrain" / "results.json").read_text())
    fine = json.loads((tmp_path / "finetune" / "results.json").read_text())
    # the stages are ordinary runs; the second starts from the first's final checkpoint
    assert pre["task"] == "PretrainModule" and fine["task"] == "ClassifierModule"
    assert (
        fine["config"]["task"]["pretrained"]
        == pre["last_checkpoint"]
        == str(tmp_path / "pretrain/checkpoints/last.ckpt")
    )
    assert "loaded the encoder" in (tmp_path / "finetune" / "train.log").read_text()
    # command-line overrides reached both stages, after (over) a stage's own; those reached one stage
    assert pre["epochs"] == fine["epochs"] == 8
    assert pre["config"]["task"]["decoder_width"] == 48 and fine["config"]["augment"]["_target_"].endswith(
        "PadCropFlip"
    )
    # accuracy: the final weights on the test split (validated there once, at the end); chance is 0.25
    assert results["acc1"] == fine["last"]["val/acc1"] and results["acc1"] > 0.33
    assert fine["val_split"] == "test"
    # time: the whole command, at least the stages' own (process start to results) summed
    assert results["wall_clock_measured"] == "this command"
    assert pre["elapsed_s"] + fine["elapsed_s"] == pytest.approx(results["stages_elapsed_s"], abs=0.02)
    assert results["stages_elapsed_s"] < results["wall_clock_s"] < took


def test_a_killed_pipeline_resumes_its_unfinished_stage_and_keeps_the_finished_one(tmp_path):
    run_dir = tmp_path / "run"
    stages = stage_lists(PRETRAIN + ["trainer.max_epochs=4"], FINETUNE + ["trainer.max_epochs=30"])
    args_killed = [*TINY_PIPELINE, *stages, "callbacks.last_checkpoint.every_n_epochs=1", f"hydra.run.dir={run_dir}"]
    process = subprocess.Popen(
        [sys.executable, "-m", "maelab", "train", *args_killed],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    checkpoint = run_dir / "finetune" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while not checkpoint.is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert checkpoint.is_file(), process.communicate()[0].decode()[-3000:]
    process.send_signal(signal.SIGTERM)  # as `timeout` or a scheduler would: the stage saves, then stops
    output = process.communicate(timeout=120)[0].decode()
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "received SIGTERM: saving at the next optimizer step" in (run_dir / "finetune" / "train.log").read_text()
    assert not (run_dir / "finetune" / "results.json").exists()
    pretrain_results = (run_dir / "pretrain" / "results.json").read_text()

    refused = maelab("train", *args_killed, cwd=tmp_path)  # not asked to resume: the directory is kept
    assert refused.returncode == 2 and "already holds this pipeline's stages" in refused.stderr

    resumed = maelab("train", *args_killed, "ckpt_path=last", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (run_dir / "pretrain" / "results.json").read_text() == pretrain_results  # not trained again
    fine = json.loads((run_dir / "finetune" / "results.json").read_text())
    assert fine["epochs"] == 30 and fine["global_step"] == 30 * 512 // 64
    results = json.loads((run_dir / "results.json").read_text())
    assert results["wall_clock_measured"] == "sum of the stages' elapsed_s (resumed)"
    assert results["wall_clock_s"] == results["stages_elapsed_s"] > 0


@pytest.mark.parametrize(
    "stages, message",
    [
        (
            {"a": {"experiment": "mae_vitt_cifar1O"}},
            "stages.a.experiment='mae_vitt_cifar1O': not an experiment; one of",
        ),
        ({"a": {"experiment": "quickstart", "pretrain": "b"}}, "stages.a: unknown key(s) ['pretrain']; a stage takes"),
        (
            {"a": {"experiment": "finetune_vitt_cifar10", "pretrained": "b"}, "b": {"experiment": "quickstart"}},
            "stages.a.pretrained=b: name an earlier stage, one of none",
        ),
    ],
)
def test_a_malformed_stage_is_refused_with_the_key(stages, message):
    with pytest.raises(UserError) as e:
        check_stages(OmegaConf.create(stages))
    assert message in str(e.value)


def test_a_stage_typo_on_the_command_line_ends_in_one_error_line(tmp_path):
    done = maelab("train", "+experiment=cifar10_fast", "stages.finetune.experiment=finetune_vitt_cifar1O", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: stages.finetune.experiment='finetune_vitt_cifar1O'")


def test_the_recipes_are_pipelines_of_existing_experiments():
    from tests.conftest import compose_config

    for name in ("cifar10_fast", "cifar10_best"):
        cfg = compose_config([f"+experiment={name}"], REPO)
        check_stages(cfg.stages)
        assert list(cfg.stages) == ["pretrain", "finetune"] and cfg.stages.finetune.pretrained == "pretrain"
    best = compose_config(["+experiment=cifar10_best"], REPO).stages
    assert "trainer.max_epochs=800" in best.pretrain.overrides and best.pretrain.experiment == "mae_vitt_cifar10_fast"
