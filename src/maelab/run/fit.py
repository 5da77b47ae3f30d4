"""``run(cfg)``: one training run from a composed config. Check the values, build the parts
(``run/build.py``), load the starting weights, fit, save the final state, evaluate the test split
once, and write results.json into the run's output directory."""

import logging
import os
import shlex
import signal
import time
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from maelab.errors import UserError

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict:
    """Train as the config says; return (and write) the run's results. A run that fails after
    it was built still writes results.json, with its status and error."""
    from maelab.config import apply_debug, register_resolvers
    from maelab.config.checks import validate
    from maelab.run.build import build
    from maelab.run.output import check_output_writable, check_room_for_checkpoints, remove_unfinished_writes

    output_dir = Path(cfg.paths.output_dir)
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, output_dir)
    check_output_writable(output_dir)  # first: a job killed from here on can be resumed with ckpt_path=last
    register_resolvers()
    cfg = apply_debug(cfg)
    validate(cfg)  # before the parts are built: a bad value fails before any data is read
    remove_unfinished_writes(output_dir)
    datamodule, module, trainer = build(cfg)
    check_room_for_checkpoints(output_dir / "checkpoints", module)
    trust = bool(cfg.get("trust_checkpoint_code"))
    if ckpt_path:
        check_resumable_or_name_another(ckpt_path, module, trust)
    else:
        module.load_initial_weights(trust)  # task.pretrained / task.init_from: only a fresh run reads them
    for logger in trainer.loggers:  # the resolved config, whole; the module adds its own hyper-parameters
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    try:
        outcome = fit(cfg, trainer, module, datamodule, ckpt_path, output_dir / "checkpoints" / "last.ckpt")
    except Exception as e:
        write_failure(cfg, trainer, e)
        raise
    results = run_results(cfg, trainer, module, outcome)
    if trainer.is_global_zero:
        from maelab.atomic import write_text_atomically

        write_text_atomically(output_dir / "results.json", json_text(results))
    return results


