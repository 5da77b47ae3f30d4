"""Which submitit job this is, and which job a directory belongs to: what decides whether a
requeued job resumes on its own (callbacks/preemption.py explains the design). Kept free of
torch and Lightning, so that a pipeline's parent process starts in a second."""

import os
import signal
from pathlib import Path
from typing import NoReturn

OWNER_FILE = "submitit_job"


def under_submitit() -> bool:
    return bool(os.environ.get("SUBMITIT_EXECUTOR"))


def submitit_job_id() -> str | None:
    """The id submitit keeps across requeues of a job (``<array id>_<task>`` in an array)."""
    if not under_submitit():
        return None
    import submitit

    try:
        return submitit.JobEnvironment().job_id
    except KeyError:  # the executor's variables are missing: not started by submitit
        return None


def checkpoint_owner(checkpoint_dir: Path) -> str | None:
    """The submitit job that trained into this directory (written when its training starts)."""
    path = Path(checkpoint_dir) / OWNER_FILE
    return path.read_text().strip() if path.is_file() else None


def submitit_signal() -> signal.Signals:
    """The signal submitit sends before a time limit or preemption (its own setting)."""
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))


def hand_over_to_submitit(handler, frame=None) -> NoReturn:
    """Run submitit's handler for its signal (``handler``, as found before maelab replaced it):
    on rank 0 it requeues the job and exits, on other ranks it returns and the rank exits."""
    if callable(handler):
        handler(submitit_signal(), frame)
    raise SystemExit(0)


# A pipeline's stage leaves submitit's signal to the pipeline, which passes it on as SIGTERM (SLURM
# signals every process of the job step, the stage and its DDP workers included).
IGNORE_SIGNAL_VARIABLE = "MAELAB_IGNORE_SIGNAL"


def ignore_signal_for_parent() -> None:
    """In a process a pipeline started: ignore the signal its parent handles (inherited by the
    DDP workers the stage starts, as an ignored signal survives exec)."""
    name = os.environ.get(IGNORE_SIGNAL_VARIABLE)
    if name:
        signal.signal(getattr(signal, "SIG" + name), signal.SIG_IGN)
