"""Whole runs in-process through the composed config: resume, checkpoint safety, results."""

import csv
import json
import os
import signal
import sys

import pytest
import torch

from maelab.run.fit import run
from maelab.weights import checkpoints
from tests.conftest import REPO, TINY, compose_config, tiny_pretrain_module, weights


@pytest.mark.slow
def test_a_run_killed_mid_epoch_resumes_bit_identical_to_an_uninterrupted_one(tmp_path):
    # 128 images / batch 32 = 4 steps an epoch; the lr schedule spans trainer.max_epochs=3 in both
    common = TINY + ["trainer.max_epochs=3", "callbacks.reconstructions.every_n_epochs=1"]
    straight = run(compose_config(common, tmp_path / "straight"))
    assert straight["global_step"] == 12

    crash = ["+callbacks.crash._target_=tests.conftest.CrashAt", "+callbacks.crash.step=10"]
    with pytest.raises(RuntimeError, match="node lost"):
        run(compose_config(common + crash, tmp_path / "resumed"))
    last = tmp_path / "resumed" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 8  # written at the end of epoch 1
    resumed = run(compose_config(common + ["ckpt_path=last"], tmp_path / "resumed"))
    assert resumed["global_step"] == 12

    a, b = weights(straight["last_checkpoint"]), weights(resumed["last_checkpoint"])
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert resumed["last"]["train/loss"] == straight["last"]["train/loss"]

    # the metrics of both parts of the resumed run are in one file, the same as the straight run's
    def losses(run_dir):
        rows = csv.DictReader((run_dir / "csv" / "metrics.csv").read_text().splitlines())
        return {int(r["step"]): float(r["train/loss"]) for r in rows if r["train/loss"]}

    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    assert len(losses(tmp_path / "straight")) == 12


@pytest.mark.parametrize(
    "layout,steps,signal_step",
    [
        ([], 12, 6),  # 4 batches of 32 an epoch, one step each; the signal comes mid-way through epoch 2
        ([], 12, 8),  # at epoch 2's last step: saved after its validation
        ([], 12, 12),  # at the run's last step: requeued before the final evaluation, which the next job runs
        (["augment=randaug", "data.num_workers=2"], 12, 6),  # augmentation in loader workers
        # 7 batches, 2 accumulated per step: each epoch's permutation gives 3 whole steps (6 batches)
        (["data.num_train=224", "task.effective_batch_size=64"], 9, 4),
    ],
)
@pytest.mark.slow
def test_a_preempted_job_saves_mid_epoch_and_its_requeued_job_resumes_bit_identical(
    layout, steps, signal_step, tmp_path, monkeypatch
):
    common = TINY + layout + ["trainer.max_epochs=3", "+callbacks.signal._target_=tests.conftest.SignalAt"]
    straight = run(compose_config(common + ["+callbacks.signal.step=-1"], tmp_path / "straight"))
    assert straight["global_step"] == steps
    common += [f"+callbacks.signal.step={signal_step}"]

    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    monkeypatch.setenv("SUBMITIT_LOCAL_JOB_ID", "4242")
    requeued = []

    def submitit_handler(signum, frame):  # what submitit does on rank 0: requeue, then exit
        requeued.append(signum)
        sys.exit(3)

    previous = signal.signal(signal.SIGUSR2, submitit_handler)
    try:
        with pytest.raises(SystemExit):
            run(compose_config(common, tmp_path / "job"))
        assert signal.getsignal(signal.SIGUSR2) is submitit_handler  # handed back
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert requeued == [signal.SIGUSR2]
    last = tmp_path / "job" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == signal_step  # saved after the step it came in
    assert not (tmp_path / "job" / "results.json").exists()

    resumed = run(compose_config(common, tmp_path / "job"))  # the requeued job: same config, same directory
    assert resumed["global_step"] == steps
    a, b = weights(straight["last_checkpoint"]), weights(resumed["last_checkpoint"])
    for key in a:
        assert torch.equal(a[key], b[key]), key

    def logged(run_dir, key):
        rows = csv.DictReader((run_dir / "csv" / "metrics.csv").read_text().splitlines())
        return {int(r["step"]): float(r[key]) for r in rows if r[key]}

    assert logged(tmp_path / "job", "train/loss") == logged(tmp_path / "straight", "train/loss")
    assert len(logged(tmp_path / "straight", "val/loss")) == 3  # every epoch validated
    assert logged(tmp_path / "job", "val/loss") == logged(tmp_path / "straight", "val/loss")