def write_failure(cfg: DictConfig, trainer, error: Exception) -> None:
    """results.json of a run that stopped on an error: where it stopped and why. A stop by a
    signal (preemption, Ctrl-C) is not a failure and writes nothing: the resumed job writes it."""
    if not trainer.is_global_zero:
        return
    from maelab.atomic import OutputError, write_text_atomically

    if isinstance(error, OutputError):  # the disk refused a write: results.json would fail the same way
        return
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    failure = {
        "name": cfg.name,
        "status": "failed",
        "error": f"{type(error).__name__}: {error}".strip(),
        "epoch": trainer.current_epoch,
        "global_step": trainer.global_step,
        "last_checkpoint": str(last) if last.is_file() else None,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    write_text_atomically(Path(cfg.paths.output_dir) / "results.json", json_text(failure))


def check_resumable_or_name_another(ckpt_path: str, module, trust: bool) -> None:
    """The checkpoint to resume, checked before training: an unreadable one names the newest
    readable checkpoint beside it and the command that resumes from that one."""
    from maelab.weights.checkpoints import check_resumable
    from maelab.weights.loading import UnreadableCheckpoint, newest_readable_beside

    try:
        check_resumable(ckpt_path, module, trust)
    except UnreadableCheckpoint as e:
        found = newest_readable_beside(Path(ckpt_path))
        if found is None:
            raise UserError(f"ckpt_path: {e}; no other checkpoint beside it is readable") from None
        other, where = found
        raise UserError(
            f"ckpt_path: {e}; the newest readable checkpoint beside it is {other.name} (epoch {where['epoch']}, "
            f"step {where['step']}): resume from it with {resume_command(other)}"
        ) from None


def resume_command(checkpoint: Path) -> str:
    """This job's command line with ``ckpt_path`` pointing at ``checkpoint``."""
    words = ["maelab", "train"]
    try:
        from hydra.core.hydra_config import HydraConfig

        hydra_cfg = HydraConfig.get()
        words += [o for o in hydra_cfg.overrides.task if not o.startswith(("ckpt_path=", "hydra.run.dir="))]
        words.append(f"hydra.run.dir={hydra_cfg.runtime.output_dir}")
    except ValueError:  # composed outside a Hydra app (tests, notebooks): only the key that changes
        words.append("...")
    return shlex.join([*words, f"ckpt_path={checkpoint}"])  # quoted for the shell it is pasted into


def resolve_ckpt_path(ckpt_path: str | None, output_dir: Path) -> str | None:
    """The checkpoint to resume from: null (a fresh run, refused over an existing one), ``last``
    (this directory's), a file, or the requeued submitit job's own last.ckpt."""
    from maelab.run.slurm import checkpoint_owner, submitit_job_id

    path = output_dir / "checkpoints" / "last.ckpt"
    job = submitit_job_id()
    if job is not None and path.is_file() and checkpoint_owner(path.parent) == job:
        # a job submitit requeued after a preemption or time limit: its own last.ckpt wins over the
        # ckpt_path its command names, which is where its first attempt started
        log.info("requeued job %s: resuming from %s", job, path)
        return str(path)
    if ckpt_path is None:
        if not path.is_file():
            return None
        raise UserError(
            f"{output_dir} already holds a run ({path}); starting afresh would overwrite it. "
            "Resume it with ckpt_path=last, or choose another directory (hydra.run.dir)"
        )
    if ckpt_path == "last":
        if path.parent.is_dir() and not any(path.parent.glob("*.ckpt")):  # stopped before its first save
            log.info("ckpt_path=last: %s holds no last.ckpt yet; starting from the beginning", path.parent)
            return None
        if not path.is_file():
            raise UserError(
                f"ckpt_path=last: there is no {path}. To resume a run, name its directory: "
                "hydra.run.dir=<the run's output directory> ckpt_path=last"
            )
        return str(path)
    if not Path(ckpt_path).is_file():
        raise UserError(f"ckpt_path={ckpt_path}: no such file; pass null, 'last' or the path of a .ckpt file")
    return ckpt_path


def fit(cfg: DictConfig, trainer, module, datamodule, ckpt_path: str | None, last: Path) -> dict:
    """Fit, save the final state to ``last``, evaluate; every logger's run is closed however it
    ends. A SIGTERM outside the training loop stops the run (exit 143) or, under submitit, hands
    it to submitit to requeue."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from maelab.run.loggers import finish_loggers
    from maelab.run.slurm import hand_over_to_submitit, submitit_signal, under_submitit

    error = None
    try:
        with one_job_of_processes():
            start = time.perf_counter()
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
            wall_clock = time.perf_counter() - start
            trainer.save_checkpoint(last, weights_only=False)  # the final state, whatever the periodic schedule
            last_metrics = {"epoch": trainer.current_epoch - 1, **metrics(trainer.callback_metrics)}
            return {
                "last_checkpoint": last,
                "last": last_metrics,
                "test": evaluate_on_test(cfg, trainer, module, datamodule),
                "skipped_images": skipped_images(trainer, datamodule),
                "wall_clock_s": wall_clock,
            }
    except SIGTERMException:  # Lightning's: a SIGTERM before training began or during the test pass
        then = "submitit requeues the job" if under_submitit() else "stopping"
        log.warning("SIGTERM outside the training loop: nothing newer than the last checkpoint is saved; %s", then)
        if under_submitit():  # a preemption, not a failure (error stays None): the next job resumes from last.ckpt
            hand_over_to_submitit(signal.getsignal(submitit_signal()))
        # not Lightning's exception, a SystemExit without a code that would pass for a clean exit
        error = SystemExit(128 + signal.SIGTERM)
        raise error from None
    except BaseException as e:
        error = e
        raise
    finally:
        finish_loggers(trainer, error)


def metrics(values: dict) -> dict[str, float]:
    return {k: float(v) for k, v in sorted(values.items())}


def run_results(cfg: DictConfig, trainer, module, outcome: dict) -> dict:
    """results.json: what ran, the last and best epochs, the test pass, throughput and time."""
    from maelab.callbacks.elapsed import ElapsedTime
    from maelab.callbacks.metric_history import MetricHistory
    from maelab.callbacks.nonfinite import NonFiniteGuard
    from maelab.callbacks.throughput import Throughput

    throughput, guard = find_callback(trainer, Throughput), find_callback(trainer, NonFiniteGuard)
    monitor, mode = getattr(module, "monitor", ("val/loss", "min"))
    held_out = cfg.data.get("val_size")
    return {
        "name": cfg.name,
        "status": "completed",
        "task": cfg.task._target_.rsplit(".", 1)[-1],
        "output_dir": str(Path(cfg.paths.output_dir)),
        "last_checkpoint": str(outcome["last_checkpoint"]),
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "effective_batch_size": getattr(module, "effective_batch_size", None),
        "lr": getattr(module, "lr", None),
        "last": outcome["last"],
        # chosen on the validation split by `monitor`; never on the test split
        "best": find_callback(trainer, MetricHistory).best(monitor, mode) if held_out else None,
        "monitor": f"{monitor} ({mode})",
        "val_split": f"{held_out} held-out training images" if held_out else "test",
        "test": outcome["test"],  # the final weights on the test split, when it is not the validation split
        "skipped_images": outcome["skipped_images"],  # unreadable files dropped under data.skip_bad_images
        "skipped_steps": guard.skipped if guard else None,  # non-finite steps skipped (nonfinite_guard)
        "train/img_per_s": throughput.steady_state if throughput else None,
        "peak_memory_gb": throughput.peak_memory_gb if throughput else None,  # GPU: the most allocated, rank 0
        "wall_clock_s": round(outcome["wall_clock_s"], 2),  # trainer.fit of this job alone
        # process start to these results (imports, data, compilation, the test pass included),
        # summed over every job that resumed this run
        "elapsed_s": round(find_callback(trainer, ElapsedTime).elapsed(), 2),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


def find_callback(trainer, kind: type):
    return next((c for c in trainer.callbacks if isinstance(c, kind)), None)


def json_text(data: dict) -> str:
    import json

    return json.dumps(data, indent=2) + "\n"


@contextmanager
def one_job_of_processes():
    """Lightning leaves its process group and its launch variables (LOCAL_RANK, MASTER_PORT, ...)
    behind in the process that launched the DDP workers; the next job of a multirun would take
    them for its own and wait for workers that never come. Leave the process as it was found."""
    environ = dict(os.environ)
    try:
        yield
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(environ)


def evaluate_on_test(cfg: DictConfig, trainer, module, datamodule) -> dict | None:
    """The final weights on the test split, once, for tasks that evaluate (classifiers), when
    the test split is not already the validation split. Never used to pick a checkpoint."""
    from lightning.pytorch.utilities.model_helpers import is_overridden

    if not is_overridden("test_step", module) or not cfg.data.get("val_size"):
        return None
    return metrics(trainer.test(module, datamodule=datamodule, verbose=False)[0])


def skipped_images(trainer, datamodule) -> int | None:
    """Unreadable files skipped under data.skip_bad_images: each counted once, whichever ranks met it."""
    if not hasattr(datamodule, "skipped"):
        return None
    if trainer.world_size == 1:
        return len(datamodule.skipped)
    import torch.distributed as dist

    per_rank = [None] * trainer.world_size
    dist.all_gather_object(per_rank, sorted(datamodule.skipped))
    return len(set().union(*per_rank))
