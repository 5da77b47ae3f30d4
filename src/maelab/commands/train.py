"""``maelab train [overrides]``: a Hydra app whose job is ``run.fit.run`` (or a pipeline's stages).

``hydra.main`` parses ``sys.argv`` itself, which holds the command word. We parse our own
argument list and leave ``sys.argv`` whole, because Lightning re-launches DDP workers with
``sys.argv`` and they must run ``maelab train ...`` again. ``_run_hydra`` is what ``hydra.main``
calls; hydra-core is pinned to 1.3 for it.
"""

import logging
import os
import sys
from contextlib import contextmanager
from typing import TYPE_CHECKING

import maelab
from maelab.errors import UserError, fail

if TYPE_CHECKING:
    from omegaconf import DictConfig

log = logging.getLogger(__name__)


def main(args: list[str]) -> int:
    from hydra import version
    from hydra._internal.utils import _run_hydra, get_args_parser

    from maelab.config import config_dir, register_resolvers

    version.setbase("1.3")
    register_resolvers()
    parser = get_args_parser()
    parser.prog = "maelab train"
    parsed = parser.parse_args(args)
    with mistyped_overrides_reported(parsed.overrides):
        _run_hydra(
            args=parsed,
            args_parser=parser,
            task_function=task_function,
            config_path=str(config_dir()),
            config_name="train",
        )
    return 0


@contextmanager
def mistyped_overrides_reported(overrides: list[str]):
    """``_run_hydra`` runs each step (composing, ``--cfg``, a run, a multirun) under Hydra's
    ``run_and_report``, which prints an error in several lines and exits 1. While it runs, a key
    or group option that does not exist ends instead in maelab's one line (exit 2) naming the
    closest that do; Hydra's other errors, and all of them under HYDRA_FULL_ERROR=1, stay Hydra's."""
    import hydra._internal.utils as hydra_utils

    from maelab.config.overrides import override_error_message

    hydra_run_and_report = hydra_utils.run_and_report

    def run_and_report(func):
        def step():
            try:
                return func()
            except Exception as e:
                message = None if os.environ.get("HYDRA_FULL_ERROR") == "1" else override_error_message(e, overrides)
                if message is None:
                    raise
                fail(message)

        return hydra_run_and_report(step)

    hydra_utils.run_and_report = run_and_report
    try:
        yield
    finally:
        hydra_utils.run_and_report = hydra_run_and_report


def task_function(cfg: "DictConfig") -> None:
    """What Hydra runs for each job; a user's mistake ends it with its message alone."""
    from hydra.core.hydra_config import HydraConfig

    from maelab.run.slurm import log_file_per_slurm_task

    maelab.start_job()
    if "experiment" not in HydraConfig.get().runtime.choices:
        log.warning("no +experiment=NAME given: running the root defaults (conf/train.yaml)")
    pin_ddp_relaunch_to_this_job()
    log_file_per_slurm_task()
    try:
        run_job(cfg)
    except Exception as e:  # noqa: BLE001  (a user's mistake, however Hydra or OmegaConf wrapped it)
        message = user_message(e)
        if message is None:
            raise
        fail(message)


def run_job(cfg: "DictConfig") -> None:
    from maelab.run.fit import run
    from maelab.run.pipeline import run_pipeline

    run_pipeline(cfg) if cfg.get("stages") else run(cfg)


def user_message(error: Exception) -> str | None:
    """The message of a user's mistake inside ``error``: a UserError, one a constructor raised
    under Hydra's instantiate, one a maelab resolver raised (``${heads:...}``), or a disk that
    refused a write (full, read-only); else None."""
    from hydra.errors import InstantiationException
    from omegaconf.errors import InterpolationResolutionError

    if isinstance(error, UserError):
        return str(error)
    if isinstance(error, InstantiationException):  # Hydra wraps the constructor's error
        cause = error.__cause__
        while cause is not None and not isinstance(cause, UserError):
            cause = cause.__cause__
        return None if cause is None else str(cause)
    prefix = "UserError raised while resolving interpolation: "  # OmegaConf keeps only the message
    if isinstance(error, InterpolationResolutionError) and str(error).startswith(prefix):
        return f"{error.full_key}: {str(error).splitlines()[0][len(prefix) :]}"
    return disk_message(error)


def disk_message(error: Exception) -> str | None:
    """A write the disk refused outside maelab's own writers (a logger's CSV, W&B's files)."""
    from pathlib import Path

    from maelab.atomic import cannot_write, os_error

    refused = os_error(error)
    if refused is None or not refused.filename:
        return None
    return cannot_write(Path(refused.filename), refused, 0)


def pin_ddp_relaunch_to_this_job() -> None:
    """Lightning re-launches DDP workers with ``sys.argv`` plus ``hydra.run.dir``. In a multirun
    job those name the whole sweep and the single-run directory, so each worker would run the
    sweep again elsewhere; make them name this job's overrides and directory."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict, read_write

    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return
    sys.argv = [*sys.argv[:2], *hydra_cfg.overrides.task]  # program, "train", this job's overrides
    with read_write(hydra_cfg), open_dict(hydra_cfg):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir
