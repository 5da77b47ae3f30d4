"""Checks of user-settable values, run before anything is built or trained.

Each problem is reported as ``key=value: what is accepted``; all problems at once, then the run
stops. Keys a task does not have are not checked, so one list serves every task. Values alone
and relations between values are checked first, without importing anything heavy; then whether
the task fits the rest of the config (``task_fit.py``, which imports the task's class), before
the values where the task was switched away from its experiment's, so that the user reads that
first, in one line; then the contracts between the chosen parts (a callback and the datamodule
it needs), which import their classes.
"""

import logging
from collections.abc import Callable
from numbers import Real
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from maelab.config.task_fit import task_fit_problems, task_switched
from maelab.errors import ConfigError

log = logging.getLogger(__name__)

_ABSENT = object()


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool)


def positive_int(v) -> bool:
    return _is_int(v) and v > 0


def non_negative(v) -> bool:
    return _is_num(v) and v >= 0


def epochs_or_steps(v) -> bool:
    return _is_int(v) and (v > 0 or v == -1)


def positive_int_or_folder(v) -> bool:
    return positive_int(v) or v is None  # the datamodule refuses null where it cannot count folders


def limit_batches(v) -> bool:
    return v is None or (_is_int(v) and v >= 1) or (isinstance(v, float) and 0 < v <= 1)


def pair(lo: float, hi: float | None):
    """Two numbers a <= b, within [lo, hi] (hi None: unbounded)."""
    return lambda v: (
        isinstance(v, list)
        and len(v) == 2
        and all(_is_num(x) and x >= lo and (hi is None or x <= hi) for x in v)
        and v[0] <= v[1]
    )


def per_channel(positive: bool):
    return lambda v: isinstance(v, list) and len(v) in (1, 3) and all(_is_num(x) and (x > 0 or not positive) for x in v)


def count_or_fraction(v) -> bool:
    return (_is_int(v) and v >= 0) or (_is_num(v) and 0 < v < 1)


