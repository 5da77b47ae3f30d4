"""maelab: Masked Autoencoder research with PyTorch Lightning and Hydra."""

import time

__version__ = "0.1.0"

# When this process started work (the first import of maelab, before torch): a run's elapsed
# time counts from here, so imports, data loading and compilation count.
PROCESS_START = time.monotonic()
_job_start: float | None = None


def start_job() -> None:
    """Marks a Hydra job's start: the first job of a process counts from the process start,
    a later one (the next job of a multirun in the same process) from its own."""
    global _job_start
    _job_start = PROCESS_START if _job_start is None else time.monotonic()


def job_start() -> float:
    return PROCESS_START if _job_start is None else _job_start