def test_under_submitit_only_a_requeue_of_the_same_job_resumes_on_its_own(tmp_path, monkeypatch):
    from maelab.errors import UserError
    from maelab.run.fit import resolve_ckpt_path

    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    last.write_bytes(b"state")
    (last.parent / "submitit_job").write_text("4242\n")
    elsewhere = tmp_path / "pretrained.ckpt"
    elsewhere.write_bytes(b"the first attempt's start")
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    # the requeued job runs its original command again; its own last.ckpt wins over that ckpt_path
    assert resolve_ckpt_path(str(elsewhere), tmp_path) == str(last)
    assert resolve_ckpt_path(None, tmp_path) == str(last)
    monkeypatch.setenv("SLURM_JOB_ID", "5151")  # another job sent into the same directory
    with pytest.raises(UserError, match="already holds a run"):
        resolve_ckpt_path(None, tmp_path)
    assert resolve_ckpt_path(str(elsewhere), tmp_path) == str(elsewhere)


def test_a_fresh_run_refuses_to_overwrite_a_run_directory(tmp_path):
    from maelab.errors import UserError

    run(compose_config(TINY + ["trainer.max_epochs=1"], tmp_path))
    with pytest.raises(UserError, match="already holds a run .*ckpt_path=last"):
        run(compose_config(TINY + ["trainer.max_epochs=1"], tmp_path))


def test_run_writes_results_metrics_and_reconstructions(tmp_path):
    results = run(compose_config(TINY + ["trainer.max_epochs=2", "task.base_lr=1e-3"], tmp_path))
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["global_step"] == 8 and on_disk["epochs"] == 2
    assert on_disk["effective_batch_size"] == 32
    assert on_disk["lr"] == pytest.approx(1e-3 * 32 / 256)
    assert on_disk["train/img_per_s"] > 0
    assert 0 < on_disk["last"]["train/loss"] < 5 and 0 < on_disk["last"]["val/loss"] < 5
    header = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/loss", "train/lr", "train/img_per_s", "val/loss"} <= set(header)
    assert (tmp_path / "reconstructions" / "epoch_0001.png").is_file()
    assert results["config"]["model"]["embed_dim"] == 32


@pytest.mark.slow
def test_elapsed_time_adds_up_over_the_jobs_of_a_resumed_run(tmp_path, monkeypatch):
    import time

    import maelab

    first = run(compose_config(TINY + ["trainer.max_epochs=1"], tmp_path))
    assert 0 < first["wall_clock_s"] <= first["elapsed_s"]  # fit alone, then the whole job
    counted = torch.load(first["last_checkpoint"], weights_only=False)["callbacks"]["ElapsedTime"]["elapsed_s"]
    # a second job, as if it had started 100 s ago, carries the first job's time on
    started = time.monotonic() - 100
    monkeypatch.setattr(maelab, "job_start", lambda: started)
    start = time.monotonic()
    second = run(compose_config(TINY + ["trainer.max_epochs=2", "ckpt_path=last"], tmp_path))
    own = 100 + time.monotonic() - start
    assert counted + 100 < second["elapsed_s"] <= counted + own + 0.01


def _start(args, cwd):
    import subprocess

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "maelab", "train", *args], cwd=cwd, env=env)


@pytest.mark.slow
def test_a_plain_sigterm_saves_at_the_next_step_and_stops_with_143(tmp_path):
    import re
    import time

    process = _start(TINY + ["trainer.max_epochs=500", f"hydra.run.dir={tmp_path}"], tmp_path)
    checkpoint = tmp_path / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 120
    while not checkpoint.is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 128 + signal.SIGTERM
    log = (tmp_path / "train.log").read_text()
    saved = int(re.search(r"saved \S+last.ckpt at step (\d+); stopping; resume with ckpt_path=last", log).group(1))
    assert torch.load(checkpoint, weights_only=False)["global_step"] == saved > 0
    assert not (tmp_path / "results.json").exists()  # not a finished run


@pytest.mark.slow
def test_a_sigterm_before_training_starts_stops_with_143_not_success(tmp_path):
    killer = "+callbacks.killer._target_=tests.conftest.SigtermAtSanityCheck"
    process = _start(TINY + [killer, "trainer.num_sanity_val_steps=1", f"hydra.run.dir={tmp_path}"], tmp_path)
    assert process.wait(timeout=120) == 128 + signal.SIGTERM
    assert (
        "SIGTERM outside the training loop: nothing newer than the last checkpoint is saved; stopping"
        in (tmp_path / "train.log").read_text()
    )


