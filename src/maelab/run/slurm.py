"""The cluster, in one place: which submitit job this is and which job a directory belongs to
(what decides whether a requeued job resumes on its own; ``run/preemption.py`` explains the
design), handing a signal over to submitit, a pipeline stage's ignored signal, the SLURM
allocation checked against the trainer, and one log file per SLURM task. Kept free of torch and
Lightning, so that a pipeline's parent process starts in a second."""

import logging
import os
import signal
from pathlib import Path
from typing import NoReturn

from maelab.errors import UserError

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


def check_slurm_allocation(trainer_cfg) -> None:
    """The job's nodes and tasks per node must be the trainer's. submitit asks SLURM for them once,
    from the config the sweep started with, so a sweep point that changes them would otherwise
    train with ranks missing or to spare."""
    env = os.environ
    if "SLURM_NNODES" in env and int(env["SLURM_NNODES"]) != trainer_cfg.get("num_nodes", 1):
        raise UserError(
            f"trainer.num_nodes={trainer_cfg.get('num_nodes', 1)}, but this SLURM job has {env['SLURM_NNODES']} "
            "node(s) (hydra.launcher.nodes). A sweep cannot vary the allocation: set trainer.num_nodes outside the "
            "sweep, or submit one sweep per allocation"
        )
    tasks = env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]  # e.g. "8" or "8(x2)"
    devices = trainer_cfg.get("devices")
    counted = isinstance(devices, int) and devices > 0  # -1 / auto: Lightning counts the node's GPUs itself
    if tasks.isdigit() and counted and int(tasks) != devices:
        raise UserError(
            f"trainer.devices={trainer_cfg.get('devices')}, but this SLURM job runs {tasks} task(s) per node "
            "(hydra.launcher.tasks_per_node, one per GPU). A sweep cannot vary the allocation: set trainer.devices "
            "outside the sweep, or submit one sweep per allocation"
        )


def log_file_per_slurm_task() -> None:
    """Under SLURM every task (one per GPU) runs the job; task r > 0 logs to train_rank<r>.log
    instead of writing over rank 0's train.log."""
    rank = int(os.environ.get("SLURM_PROCID", "0"))
    if rank == 0 or int(os.environ.get("SLURM_NTASKS", "1")) == 1:
        return
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
        path = Path(handler.baseFilename)
        replacement = logging.FileHandler(path.with_name(f"{path.stem}_rank{rank}{path.suffix}"))
        replacement.setFormatter(handler.formatter)
        replacement.setLevel(handler.level)
        root.removeHandler(handler)
        handler.close()
        root.addHandler(replacement)
