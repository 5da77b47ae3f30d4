"""Pipeline experiments (cifar10_fast, cifar10_best): stages as real ``maelab train`` processes,
the finetune stage reading the pretrain stage's checkpoint, timing and accuracy in results.json,
resumption after a kill."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from maelab.errors import UserError
from maelab.run.pipeline import check_stages, forwarded, resuming
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


@pytest.mark.slow
def test_a_pipeline_sweep_pretrains_then_fine_tunes_from_that_checkpoint_and_reports_time_and_accuracy(tmp_path):
    sweep = tmp_path / "a,b"  # a comma: paths travel quoted to the stages
    stages = stage_lists(PRETRAIN + ["trainer.max_epochs=3"], FINETUNE)
    start = time.monotonic()
    done = maelab(
        "train",
        "-m",
        *TINY_PIPELINE,
        *stages,
        "trainer.max_epochs=8",
        "seed=0,1",
        f'hydra.sweep.dir="{sweep}"',
        cwd=tmp_path,
    )
    took = time.monotonic() - start
    assert done.returncode == 0, done.stderr[-3000:]
    for job in ("0", "1"):
        run_dir = sweep / job
        results = json.loads((run_dir / "results.json").read_text())
        pre = json.loads((run_dir / "pretrain" / "results.json").read_text())
        fine = json.loads((run_dir / "finetune" / "results.json").read_text())
        # the stages are ordinary runs; the second starts from the first's final checkpoint
        assert pre["task"] == "PretrainModule" and fine["task"] == "ClassifierModule"
        assert (
            fine["config"]["task"]["pretrained"]
            == pre["last_checkpoint"]
            == str(run_dir / "pretrain/checkpoints/last.ckpt")
        )
        assert "loaded the encoder" in (run_dir / "finetune" / "train.log").read_text()
        # command-line overrides (the swept seed too) reach both stages, over a stage's own list
        assert pre["epochs"] == fine["epochs"] == 8 and pre["config"]["seed"] == fine["config"]["seed"] == int(job)
        assert pre["config"]["task"]["decoder_width"] == 48 and fine["config"]["task"]["mixup"] == 0
        # accuracy: the final weights on the test split (validated there once, at the end); chance is 0.25
        assert results["acc1"] == fine["last"]["val/acc1"] and results["acc1"] > 0.33
        assert fine["val_split"] == "test"
        # time: this job's command, at least its stages' own (process start to results) summed; the
        # second job of the sweep runs in the same process and must not count the first one's time
        assert results["wall_clock_measured"] == "this command"
        assert pre["elapsed_s"] + fine["elapsed_s"] == pytest.approx(results["stages_elapsed_s"], abs=0.02)
        assert results["stages_elapsed_s"] < results["wall_clock_s"] < results["stages_elapsed_s"] + 10 < took

    report = maelab("sweep-report", str(sweep), cwd=tmp_path)  # one row per pipeline, not per stage
    assert report.returncode == 0, report.stderr[-2000:]
    table = (sweep / "sweep_report.md").read_text()
    rows = [line.split(" | ")[0] for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows == ["| job", "| 0", "| 1"] and "| job | seed | acc1 |" in table


@pytest.mark.slow
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
    log = (run_dir / "finetune" / "train.log").read_text()
    assert "received SIGTERM: saving at the next optimizer step" in log
    saved_step = int(re.search(r"saved \S+last.ckpt at step (\d+)", log).group(1))
    assert torch.load(checkpoint, weights_only=False)["global_step"] == saved_step  # the step, not the epoch's
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


def test_only_overrides_meant_for_the_stages_reach_them():
    overrides = ["+experiment=cifar10_fast", "~stages.finetune", "++name=x", "+sweep=masking", "hydra/launcher=slurm"]
    overrides += ["ckpt_path=last", "paths.output_dir=/x", "data.root=/d", "trainer=gpu", "~callbacks.knn_monitor"]
    assert forwarded(overrides) == ["data.root=/d", "trainer=gpu", "~callbacks.knn_monitor"]


@pytest.mark.slow
def test_an_override_one_stage_cannot_take_stops_the_pipeline_before_any_stage_trains(tmp_path):
    done = maelab("train", *TINY_PIPELINE, "task.mask_ratio=0.6", f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "error: stage finetune (+experiment=finetune_vitt_cifar10_fast) cannot take the command line's overrides"
    )
    assert "'stages.finetune.overrides=[...]'" in last
    assert not (tmp_path / "pretrain").exists()


@pytest.mark.slow
def test_a_mistake_in_a_stage_list_is_blamed_on_the_list(tmp_path):
    stage_list = 'stages.finetune.overrides=["task.label_smothing=0.2"]'
    done = maelab("train", *TINY_PIPELINE, stage_list, f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: stage finetune (+experiment=finetune_vitt_cifar10_fast): its list")
    assert (
        "['task.label_smothing=0.2'] fails: task.label_smothing=0.2: no such key; did you mean task.label_smoothing?"
        in last
    )


@pytest.mark.parametrize("path", ["/runs/a,b c/x=[1]", r"/runs/back\slash", '/runs/quote"d', "/runs/end\\"])
def test_a_stage_directory_reaches_hydra_unchanged(path):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from maelab.run.pipeline import quoted

    override = OverridesParser.create().parse_override(f"hydra.run.dir={quoted(Path(path))}")
    assert override.value() == str(Path(path))


def test_resuming_a_pipeline_needs_its_directory_and_only_rank_0_refuses_one_in_use(tmp_path):
    stages = OmegaConf.create({"pretrain": {"experiment": "quickstart"}})
    with pytest.raises(UserError, match="ckpt_path=last: .* holds none of the stages \\['pretrain'\\]"):
        resuming(OmegaConf.create({"ckpt_path": "last"}), tmp_path, stages)
    (tmp_path / "pretrain").mkdir()  # under srun: rank 0's stage has just made it
    assert resuming(OmegaConf.create({"ckpt_path": None}), tmp_path, stages, rank=1) is False
    with pytest.raises(UserError, match="already holds this pipeline's stages"):
        resuming(OmegaConf.create({"ckpt_path": None}), tmp_path, stages, rank=0)


def test_a_requeue_of_the_same_submitit_job_resumes_the_pipeline_and_another_job_is_refused(tmp_path, monkeypatch):
    from maelab.run import slurm as requeue

    cfg = OmegaConf.create({"ckpt_path": None})
    stages = OmegaConf.create({"pretrain": {"experiment": "quickstart"}})
    monkeypatch.setattr(requeue, "submitit_job_id", lambda: "123")
    assert resuming(cfg, tmp_path, stages) is False  # the first start: the job claims the directory
    (tmp_path / "pretrain").mkdir()
    assert resuming(cfg, tmp_path, stages) is True  # its requeue runs the same command, ckpt_path=null
    monkeypatch.setattr(requeue, "submitit_job_id", lambda: "456")
    with pytest.raises(UserError, match="already holds this pipeline's stages; resume it with ckpt_path=last"):
        resuming(cfg, tmp_path, stages)


def test_under_submitit_a_signal_makes_the_stage_save_and_stop_then_submitit_requeues(tmp_path, monkeypatch):
    import threading

    from maelab.run.pipeline import run_child

    # a stand-in stage: starts as maelab's command line does, records its environment, and exits
    # 143 on SIGTERM as a maelab run does
    stage = (
        "import os, signal, sys, time\n"
        "from maelab.run.slurm import ignore_signal_for_parent\n"
        "ignore_signal_for_parent()\n"
        "def stop(*a):\n"
        f"    open({str(tmp_path / 'stage')!r}, 'w').write(' '.join(sorted(os.environ)))\n"
        "    sys.exit(143)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        f"open({str(tmp_path / 'ready')!r}, 'w').write(str(os.getpid()))\n"
        "time.sleep(60)\n"
    )
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    requeued = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: requeued.append(signum))  # submitit's
    try:

        def preempt():
            while not (tmp_path / "ready").exists() or not (tmp_path / "ready").read_text():
                time.sleep(0.05)
            # SLURM signals every process of the job step: the stage as well as the pipeline
            os.kill(int((tmp_path / "ready").read_text()), signal.SIGUSR2)
            time.sleep(0.5)
            os.kill(os.getpid(), signal.SIGUSR2)

        threading.Thread(target=preempt, daemon=True).start()
        with pytest.raises(SystemExit) as stopped:
            run_child([sys.executable, "-c", stage])
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert stopped.value.code == 0 and requeued == [signal.SIGUSR2]  # handed over to submitit
    seen = (tmp_path / "stage").read_text().split()  # the stage got SIGTERM, as a plain process
    assert "PATH" in seen and not any(k.startswith("SUBMITIT_") for k in seen)
    assert "MAELAB_IGNORE_SIGNAL" in seen  # the stage left submitit's USR2 to the pipeline
