"""A NaN or Inf loss stops the run with one line, before it reaches the weights or last.ckpt; a
bounded number of bad steps can be skipped; ranks agree; a checkpoint with NaN weights is never written."""

import json
import math

import pytest
import torch

from maelab.weights.checkpoints import AtomicCheckpointIO, NonFiniteWeights
from tests.conftest import REPO, TINY, maelab
from tests.faults import finite_weights

# TINY: 128 images / batch 32 = 4 optimizer steps per epoch
FAULT = ["+callbacks.fault._target_=tests.faults.NonFiniteAt"]


def train(run_dir, *overrides: str):
    run_dir.mkdir(parents=True, exist_ok=True)
    return maelab("train", *TINY, *overrides, f"hydra.run.dir={run_dir}", cwd=run_dir, env={"PYTHONPATH": str(REPO)})


def error_lines(done) -> list[str]:
    return [line for line in done.stderr.splitlines() if line.startswith("error:")]


@pytest.mark.slow
def test_a_diverging_run_stops_at_its_first_nan_with_one_line_and_keeps_the_last_finite_checkpoint(tmp_path):
    done = train(tmp_path, "trainer.max_epochs=3", *FAULT, "+callbacks.fault.steps=[6]")
    assert done.returncode == 2, done.stderr[-3000:]
    [line] = error_lines(done)
    assert "training diverged: the loss is NaN or Inf at step 6 (epoch 1; train/loss nan, lr " in line
    assert "last.ckpt holds the last finite state (step 4)" in line
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 4 and finite_weights(last)
    results = json.loads((tmp_path / "results.json").read_text())
    assert (results["status"], results["global_step"], results["epoch"]) == ("failed", 6, 1)
    assert "TrainingDiverged" in results["error"] and results["last_checkpoint"] == str(last)


@pytest.mark.slow
def test_a_learning_rate_that_diverges_stops_the_run_instead_of_training_on_nan(tmp_path):
    done = train(tmp_path, "trainer.max_epochs=2", "task.base_lr=1e6")
    assert done.returncode == 2, done.stderr[-3000:]
    [line] = error_lines(done)
    lr = float(line.split(", lr ")[1].split(")")[0])
    assert "training diverged" in line and lr > 1  # the learning rate that did it is named
    assert json.loads((tmp_path / "results.json").read_text())["status"] == "failed"
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert not last.exists() or finite_weights(last)


@pytest.mark.slow
def test_a_bounded_number_of_bad_steps_is_skipped_and_counted_then_the_run_stops(tmp_path):
    done = train(tmp_path / "two", "trainer.max_epochs=2", "callbacks.nonfinite_guard.max_skipped_steps=2", *FAULT,
                 "+callbacks.fault.steps=[2,5]")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "two" / "results.json").read_text())
    assert (results["status"], results["skipped_steps"], results["global_step"]) == ("completed", 2, 8)
    assert math.isfinite(results["last"]["train/loss"]) and finite_weights(results["last_checkpoint"])
    assert done.stdout.count("skipped the optimizer step") == 2

    done = train(tmp_path / "three", "trainer.max_epochs=2", "callbacks.nonfinite_guard.max_skipped_steps=2", *FAULT,
                 "+callbacks.fault.steps=[2,3,5]")  # fmt: skip
    assert done.returncode == 2
    [line] = error_lines(done)
    assert "at step 5 (epoch 1;" in line and "after skipping 2" in line


@pytest.mark.slow
def test_a_nan_on_one_ddp_rank_stops_every_rank_at_the_same_step(tmp_path):
    done = train(tmp_path, "trainer=ddp", "trainer.devices=2", "trainer.max_epochs=3", "callbacks.knn_monitor=null",
                 *FAULT, "+callbacks.fault.steps=[3]", "+callbacks.fault.ranks=[1]")  # fmt: skip
    assert done.returncode != 0, done.stderr[-3000:]
    [line] = error_lines(done)  # rank 0 reports it; rank 1 stops with it, silently
    assert "the loss is NaN or Inf at step 3 (epoch 1;" in line
    last = tmp_path / "checkpoints" / "last.ckpt"  # 128 images / (32 x 2 ranks) = 2 steps an epoch
    assert torch.load(last, weights_only=True)["global_step"] == 2 and finite_weights(last)


def test_a_checkpoint_with_nan_weights_is_refused_and_the_last_one_kept(tmp_path):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "epoch": 1}, path)
    good = path.read_bytes()
    for bad in (float("nan"), float("inf")):
        with pytest.raises(NonFiniteWeights, match=r"not saving .*last.ckpt: w holds NaN or Inf"):
            io.save_checkpoint({"state_dict": {"w": torch.tensor([1.0, bad, 3.0])}, "epoch": 2}, path)
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
