"""Checks of user-settable values, run before anything is built or trained.

Each problem is reported as ``key=value: what is accepted``; all problems at once, then the run
stops. Keys a task does not have are not checked, so one list serves every task.
"""

import logging
from collections.abc import Callable
from numbers import Real

from omegaconf import DictConfig, OmegaConf

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


def pair(lo: float, hi: float | None):
    """Two numbers a <= b, within [lo, hi] (hi None: unbounded)."""
    return lambda v: (
        isinstance(v, list)
        and len(v) == 2
        and all(_is_num(x) and x >= lo and (hi is None or x <= hi) for x in v)
        and v[0] <= v[1]
    )


def per_channel(positive: bool):
    return lambda v: isinstance(v, list) and len(v) == 3 and all(_is_num(x) and (x > 0 or not positive) for x in v)


RULES: list[tuple[str, Callable[[object], bool], str]] = [
    ("seed", _is_int, "an integer"),
    ("task.mask_ratio", lambda v: _is_num(v) and 0 < v < 1, "a number in (0, 1), e.g. 0.75"),
    ("data.img_size", positive_int, "a positive integer (pixels)"),
    ("data.batch_size", positive_int, "a positive integer (images per device)"),
    ("data.eval_batch_size", lambda v: v is None or positive_int(v), "null or a positive integer"),
    ("data.num_classes", positive_int, "a positive integer"),
    ("data.num_train", positive_int, "a positive number of images"),
    ("data.num_test", positive_int, "a positive number of images"),
    ("data.val_size", lambda v: _is_int(v) and v >= 0, "0 (validate on test) or a number of held-out images"),
    ("data.mean", per_channel(positive=False), "three numbers, one per RGB channel"),
    ("data.std", per_channel(positive=True), "three positive numbers, one per RGB channel"),
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
    ("augment.scale", pair(1e-9, 1.0), "[min, max] area fractions with 0 < min <= max <= 1, e.g. [0.2, 1.0]"),
    ("augment.ratio", pair(1e-9, None), "[min, max] aspect ratios with 0 < min <= max, e.g. [0.75, 1.333]"),
    ("augment.interpolation", lambda v: v in ("bilinear", "bicubic", "nearest"), "bilinear, bicubic or nearest"),
    ("callbacks.last_checkpoint.every_n_epochs", positive_int, "a positive integer"),
    ("callbacks.periodic_checkpoint.every_n_epochs", positive_int, "a positive integer"),
    ("callbacks.reconstructions.every_n_epochs", positive_int, "a positive integer"),
    ("callbacks.reconstructions.num_images", positive_int, "a positive integer"),
    ("callbacks.throughput.window", positive_int, "a positive number of steps"),
    ("trainer.max_epochs", epochs_or_steps, "a positive integer, or -1 to stop by trainer.max_steps"),
    ("trainer.max_steps", epochs_or_steps, "a positive integer, or -1 to stop by trainer.max_epochs"),
    ("trainer.accumulate_grad_batches", positive_int, "a positive integer"),
    ("ckpt_path", lambda v: v is None or isinstance(v, str), "null, 'last' or the path of a .ckpt file"),
]


def _relations(get: Callable[[str], object]) -> list[str]:
    """Checks between keys, once each key alone is valid."""
    problems = []
    img, patch = get("data.img_size"), get("model.patch_size")
    if positive_int(img) and positive_int(patch):
        if img % patch:
            problems.append(
                f"data.img_size={img}: must be divisible by model.patch_size={patch} "
                f"(e.g. 32 px with patch 2 or 4, 224 px with patch 16 or 14)"
            )
        else:
            num_patches = (img // patch) ** 2
            ratio = get("task.mask_ratio")
            if _is_num(ratio) and 0 < ratio < 1 and not 0 < int(num_patches * (1 - ratio)) < num_patches:
                problems.append(
                    f"task.mask_ratio={ratio}: keeps {int(num_patches * (1 - ratio))} of {num_patches} "
                    f"patches; choose a ratio that keeps at least 1 and masks at least 1"
                )
    for width_key, heads_key in (("model.embed_dim", "model.num_heads"), ("task.decoder_width", "task.decoder_heads")):
        width, heads = get(width_key), get(heads_key)
        if positive_int(width) and positive_int(heads) and width % heads:
            problems.append(f"{width_key}={width}: must be divisible by {heads_key}={heads}")
        if positive_int(width) and width % 4:
            problems.append(f"{width_key}={width}: must be divisible by 4 (2-D sin-cos position embedding)")
    if get("trainer.max_epochs") == -1 and get("trainer.max_steps") == -1:
        problems.append("trainer.max_epochs=-1 and trainer.max_steps=-1: set one of them to a positive number")
    return problems


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError naming every invalid value and what would be accepted."""

    def get(key: str):
        value = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=False)
        return OmegaConf.to_object(value) if OmegaConf.is_config(value) else value

    problems = []
    for key, accepts, accepted in RULES:
        value = get(key)
        if value is not _ABSENT and not accepts(value):
            problems.append(f"{key}={value!r}: expected {accepted}")
    problems += _relations(get)  # each relation checks only keys that are valid alone
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
    warmup, epochs = get("task.warmup_epochs"), get("trainer.max_epochs")
    if non_negative(warmup) and positive_int(epochs) and warmup >= epochs:
        log.warning(
            "task.warmup_epochs=%s >= trainer.max_epochs=%s: the whole run is warmup, the lr never "
            "reaches its peak (fine for a smoke test)",
            warmup,
            epochs,
        )