@pytest.mark.slow
@pytest.mark.parametrize("submitit", [True, False], ids=["under_submitit", "plain"])
def test_a_sigterm_before_training_requeues_under_submitit_and_fails_the_wandb_run_otherwise(
    tmp_path, monkeypatch, submitit
):
    import wandb

    if submitit:
        monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")  # a preemption: SIGTERM, then submitit's USR2
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    finished = []
    finish = wandb.finish
    monkeypatch.setattr(wandb, "finish", lambda exit_code=None: finished.append(exit_code) or finish(exit_code))
    requeued = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: requeued.append(signum))  # submitit's
    killer = "+callbacks.killer._target_=tests.conftest.SigtermAtSanityCheck"
    wandb_offline = ["logger=[csv,wandb]", "logger.wandb.offline=true", "logger.wandb.project=maelab-tests"]
    try:
        with pytest.raises(SystemExit) as stopped:
            run(compose_config(TINY + [killer, "trainer.num_sanity_val_steps=1", *wandb_offline], tmp_path))
    finally:
        signal.signal(signal.SIGUSR2, previous)
    if submitit:  # requeued, not failed with 143; the requeued job continues the W&B run
        assert (stopped.value.code, requeued, finished) == (0, [signal.SIGUSR2], [0])
    else:  # stopped as the sender asked; W&B shows the run failed, as for any other stop with 143
        assert (stopped.value.code, requeued, finished) == (128 + signal.SIGTERM, [], [1])
    assert not (tmp_path / "results.json").exists()


def test_a_failed_checkpoint_write_keeps_the_last_good_one(tmp_path, monkeypatch):
    results = run(compose_config(TINY + ["trainer.max_epochs=1"], tmp_path))
    last = tmp_path / "checkpoints" / "last.ckpt"
    good = last.read_bytes()

    def dies_mid_write(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoints.torch, "save", dies_mid_write)
    with pytest.raises(OSError, match="No space left"):
        run(compose_config(TINY + ["trainer.max_epochs=2", "ckpt_path=last"], tmp_path))
    assert last.read_bytes() == good
    assert weights(last).keys() == weights(results["last_checkpoint"]).keys()
    assert sorted(p.name for p in last.parent.iterdir() if p.name.startswith(".")) == []  # no temp files left


def test_ckpt_path_last_without_a_checkpoint_names_the_file(tmp_path):
    from maelab.errors import UserError

    with pytest.raises(UserError, match="checkpoints/last.ckpt"):
        run(compose_config(TINY + ["ckpt_path=last"], tmp_path))


def test_a_recipe_effective_batch_is_reached_by_accumulating(tmp_path):
    overrides = ["trainer.max_epochs=1", "task.effective_batch_size=64", "task.base_lr=1e-3"]
    results = run(compose_config(TINY + overrides, tmp_path))
    assert results["effective_batch_size"] == 64  # 32 per step x 2 accumulated
    assert results["global_step"] == 128 // 64
    assert results["lr"] == pytest.approx(1e-3 * 64 / 256)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["task.effective_batch_size=48"], "task.effective_batch_size=48 is not a multiple of data.batch_size=32"),
        (["task.effective_batch_size=64", "trainer.accumulate_grad_batches=4"], "contradicts"),
    ],
)
def test_an_effective_batch_that_cannot_be_reached_is_refused(tmp_path, overrides, message):
    from maelab.errors import UserError

    with pytest.raises(UserError, match=message):
        run(compose_config(TINY + overrides, tmp_path))


def test_resuming_into_another_architecture_names_what_differs(tmp_path):
    from maelab.errors import UserError

    run(compose_config(TINY + ["trainer.max_epochs=1"], tmp_path))
    with pytest.raises(UserError) as err:
        run(compose_config(TINY + ["trainer.max_epochs=2", "model.embed_dim=64", "ckpt_path=last"], tmp_path))
    message = str(err.value)
    assert "model.blocks.0.attn.proj.bias is (32,) there, (64,) here" in message
    assert "model.embed_dim=32 (this run: 64)" in message