RULES: list[tuple[str, Callable[[object], bool], str]] = [
    ("seed", _is_int, "an integer"),
    ("signal_check_every_n_steps", positive_int, "a positive integer (optimizer steps)"),
    ("task.mask_ratio", lambda v: _is_num(v) and 0 < v < 1, "a number in (0, 1), e.g. 0.75"),
    ("data.img_size", positive_int, "a positive integer (pixels)"),
    ("data.batch_size", positive_int, "a positive integer (images per device)"),
    ("data.eval_batch_size", lambda v: v is None or positive_int(v), "null or a positive integer"),
    ("data.num_classes", positive_int_or_folder, "a positive integer (null for an image folder: its class count)"),
    ("data.skip_bad_images", lambda v: isinstance(v, bool), "true (skip, log and count unreadable files) or false"),
    ("data.eval_crop_fraction", lambda v: _is_num(v) and 0 < v <= 1, "a fraction in (0, 1], e.g. 0.875"),
    ("data.num_workers", lambda v: v is None or (_is_int(v) and v >= 0), "null (automatic) or a number >= 0"),
    ("data.num_train", positive_int, "a positive number of images"),
    ("data.num_test", positive_int, "a positive number of images"),
    ("data.val_size", count_or_fraction, "0 (validate on test), a number of held-out images or a fraction in (0, 1)"),
    ("data.mean", per_channel(positive=False), "one number per channel (three for RGB, one for grayscale)"),
    ("data.std", per_channel(positive=True), "one positive number per channel (three for RGB, one for grayscale)"),
    ("data.channels", lambda v: v in (1, 3), "1 (grayscale) or 3 (RGB)"),
    ("data.decode", lambda v: v in ("fast", "pil", "gpu"), "fast, pil or gpu (docs/data.md)"),
    ("data.labels", lambda v: v in ("auto", "folders", "none"), "auto, folders or none"),
    ("model.in_chans", lambda v: v in (1, 3), "1 or 3 (set data.channels; the model follows it)"),
    ("model.patch_size", positive_int, "a positive integer (pixels)"),
    ("model.embed_dim", positive_int, "a positive integer"),
    ("model.depth", positive_int, "a positive integer"),
    ("model.num_heads", positive_int, "a positive integer"),
    ("model.mlp_ratio", lambda v: _is_num(v) and v > 0, "a positive number"),
    ("task.decoder_width", positive_int, "a positive integer"),
    ("task.decoder_depth", positive_int, "a positive integer"),
    ("task.decoder_heads", positive_int, "a positive integer"),
    ("task.effective_batch_size", lambda v: v is None or positive_int(v), "null or a positive integer"),
    ("task.base_lr", lambda v: _is_num(v) and v > 0, "a positive number"),
    ("task.min_lr", non_negative, "a number >= 0"),
    ("task.weight_decay", non_negative, "a number >= 0"),
    ("task.warmup_epochs", non_negative, "a number of epochs >= 0"),
    (
        "task.betas",
        lambda v: isinstance(v, list) and len(v) == 2 and all(_is_num(b) and 0 <= b < 1 for b in v),
        "two numbers in [0, 1), e.g. [0.9, 0.95]",
    ),
    (
        "task.pretrained",
        lambda v: v is None or isinstance(v, str),
        "null (random weights) or a checkpoint: a pretraining run's checkpoints/last.ckpt, an official MAE .pth "
        "or a Hugging Face ViTMAE / ViT folder",
    ),
    (
        "task.init_from",
        lambda v: v is None or isinstance(v, str),
        "null or a pretraining checkpoint (maelab .ckpt, official .pth, Hugging Face ViTMAEForPreTraining folder)",
    ),
    ("task.global_pool", lambda v: v in ("avg", "token"), "avg (mean of patch tokens) or token (cls)"),
    ("task.optimizer", lambda v: v in ("adamw", "lars"), "adamw or lars"),
    ("task.layer_decay", lambda v: _is_num(v) and 0 < v <= 1, "a number in (0, 1], 1.0 for none"),
    ("task.drop_path_rate", lambda v: _is_num(v) and 0 <= v < 1, "a number in [0, 1)"),
    ("task.trainable_blocks", lambda v: v is None or (_is_int(v) and v >= 0), "null or a number of blocks >= 0"),
    ("task.mixup", non_negative, "a Beta alpha >= 0 (0: off)"),
    ("task.cutmix", non_negative, "a Beta alpha >= 0 (0: off)"),
    ("task.label_smoothing", lambda v: _is_num(v) and 0 <= v < 1, "a number in [0, 1)"),
    ("task.momentum", lambda v: _is_num(v) and 0 <= v < 1, "a number in [0, 1)"),
    ("augment.re_prob", lambda v: _is_num(v) and 0 <= v <= 1, "a probability in [0, 1]"),
    ("augment.hflip", lambda v: v is True or v is False or (_is_num(v) and 0 <= v <= 1), "a probability"),
    ("augment.scale", pair(1e-9, 1.0), "[min, max] area fractions with 0 < min <= max <= 1, e.g. [0.2, 1.0]"),
    ("augment.ratio", pair(1e-9, None), "[min, max] aspect ratios with 0 < min <= max, e.g. [0.75, 1.333]"),
    ("augment.interpolation", lambda v: v in ("bilinear", "bicubic", "nearest"), "bilinear, bicubic or nearest"),
    ("callbacks.last_checkpoint.every_n_epochs", positive_int, "a positive integer"),
    ("callbacks.periodic_checkpoint.every_n_epochs", positive_int, "a positive integer"),
    ("callbacks.reconstructions.every_n_epochs", positive_int, "a positive integer"),
    ("callbacks.reconstructions.num_images", positive_int, "a positive integer"),
    ("callbacks.throughput.window", positive_int, "a positive number of steps"),
    ("callbacks.nonfinite_guard.max_skipped_steps", lambda v: _is_int(v) and v >= 0, "0 (stop at the first) or more"),
    ("callbacks.knn_monitor.every_n_epochs", positive_int, "a positive integer"),
    ("callbacks.knn_monitor.k", positive_int, "a positive number of neighbours"),
    ("callbacks.knn_monitor.temperature", lambda v: _is_num(v) and v > 0, "a positive number"),
    ("trainer.max_epochs", epochs_or_steps, "a positive integer, or -1 to stop by trainer.max_steps"),
    ("trainer.max_steps", epochs_or_steps, "a positive integer, or -1 to stop by trainer.max_epochs"),
    ("trainer.accumulate_grad_batches", positive_int, "a positive integer"),
    *(
        (f"trainer.limit_{split}_batches", limit_batches, "null, a number of batches >= 1, or a fraction in (0, 1]")
        for split in ("train", "val", "test")
    ),
    ("ckpt_path", lambda v: v is None or isinstance(v, str), "null, 'last' or the path of a .ckpt file"),
]


