"""kill -9 at any moment, then ``ckpt_path=last``: the run resumes and ends bit-identical.

Real ``maelab train`` processes are killed with SIGKILL (no handler runs, nothing is flushed), one
after another, at moments drawn from a seeded ``random.Random``:

- ``early``: a random moment of the first epoch, before any checkpoint exists (the next job finds
  ``checkpoints/`` without a last.ckpt);
- ``random``: a random moment of the launch's first two epochs or so (at the latest when its 3rd
  validation begins, so that training is left for the kills that follow), mostly mid-step;
- ``validation``: the moment a random batch (of 8) of the launch's 1st or 2nd validation begins,
  checked to be before that validation ended;
- ``write``: after the launch's 1st or 2nd validation, the moment last.ckpt's temporary file
  appears, checked to be left behind (the kill came between its creation and its rename);
- ``final write``: the same during the save after ``trainer.fit`` (the final state).

The only instrument in the runs is ``ValidationMarks``, a callback that prints a line when a
validation begins, at each of its batches and when it ends (added to every run, the uninterrupted
one included). Each time the
same command is relaunched with ``ckpt_path=last`` added, as a user would, and after
each kill ``last.ckpt``, if present, must load and be a whole checkpoint. The last launch runs to the
end: its final weights must equal an uninterrupted run's, bit for bit, and no temporary file may be
left among the checkpoints. The schedule and each kill are printed (pytest shows them on a failure,
``-s`` live)."""

import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from tests.conftest import REPO, TINY

# 8 steps an epoch (256 / 32), validation every epoch on 8 batches of 32, last.ckpt after each epoch
EPOCHS = 6
RUN = TINY + [
    f"trainer.max_epochs={EPOCHS}",
    "data.num_train=256",
    "data.num_test=256",
    "data.eval_batch_size=32",
    "+callbacks.validation_marks._target_=tests.run.test_kill_resume.ValidationMarks",
]
STEPS = EPOCHS * 8
SEED = int(os.environ.get("MAELAB_KILL_SEED", "2024"))  # another seed, another schedule

TRAINING_BEGAN = "effective batch"  # logged when fit configures the optimizer
VALIDATION = re.compile(r"validation of epoch (\d+) (begins|batch \d+|ends)")
FIT_ENDED = "`Trainer.fit` stopped"  # Lightning's; the final save follows
CHECKPOINT_KEYS = {"state_dict", "optimizer_states", "lr_schedulers", "loops", "callbacks", "epoch", "global_step"}


class ValidationMarks(L.Callback):
    """Prints a line when a validation of the training loop begins, at each of its batches and
    when it ends. Hydra builds it from this module in the runs (``RUN``)."""

    def mark(self, trainer: L.Trainer, what: str) -> None:
        if not trainer.sanity_checking:
            print(f"validation of epoch {trainer.current_epoch} {what}", flush=True)

    def on_validation_start(self, trainer, pl_module) -> None:
        self.mark(trainer, "begins")

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.mark(trainer, f"batch {batch_idx}")

    def on_validation_end(self, trainer, pl_module) -> None:
        self.mark(trainer, "ends")


class Launch:
    """One ``maelab train`` process, started as a user starts it; its console output goes to ``out``."""

    def __init__(self, run_dir: Path, out: Path, resume: bool):
        self.run_dir, self.out = run_dir, out
        args = [*RUN, f"hydra.run.dir={run_dir}", *(["ckpt_path=last"] if resume else [])]
        with open(out, "w") as f:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "maelab", "train", *args],
                cwd=REPO,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                stdout=f,
                stderr=subprocess.STDOUT,
            )

    def text(self) -> str:
        return self.out.read_text()

    def validations(self, which: str = "begins") -> list[int]:
        """The epoch of each validation this launch has begun (or ended, or whose batch ``which``
        has begun)."""
        return [int(epoch) for epoch, what in VALIDATION.findall(self.text()) if what == which]

    def wait_until(self, condition, every: float = 0.001, timeout: float = 300) -> None:
        """Poll ``condition`` until it holds; the process ending first is a failure."""
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.proc.poll() is None, f"the run ended first (exit {self.proc.returncode}):\n{self.tail()}"
            assert time.monotonic() < deadline, f"nothing happened in {timeout} s:\n{self.tail()}"
            time.sleep(every)

    def wait_for_training(self) -> None:
        self.wait_until(lambda: TRAINING_BEGAN in self.text())

    def kill(self) -> None:
        self.proc.kill()  # SIGKILL
        self.proc.wait()

    def finish(self) -> None:
        assert self.proc.wait(timeout=600) == 0, self.tail()

    def tail(self) -> str:
        return self.text()[-3000:]


def temp_files(checkpoints: Path, name: str = "") -> list[str]:
    """What an unfinished atomic write leaves: ``.<name>.tmp<pid>``."""
    return sorted(f for f in os.listdir(checkpoints) if f.startswith(f".{name}") and ".tmp" in f)


def load_complete(last: Path, keys=None) -> dict | None:
    """last.ckpt, if there is one, read weights-only; it must be a whole checkpoint (of the
    reference's parameters, ``keys``)."""
    if not last.exists():
        return None
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    assert CHECKPOINT_KEYS <= checkpoint.keys(), sorted(checkpoint.keys())
    assert keys is None or checkpoint["state_dict"].keys() == keys
    return checkpoint