def test_evaluation_images_are_resized_to_the_model_input():
    module = tiny_pretrain_module(
        target={"_target_": "maelab.models.targets.PixelTarget"},
        augment={"_target_": "maelab.data.transforms.RandomResizedCropFlip"},
    )
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    assert module.preprocess(images, train=True).shape == (2, 3, 16, 16)
    assert module.preprocess(images, train=False).shape == (2, 3, 16, 16)


def test_an_epoch_is_whole_optimizer_steps_and_still_validates(tmp_path):
    # 4 batches of 32, 3 accumulated per step: each epoch's permutation gives one full step, and
    # the fourth batch's images wait for another epoch instead of stepping with a third of the batch
    results = run(compose_config(TINY + ["trainer.max_epochs=2", "task.effective_batch_size=96"], tmp_path))
    assert results["effective_batch_size"] == 96
    assert results["global_step"] == 2
    rows = csv.DictReader((tmp_path / "csv" / "metrics.csv").read_text().splitlines())
    assert [int(r["epoch"]) for r in rows if r["val/loss"]] == [0, 1]  # every epoch validated


def test_an_optimizer_step_larger_than_the_data_names_the_keys(tmp_path):
    from maelab.errors import UserError

    with pytest.raises(UserError, match="data.batch_size=32 x 8 accumulated x 1 rank.* 256 images, more than the 128"):
        run(compose_config(TINY + ["trainer.max_epochs=1", "task.effective_batch_size=256"], tmp_path))


def test_each_rank_draws_its_own_stream_and_a_rank_repeats_its_own():
    from types import SimpleNamespace

    from maelab.callbacks.seeding import RandomState

    def draws(rank: int) -> torch.Tensor:
        RandomState(seed=7).setup(SimpleNamespace(global_rank=rank), None, "fit")
        return torch.rand(5)

    assert torch.equal(draws(0), draws(0))
    assert not torch.equal(draws(0), draws(1))


def test_the_cifar_recipe_holds_its_effective_batch_on_a_gpu_or_a_cpu(tmp_path, monkeypatch):
    """The recipe's per-device batch is a hardware setting: the whole 4096 on a GPU, 16 x 256
    accumulated on a CPU; the effective batch and learning rate stay the recipe's."""
    import torch

    cfg = compose_config(["+experiment=mae_vitt_cifar10"], tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cfg.data.batch_size == 256
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cfg.data.batch_size == 4096
    cfg.trainer.accelerator = "cpu"
    assert cfg.data.batch_size == 256
    cfg.data.batch_size = 512  # a number is taken as it is
    assert cfg.data.batch_size == 512


def test_a_signal_after_the_last_save_point_still_saves_before_the_requeue(tmp_path, monkeypatch):
    common = TINY + ["trainer.max_epochs=3", "callbacks.last_checkpoint.every_n_epochs=2"]
    straight = run(compose_config(common, tmp_path / "straight"))
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    monkeypatch.setenv("SUBMITIT_LOCAL_JOB_ID", "77")
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: sys.exit(-1))  # submitit: requeue, exit
    try:
        with pytest.raises(SystemExit):
            run(
                compose_config(
                    common + ["+callbacks.late._target_=tests.conftest.SignalAfterLastEpochSave"], tmp_path / "job"
                )
            )
    finally:
        signal.signal(signal.SIGUSR2, previous)
    last = tmp_path / "job" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 12  # not epoch 2's step 8
    resumed = run(compose_config(common, tmp_path / "job"))  # the requeued job only evaluates
    a, b = weights(straight["last_checkpoint"]), weights(resumed["last_checkpoint"])
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_requeued_job_finishes_its_logger_runs_as_a_success(tmp_path):
    from types import SimpleNamespace

    from lightning.pytorch.loggers import TensorBoardLogger

    from maelab.run.loggers import finish_loggers
    from maelab.run.preemption import Preemption

    class Recorded(TensorBoardLogger):
        def finalize(self, status):
            self.status = status

    preemption = Preemption(str(tmp_path))
    logger = Recorded(str(tmp_path))
    trainer = SimpleNamespace(loggers=[logger], callbacks=[preemption])
    finish_loggers(trainer, SystemExit(-1))
    assert logger.status == "failed"  # a job that exits with an error, on its own
    preemption.handed_over = True  # submitit requeued it and exited with -1
    finish_loggers(trainer, SystemExit(-1))
    assert logger.status == "success"