# Callbacks a run cannot do without: its bookkeeping (conf/callbacks/default.yaml).
REQUIRED_CALLBACKS = {
    "random_state": "each rank's random streams, carried through checkpoints so a resumed run is exact",
    "metric_history": "results.json's best and last epochs",
    "elapsed_time": "results.json's elapsed_s over every job of a resumed run",
    "preemption": "saving last.ckpt when SLURM, submitit or kill sends its signal",
    "nonfinite_guard": "stopping at a NaN or Inf loss before it reaches the weights; max_skipped_steps tolerates some",
}


FRACTION_VAL_SIZE = ("FolderDataModule", "ShardsDataModule")  # the datamodules that take a share


def _channel_problems(get: Callable[[str], object]) -> list[str]:
    problems = []
    val_size, target = get("data.val_size"), get("data._target_")
    if _is_num(val_size) and 0 < val_size < 1 and isinstance(target, str):
        if not target.endswith(FRACTION_VAL_SIZE):
            problems.append(f"data.val_size={val_size}: a fraction is for data=folder; give a number of images")
    channels = get("data.channels")
    channels = 3 if channels is _ABSENT else channels
    for key in ("data.mean", "data.std"):
        values = get(key)
        if isinstance(values, list) and len(values) != channels:
            problems.append(f"{key} has {len(values)} values for {channels} channels (data.channels): one per channel")
    in_chans = get("model.in_chans")
    if in_chans not in (_ABSENT, channels):
        problems.append(f"model.in_chans={in_chans} but the images have {channels} channels; set data.channels only")
    return problems


