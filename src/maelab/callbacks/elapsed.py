"""A run's wall-clock, whole: from the start of each job that worked on it, carried through
checkpoints, so a run resumed over several jobs (a time limit, a preemption) reports the sum.
Time a job spent after its last checkpoint is not carried: that work is done again, and counted
then."""

import time

import lightning as L

import maelab


class ElapsedTime(L.Callback):
    def __init__(self):
        self.before = 0.0  # seconds counted by the jobs before this one, read from the checkpoint

    def elapsed(self) -> float:
        return self.before + time.monotonic() - maelab.job_start()

    def state_dict(self) -> dict:
        return {"elapsed_s": self.elapsed()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.before = float(state_dict["elapsed_s"])
