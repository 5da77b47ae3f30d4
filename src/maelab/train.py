"""``run(cfg)``: build datamodule, module, callbacks, loggers and trainer from a composed config,
fit, and write results.json into the run's output directory."""

import inspect
import json
import logging
import os
import signal
import time
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from maelab.errors import UserError
from maelab.resolvers import register_resolvers, runs_on_gpu

log = logging.getLogger(__name__)


def resolve_precision(trainer_cfg: DictConfig) -> str:
    """``precision: auto`` is maelab's policy: bf16 mixed precision on a GPU, fp32 elsewhere."""
    precision = str(trainer_cfg.get("precision", "auto"))
    if precision != "auto":
        return precision
    import torch

    return "bf16-mixed" if runs_on_gpu(trainer_cfg) and torch.cuda.is_bf16_supported() else "32-true"


def resolve_ckpt_path(ckpt_path: str | None, output_dir: Path) -> str | None:
    from maelab.requeue import checkpoint_owner, submitit_job_id

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
        if not path.is_file():
            raise UserError(
                f"ckpt_path=last: there is no {path}. To resume a run, name its directory: "
                "hydra.run.dir=<the run's output directory> ckpt_path=last"
            )
        return str(path)
    if not Path(ckpt_path).is_file():
        raise UserError(f"ckpt_path={ckpt_path}: no such file; pass null, 'last' or the path of a .ckpt file")
    return ckpt_path


def quiet_lightning() -> None:
    """Hydra already logs to the console and train.log: drop Lightning's second console handler,
    its advertising tip and a deprecation it raises against newer torch."""
    import warnings

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).handlers.clear()
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(lambda r: "litlogger" not in r.getMessage())
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    # a probe's frozen encoder is in eval mode on purpose (ClassifierModule logs what it froze)
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode at the start of training.*")
    # maelab's datamodules carry their position in the epoch through checkpoints (data/base.py)
    warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")


def derive_accumulation(cfg: DictConfig, trainer) -> None:
    """A recipe fixes the effective batch (``task.effective_batch_size``); the per-device batch
    is set for the hardware, and gradient accumulation makes up the difference."""
    effective = cfg.task.get("effective_batch_size")
    if effective is None:
        return
    per_step = cfg.data.batch_size * trainer.world_size
    if effective % per_step:
        raise UserError(
            f"task.effective_batch_size={effective} is not a multiple of data.batch_size={cfg.data.batch_size} x "
            f"{trainer.num_devices} device(s) x {trainer.num_nodes} node(s) = {per_step}; "
            "choose a per-device batch that divides it"
        )
    accumulate = effective // per_step
    configured = cfg.trainer.get("accumulate_grad_batches", 1)
    if configured not in (1, accumulate):
        raise UserError(
            f"trainer.accumulate_grad_batches={configured} contradicts task.effective_batch_size={effective}, "
            f"which needs {accumulate} here; set one of them (task.effective_batch_size=null to set accumulation)"
        )
    trainer.accumulate_grad_batches = accumulate


def loader_augmentation(cfg: DictConfig, datamodule) -> DictConfig | None:
    """Where the training augmentation runs. A per-image (PIL) one such as RandAugment runs in
    the DataLoader workers; so does every augmentation of a datamodule that decodes files of
    varied sizes (ImageNet), through the augmentation's ``per_image()`` form. Otherwise it runs
    batched on the device, and the module gets its config back."""
    from hydra.utils import get_class, instantiate

    augment = cfg.get("augment") or None
    if augment is None:
        return None
    size, mean, std = cfg.data.img_size, cfg.data.mean, cfg.data.std
    if getattr(get_class(augment._target_), "in_loader", False):
        datamodule.train_transform = instantiate(augment, size=size, mean=mean, std=std)
    elif getattr(datamodule, "per_image_transforms", False):
        datamodule.train_transform = instantiate(augment, size=size).per_image()
    else:
        return augment
    return None


def check_slurm_allocation(trainer_cfg: DictConfig) -> None:
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


