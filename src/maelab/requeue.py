"""Which submitit job this is, and which job a directory belongs to: what decides whether a
requeued job resumes on its own (callbacks/preemption.py explains the design). Kept free of
torch and Lightning, so that a pipeline's parent process starts in a second."""

import os
import signal
from pathlib import Path

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