def _patch_problems(get: Callable[[str], object]) -> list[str]:
    img, patch = get("data.img_size"), get("model.patch_size")
    if not (positive_int(img) and positive_int(patch)):
        return []
    if img % patch:
        return [
            f"data.img_size={img}: must be divisible by model.patch_size={patch} "
            f"(e.g. 32 px with patch 2 or 4, 224 px with patch 16 or 14)"
        ]
    num_patches, ratio = (img // patch) ** 2, get("task.mask_ratio")
    if _is_num(ratio) and 0 < ratio < 1 and not 0 < int(num_patches * (1 - ratio)) < num_patches:
        return [
            f"task.mask_ratio={ratio}: keeps {int(num_patches * (1 - ratio))} of {num_patches} "
            f"patches; choose a ratio that keeps at least 1 and masks at least 1"
        ]
    return []


def _width_problems(get: Callable[[str], object]) -> list[str]:
    problems = []
    for width_key, heads_key in (("model.embed_dim", "model.num_heads"), ("task.decoder_width", "task.decoder_heads")):
        width, heads = get(width_key), get(heads_key)
        if positive_int(width) and positive_int(heads) and width % heads:
            problems.append(f"{width_key}={width}: must be divisible by {heads_key}={heads}")
        if positive_int(width) and width % 4:
            problems.append(f"{width_key}={width}: must be divisible by 4 (2-D sin-cos position embedding)")
    return problems


def _file_problems(get: Callable[[str], object]) -> list[str]:
    problems = []
    resuming = get("ckpt_path") not in (None, _ABSENT)  # a resumed run does not read the file again
    for key in ("task.pretrained", "task.init_from"):
        path = get(key)
        if not isinstance(path, str) or resuming:
            continue
        where = Path(path).expanduser()
        if where.is_dir() and not (where / "config.json").is_file():
            problems.append(f"{key}={path}: a folder without config.json; a Hugging Face model folder has one")
        elif not where.exists():
            problems.append(f"{key}={path}: no such file (relative paths start at {Path.cwd()})")
    return problems


def _task_problems(get: Callable[[str], object]) -> list[str]:
    problems = []
    depth, trainable = get("model.depth"), get("task.trainable_blocks")
    if positive_int(depth) and _is_int(trainable) and trainable > depth:
        problems.append(f"task.trainable_blocks={trainable}: the encoder has only model.depth={depth} blocks")
    if get("task.freeze_encoder") is True and _is_int(trainable):
        problems.append(
            f"task.trainable_blocks={trainable} with task.freeze_encoder=true: choose one "
            "(a frozen encoder trains no blocks)"
        )
    mixing = any(_is_num(get(k)) and get(k) > 0 for k in ("task.mixup", "task.cutmix"))
    batch = get("data.batch_size")
    if mixing and positive_int(batch) and batch % 2:
        problems.append(f"data.batch_size={batch}: mixup/cutmix pair images, so it must be even")
    if get("trainer.max_epochs") == -1 and get("trainer.max_steps") == -1:
        problems.append("trainer.max_epochs=-1 and trainer.max_steps=-1: set one of them to a positive number")
    return problems


def _callback_problems(get: Callable[[str], object]) -> list[str]:
    problems = [
        f"callbacks.{name}: always on ({why}); it cannot be removed"
        for name, why in REQUIRED_CALLBACKS.items()
        if get(f"callbacks.{name}") in (_ABSENT, None)
    ]
    if get("callbacks.best_checkpoint") not in (_ABSENT, None) and get("data.val_size") == 0:
        problems.append(
            "callbacks.best_checkpoint: would choose an epoch on the test split (data.val_size=0 validates on "
            "test); hold training images out with data.val_size=N (the CIFAR-10 experiments use 5000) or "
            "drop it with ~callbacks.best_checkpoint"
        )
    knn, val_every = get("callbacks.knn_monitor.every_n_epochs"), get("trainer.check_val_every_n_epoch")
    if positive_int(knn) and positive_int(val_every) and knn % val_every:
        problems.append(
            f"callbacks.knn_monitor.every_n_epochs={knn}: the monitor runs with validation, so it must be a "
            f"multiple of trainer.check_val_every_n_epoch={val_every}"
        )
    return problems


def _contract_problems(get: Callable[[str], object]) -> list[str]:
    """Callbacks that need a datamodule with more than loaders (``data/protocols.py``); those that
    need another task are ``task_fit.py``'s. Imports the classes the config names."""
    from hydra.utils import get_class

    from maelab.data.protocols import PreviewImages, SplitsOnDevice

    target = get("data._target_")
    data = get_class(target) if isinstance(target, str) else None
    problems = []
    needs = [("reconstructions", PreviewImages, "a fixed set of images to draw (preview_images)")]
    needs += [("knn_monitor", SplitsOnDevice, "whole splits held in memory (cifar10, synthetic, folder): ImageNet "
               "or shards would be decoded whole at every check. Drop it with callbacks.knn_monitor=null (the "
               "ImageNet recipes do)")]  # fmt: skip
    for name, protocol, why in needs:
        if get(f"callbacks.{name}") not in (_ABSENT, None) and data is not None and not issubclass(data, protocol):
            problems.append(f"callbacks.{name}: needs {why}; {data.__name__} has none")
    return problems


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError naming every invalid value and what would be accepted."""

    def get(key: str):
        value = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=False)
        return OmegaConf.to_object(value) if OmegaConf.is_config(value) else value

    problems = _value_problems(cfg, get)
    relations = (_patch_problems, _width_problems, _file_problems, _task_problems, _callback_problems)
    relations += (_channel_problems,)
    for relation in relations:
        problems += relation(get)  # each relation checks only keys that are valid alone
    if not problems or task_switched(cfg):  # it imports the task's class; a switched task is named first
        problems = task_fit_problems(cfg) + problems  # raises where the switched task does not fit
    if not problems:
        problems = _contract_problems(get)
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
    _warn_about_recipes(get)


def _value_problems(cfg: DictConfig, get: Callable[[str], object]) -> list[str]:
    problems = []
    for key, accepts, accepted in RULES:
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if OmegaConf.is_config(node) and leaf in node.keys() and OmegaConf.is_missing(node, leaf):
            problems.append(f"{key} is required: expected {accepted}")
            continue
        value = get(key)
        if value is not _ABSENT and not accepts(value):
            problems.append(f"{key}={value!r}: expected {accepted}")
    return problems


def _warn_about_recipes(get: Callable[[str], object]) -> None:
    """Legal settings that are probably not what was meant."""
    from hydra.utils import get_class

    from maelab.data.timm_augment import TimmTrainTransform

    augment = get("augment._target_")
    randaug = isinstance(augment, str) and issubclass(get_class(augment), TimmTrainTransform)
    fine_tuning = get("task.pretrained") not in (_ABSENT, None) and get("task.freeze_encoder") is False
    if get("task.mixup") not in (_ABSENT, None) and not randaug and fine_tuning:
        log.warning(
            "fine-tuning without RandAugment and random erasing (augment=%s): the official recipe "
            "uses augment=randaug (randaug_cifar for 32 px)",
            augment if augment is not _ABSENT else "none",
        )
    warmup, epochs = get("task.warmup_epochs"), get("trainer.max_epochs")
    if non_negative(warmup) and positive_int(epochs) and warmup >= epochs:
        log.warning(
            "task.warmup_epochs=%s >= trainer.max_epochs=%s: the whole run is warmup, the lr never "
            "reaches its peak (fine for a smoke test)",
            warmup,
            epochs,
        )