def build(cfg: DictConfig):
    """(datamodule, module, trainer) from a composed config."""
    import lightning as L
    from hydra.utils import get_class, instantiate
    from lightning.fabric.plugins.environments import SLURMEnvironment

    from maelab.callbacks.elapsed import ElapsedTime
    from maelab.callbacks.metric_history import MetricHistory
    from maelab.callbacks.preemption import Preemption
    from maelab.callbacks.seeding import RandomState
    from maelab.checkpoints import AtomicCheckpointIO

    quiet_lightning()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = instantiate(cfg.data)
    datamodule.seed = cfg.seed  # the epoch permutations derive from it
    module_class = get_class(cfg.task._target_)
    augment = loader_augmentation(cfg, datamodule)
    inputs = {  # what the run provides; each task takes what its constructor names
        "model": cfg.model,
        "target": cfg.get("target"),
        "masking": cfg.get("masking"),
        "augment": augment,
        "img_size": cfg.data.img_size,
        "num_classes": datamodule.num_classes,  # an image folder counts its class folders
        "mean": cfg.data.mean,
        "std": cfg.data.std,
    }
    wanted = inspect.signature(module_class).parameters
    module = instantiate(
        cfg.task,
        **{k: v for k, v in inputs.items() if k in wanted},
        _recursive_=False,  # the module builds its parts; its hyper-parameters stay plain values
        _convert_="all",
    )
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    callbacks.append(RandomState(cfg.seed))  # not optional: per-rank streams, exact resumption
    callbacks.append(MetricHistory())  # results.json's best and last
    callbacks.append(ElapsedTime())  # results.json's elapsed_s, over every job of the run
    callbacks.append(  # saves, then submitit requeues (or, on a plain SIGTERM, the run stops)
        Preemption(Path(cfg.paths.output_dir) / "checkpoints", cfg.get("signal_check_every_n_steps", 10))
    )
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c]
    if SLURMEnvironment.detect():
        check_slurm_allocation(cfg.trainer)
    trainer = instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers or False,
        precision=resolve_precision(cfg.trainer),
        # on SLURM, submitit owns the requeue (callbacks/preemption.py): Lightning's is off
        plugins=[AtomicCheckpointIO(), *([SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else [])],
    )
    derive_accumulation(cfg, trainer)
    return datamodule, module, trainer


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


def run(cfg: DictConfig) -> dict:
    """Train as the config says; return (and write) the run's results."""
    from maelab.config_checks import validate

    register_resolvers()
    validate(cfg)  # before the heavy imports: a bad value fails in a second
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from maelab.callbacks.elapsed import ElapsedTime
    from maelab.callbacks.metric_history import MetricHistory
    from maelab.callbacks.throughput import Throughput
    from maelab.loggers import finish_loggers
    from maelab.requeue import hand_over_to_submitit, submitit_signal, under_submitit

    output_dir = Path(cfg.paths.output_dir)
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, output_dir)
    datamodule, module, trainer = build(cfg)
    if ckpt_path:
        from maelab.checkpoints import check_resumable

        check_resumable(ckpt_path, module)
    else:
        module.load_initial_weights()  # task.pretrained / task.init_from: only a fresh run reads them

    for logger in trainer.loggers:  # the resolved config, whole; the module adds its own hyper-parameters
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    error = None
    try:
        with one_job_of_processes():
            start = time.perf_counter()
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
            wall_clock = time.perf_counter() - start
            last = output_dir / "checkpoints" / "last.ckpt"
            trainer.save_checkpoint(last, weights_only=False)  # the final state, whatever the periodic schedule
            last_metrics = {
                "epoch": trainer.current_epoch - 1,
                **{k: float(v) for k, v in sorted(trainer.callback_metrics.items())},
            }
            test = evaluate_on_test(cfg, trainer, module, datamodule)
            skipped = skipped_images(trainer, datamodule)
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

    throughput = next((c for c in trainer.callbacks if isinstance(c, Throughput)), None)
    history = next(c for c in trainer.callbacks if isinstance(c, MetricHistory))
    elapsed = next(c for c in trainer.callbacks if isinstance(c, ElapsedTime))
    monitor, mode = getattr(module, "monitor", ("val/loss", "min"))
    results = {
        "name": cfg.name,
        "task": cfg.task._target_.rsplit(".", 1)[-1],
        "output_dir": str(output_dir),
        "last_checkpoint": str(last),
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "effective_batch_size": getattr(module, "effective_batch_size", None),
        "lr": getattr(module, "lr", None),
        "last": last_metrics,
        # chosen on the validation split by `monitor`; never on the test split
        "best": history.best(monitor, mode) if cfg.data.get("val_size") else None,
        "monitor": f"{monitor} ({mode})",
        "val_split": "test" if not cfg.data.get("val_size") else f"{cfg.data.val_size} held-out training images",
        "test": test,  # the final weights on the test split, when it is not the validation split
        "skipped_images": skipped,  # unreadable files dropped under data.skip_bad_images, all ranks
        "train/img_per_s": throughput.steady_state if throughput else None,
        "peak_memory_gb": throughput.peak_memory_gb if throughput else None,  # GPU: the most allocated, rank 0
        "wall_clock_s": round(wall_clock, 2),  # trainer.fit of this job alone
        # process start to these results (imports, data, compilation, the test pass included),
        # summed over every job that resumed this run
        "elapsed_s": round(elapsed.elapsed(), 2),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    if trainer.is_global_zero:
        write_json(output_dir / "results.json", results)
    return results


def evaluate_on_test(cfg: DictConfig, trainer, module, datamodule) -> dict | None:
    """The final weights on the test split, once, for tasks that evaluate (classifiers), when
    the test split is not already the validation split. Never used to pick a checkpoint."""
    from lightning.pytorch.utilities.model_helpers import is_overridden

    if not is_overridden("test_step", module) or not cfg.data.get("val_size"):
        return None
    metrics = trainer.test(module, datamodule=datamodule, verbose=False)[0]
    return {k: float(v) for k, v in sorted(metrics.items())}


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


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
