"""A run's parts from its composed config: the datamodule, the task's LightningModule and the
Lightning Trainer with every callback and logger the config names (``--cfg job`` shows them all).

The values groups share (image size, normalisation, the model, target and masking configs) are
wired into each task by interpolation in ``conf/task/*.yaml``. Two things only the built run
knows are passed here: where the training augmentation runs (in the loader's workers or batched
on the device), and the class count of an image folder (``data.num_classes: null``).
"""

import logging

from omegaconf import DictConfig

from maelab.config.resolvers import runs_on_gpu
from maelab.errors import UserError

log = logging.getLogger(__name__)


def resolve_precision(trainer_cfg: DictConfig) -> str:
    """``precision: auto`` is maelab's policy: bf16 mixed precision on a GPU, fp32 elsewhere."""
    precision = str(trainer_cfg.get("precision", "auto"))
    if precision != "auto":
        return precision
    import torch

    return "bf16-mixed" if runs_on_gpu(trainer_cfg) and torch.cuda.is_bf16_supported() else "32-true"


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


def loader_augmentation(cfg: DictConfig, datamodule) -> bool:
    """Hands the training augmentation to the datamodule's loader workers where it must run there
    and says whether it did: a per-image (PIL) one such as RandAugment (``in_loader``), or any
    augmentation of a datamodule that decodes files of varied sizes (ImageNet), in its
    ``per_image()`` form (``per_file()`` with ``data.decode=fast``: it decodes the file itself).
    Otherwise it runs batched on the device, inside the task."""
    from hydra.utils import get_class, instantiate

    augment = cfg.get("augment") or None
    if augment is None:
        return False
    size, mean, std = cfg.data.img_size, cfg.data.mean, cfg.data.std
    if getattr(get_class(augment._target_), "in_loader", False):
        datamodule.train_transform = instantiate(augment, size=size, mean=mean, std=std)
    elif getattr(datamodule, "per_image_transforms", False):
        augmentation = instantiate(augment, size=size)
        decode = getattr(datamodule, "decode", "pil")
        if decode == "gpu" and not hasattr(augmentation, "per_device"):
            raise UserError(
                f"data.decode=gpu draws RandomResizedCrop boxes from file headers (augment=rrc_flip); "
                f"{augment._target_} needs decoded images: use data.decode=fast"
            )
        if decode == "gpu":
            datamodule.train_transform = augmentation.per_device()
        elif decode == "fast" and hasattr(augmentation, "per_file"):
            datamodule.train_transform = augmentation.per_file()
        else:
            datamodule.train_transform = augmentation.per_image()
    else:
        return False
    return True


def build_task(cfg: DictConfig, datamodule=None):
    """The task's LightningModule, its parts given as plain values (hyper-parameters that
    rebuild it from a checkpoint). With a datamodule: the augmentation it runs in its loader is
    not run again on the device, and a classifier takes the class count it found."""
    from hydra.utils import instantiate

    known = {}
    if datamodule is not None:
        if loader_augmentation(cfg, datamodule):
            known["augment"] = None
        if "num_classes" in cfg.task:
            known["num_classes"] = datamodule.num_classes  # an image folder counts its class folders
            if not datamodule.num_classes:
                raise UserError(
                    f"a classifier needs labels and data.root={cfg.data.root} has none (no class folders, "
                    "root/<class>/<image>); pretrain on it, then fine-tune or probe on a labelled folder"
                )
    return instantiate(cfg.task, **known, _recursive_=False, _convert_="all")


def build_trainer(cfg: DictConfig):
    """Lightning's Trainer with the config's callbacks and loggers, atomic checkpoint writes and,
    on SLURM, submitit as the one owner of requeueing (``run/preemption.py``)."""
    from hydra.utils import instantiate
    from lightning.fabric.plugins.environments import SLURMEnvironment

    from maelab.run.slurm import check_slurm_allocation
    from maelab.weights.checkpoints import AtomicCheckpointIO

    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c]
    plugins = [AtomicCheckpointIO(trust=bool(cfg.get("trust_checkpoint_code")))]
    if SLURMEnvironment.detect():
        check_slurm_allocation(cfg.trainer)
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers or False,
        precision=resolve_precision(cfg.trainer),
        plugins=plugins,
    )


def build(cfg: DictConfig):
    """(datamodule, module, trainer) from a composed config."""
    import lightning as L
    from hydra.utils import instantiate

    quiet_lightning()
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # the model's initial weights
    datamodule = instantiate(cfg.data)
    module = build_task(cfg, datamodule)
    trainer = build_trainer(cfg)
    derive_accumulation(cfg, trainer)
    return datamodule, module, trainer