def saved_step(run: Launch) -> int | None:
    checkpoint = load_complete(run.run_dir / "checkpoints" / "last.ckpt")
    return None if checkpoint is None else checkpoint["global_step"]


# --- the kinds of kill: each waits for its moment, kills, and says when it struck -------------


def kill_early(run: Launch, fraction: float, epoch_s: float) -> str:
    began = time.monotonic()
    run.wait_until(lambda: time.monotonic() - began > fraction * epoch_s or run.validations())
    run.kill()
    assert saved_step(run) is None, "meant to come before the first checkpoint"
    return f"{time.monotonic() - began:.2f} s into the first epoch"


def kill_at_random(run: Launch, fraction: float, epoch_s: float) -> str:
    began = time.monotonic()
    run.wait_until(lambda: time.monotonic() - began > fraction * epoch_s or len(run.validations()) >= 3)
    run.kill()
    return f"{time.monotonic() - began:.2f} s into training, after {len(run.validations())} validation(s) began"


def kill_mid_validation(run: Launch, draw: tuple[int, int], epoch_s: float) -> str:
    nth, batch = draw
    run.wait_until(lambda: len(run.validations(f"batch {batch}")) >= nth)
    run.kill()
    epoch = run.validations()[nth - 1]
    assert len(run.validations("ends")) < nth, f"the kill came after epoch {epoch}'s validation ended"
    return f"at batch {batch} of epoch {epoch}'s validation"


def kill_mid_write(run: Launch, nth: int, epoch_s: float) -> str:
    run.wait_until(lambda: len(run.validations("ends")) >= nth)  # the epoch's checkpoint follows
    return kill_when_written(run, f"epoch {run.validations('ends')[nth - 1]}'s last.ckpt")


def kill_mid_final_write(run: Launch, _, epoch_s: float) -> str:
    run.wait_until(lambda: FIT_ENDED in run.text())  # the final save follows
    return kill_when_written(run, "the final last.ckpt")


def kill_when_written(run: Launch, what: str) -> str:
    """The moment last.ckpt's temporary file appears: after its creation, before its rename."""
    checkpoints = run.run_dir / "checkpoints"
    run.wait_until(lambda: temp_files(checkpoints, "last.ckpt"), every=0.0002)
    run.kill()
    left = temp_files(checkpoints, "last.ckpt")
    if not left:
        raise Missed(f"just after {what} was renamed into place (the poll came too late)")
    return f"mid-write of {what} (left {left})"


class Missed(Exception):
    """A kill aimed at a write that came just after it: a kill all the same, and the aim is retried."""


KILLS = {
    "early": kill_early,
    "random": kill_at_random,
    "validation": kill_mid_validation,
    "write": kill_mid_write,
    "final write": kill_mid_final_write,
}


def schedule(rng: random.Random) -> list[tuple[str, object]]:
    """Each kill and its draw: a share of an epoch's time, which validation (and batch) of the
    launch, or which of its checkpoint writes."""
    middle = [
        ("random", round(rng.uniform(0.1, 2.0), 2)),
        ("validation", (rng.randint(1, 2), rng.randrange(8))),
        ("write", rng.randint(1, 2)),
    ]
    rng.shuffle(middle)
    return [("early", round(rng.uniform(0.1, 1.0), 2)), *middle, ("final write", None)]


def uninterrupted(run_dir: Path, out: Path) -> tuple[dict, float]:
    """The reference: its final weights, and the seconds of an epoch."""
    run = Launch(run_dir, out, resume=False)
    try:
        run.wait_for_training()
        began = time.monotonic()
        run.finish()
    finally:
        run.kill()
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == STEPS
    return checkpoint["state_dict"], (time.monotonic() - began) / EPOCHS


@pytest.mark.slow
def test_kill_9_at_random_moments_then_ckpt_path_last_ends_bit_identical(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    reference, epoch_s = uninterrupted(tmp_path / "straight", logs / "straight.out")
    kills = schedule(random.Random(SEED))
    print(f"\nuninterrupted: {epoch_s:.1f} s an epoch; kills (seed {SEED}): {kills}")

    run_dir = tmp_path / "killed"
    last = run_dir / "checkpoints" / "last.ckpt"
    launches, missed = 0, 0
    while kills:
        kind, draw = kills.pop(0)
        run = Launch(run_dir, logs / f"launch{launches}.out", resume=launches > 0)  # the first is a fresh run
        try:
            run.wait_for_training()
            when = KILLS[kind](run, draw, epoch_s)
        except Missed as e:
            missed += 1
            assert missed < 3, "three kills aimed at writes came too late"
            kills.insert(0, (kind, 1))  # again, at the launch's first save: a miss saved progress
            when = str(e)
        finally:
            run.kill()
        checkpoint = load_complete(last, reference.keys())
        step = None if checkpoint is None else checkpoint["global_step"]
        print(f"launch {launches}: {kind} kill {when}; last.ckpt: step {step}")
        launches += 1

    run = Launch(run_dir, logs / f"launch{launches}.out", resume=True)
    try:
        run.finish()
    finally:
        run.kill()
    print(f"launch {launches}: ran to the end")

    final = load_complete(last, reference.keys())
    assert final["global_step"] == STEPS
    for key, tensor in reference.items():
        assert torch.equal(final["state_dict"][key], tensor), key
    assert temp_files(run_dir / "checkpoints") == []
