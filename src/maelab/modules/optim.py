"""Optimiser policy shared by every task: weight-decay and layer-decay groups (timm's), the
paper's lr scaling rule, and linear warmup followed by a half-cycle cosine, stepped every
optimizer step.

One deliberate difference from the official pretraining code: there, timm's ``add_weight_decay``
without a skip list decays the cls and mask tokens (3-D tensors); here they are not decayed, like
biases, norms and position embeddings."""

import math

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from maelab.errors import UserError

# Parameters that are not weight matrices although they have several dimensions.
NO_DECAY_NAMES = ("cls_token", "mask_token", "pos_embed", "decoder_pos_embed")


def decays(name: str, p: torch.Tensor) -> bool:
    """Whether weight decay applies: weight matrices only, not biases, norms, tokens or positions."""
    return not (p.ndim <= 1 or name.endswith(".bias") or name.split(".")[-1] in NO_DECAY_NAMES)


def by_kind(model: nn.Module, groups: list[dict], depth: dict[str, int] | None = None) -> list[dict]:
    """Groups in the order maelab's checkpoints hold optimizer states in: without depths the
    decayed group first; with depths by (depth, decayed), the undecayed first at each depth. The
    kind is read from the parameters (a group's weight_decay is 0 everywhere when the recipe's is)."""
    names = {id(p): name for name, p in model.named_parameters()}

    def key(group: dict) -> tuple[int, bool]:
        name = names[id(group["params"][0])]
        decayed = decays(name, group["params"][0])
        return (depth[name], decayed) if depth else (0, not decayed)

    return sorted(groups, key=key)


def param_groups_weight_decay(model: nn.Module, weight_decay: float) -> list[dict]:
    """timm's weight-decay groups (``decays``): the decayed group first, then the rest."""
    from timm.optim import param_groups_weight_decay as timm_groups

    # with weight_decay=0 timm makes one group; asked for a non-zero value it keeps the two kinds
    # apart, as maelab's checkpoints hold them, and the value is set afterwards
    groups = timm_groups(model, 1.0, no_weight_decay_list=NO_DECAY_NAMES)
    for group in groups:
        group["weight_decay"] = weight_decay if group["weight_decay"] else 0.0
    return by_kind(model, groups)


def effective_batch_size(trainer: L.Trainer, per_device_batch: int) -> int:
    """Images per optimizer step: per-device batch x devices x nodes x gradient accumulation."""
    return per_device_batch * trainer.world_size * trainer.accumulate_grad_batches


def scaled_lr(base_lr: float, effective_batch: int) -> float:
    """The paper's linear scaling rule: lr = base_lr * effective_batch / 256."""
    return base_lr * effective_batch / 256


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """lr multiplier: linear from 0 over warmup_steps, then half-cycle cosine down to min_ratio."""
    if step < warmup_steps:
        return step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def schedule_steps(trainer: L.Trainer, warmup_epochs: float) -> tuple[int, int]:
    """(warmup_steps, total_steps) in optimizer steps. The schedule follows max_epochs, so
    ``trainer.max_steps`` only cuts a run short without reshaping its lr curve; with
    ``max_epochs=-1`` it follows max_steps."""
    estimated = trainer.estimated_stepping_batches  # also sets up the train dataloader
    # the samplers make an epoch whole optimizer steps; a limit_train_batches cut ends with a partial one
    steps_per_epoch = math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches)
    if trainer.max_epochs is not None and trainer.max_epochs > 0:
        total = steps_per_epoch * trainer.max_epochs
    else:
        total = int(estimated)
    return round(warmup_epochs * steps_per_epoch), total


def param_groups_layer_decay(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """timm's layer-wise lr decay (BEiT; the official fine-tuning) over the depths the model's
    ``group_matcher`` declares (embeddings 0, block i at i + 1, final norms and head at depth + 1):
    a parameter at depth ``d`` learns at ``layer_decay ** (depth + 1 - d)`` times the lr, under
    ``lr_scale``. Groups sorted by (depth, decayed), the order maelab's checkpoints hold
    optimizer states in."""
    from timm.models import group_parameters
    from timm.optim import param_groups_layer_decay as timm_groups

    groups = timm_groups(model, weight_decay, no_weight_decay_list=NO_DECAY_NAMES, layer_decay=layer_decay)
    return by_kind(model, groups, group_parameters(model, model.group_matcher(coarse=False), reverse=True))


def warmup_cosine_schedule(
    module: L.LightningModule,
    groups: list[dict],
    make_optimizer,
    base_lr: float,
    min_lr: float,
    warmup_epochs: float,
) -> dict:
    """Lightning's ``configure_optimizers`` answer: ``make_optimizer(groups, lr)`` with the
    scaled lr (times each group's ``lr_scale``) and a per-step warmup + cosine schedule. Records
    the resolved figures on ``module``."""
    trainer = module.trainer
    per_device_batch = trainer.datamodule.batch_size
    module.effective_batch_size = effective_batch_size(trainer, per_device_batch)
    module.lr = scaled_lr(base_lr, module.effective_batch_size)
    warmup_steps, total_steps = schedule_steps(trainer, warmup_epochs)
    module.schedule = {"warmup_steps": warmup_steps, "total_steps": total_steps}
    rank_zero_info(
        f"effective batch {module.effective_batch_size} = {per_device_batch} per device x {trainer.world_size} "
        f"device(s) x {trainer.accumulate_grad_batches} accumulated; lr = {base_lr:g} x "
        f"{module.effective_batch_size}/256 = {module.lr:.4g}; {warmup_steps} warmup of {total_steps} steps"
    )
    if min_lr > module.lr:
        raise UserError(f"task.min_lr={min_lr} is above the scaled lr {module.lr:.3g}: the cosine would climb")
    for group in groups:
        group["lr"] = module.lr * group.get("lr_scale", 1.0)
    optimizer = make_optimizer(groups, module.lr)
    min_ratio = min_lr / module.lr
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup_steps, total_steps, min_ratio)
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def adamw_warmup_cosine(
    module: L.LightningModule,
    groups: list[dict],
    base_lr: float,
    min_lr: float,
    betas: tuple[float, float],
    warmup_epochs: float,
) -> dict:
    """AdamW (fused into one kernel on a GPU) under the warmup + cosine schedule."""

    def adamw(groups, lr):
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=module.device.type == "cuda")

    return warmup_cosine_schedule(module, groups, adamw, base_lr, min_lr, warmup_epochs)


def lars_warmup_cosine(
    module: L.LightningModule,
    groups: list[dict],
    base_lr: float,
    min_lr: float,
    momentum: float,
    warmup_epochs: float,
) -> dict:
    """timm's LARS as the official linear probe uses it: SGD with momentum whose update of each
    weight matrix is scaled by the trust ratio 0.001 * |w| / |g|; biases and other 1-D
    parameters take the plain momentum step (the official LARS skips them, timm adapts only
    where ``always_adapt`` or weight decay is set)."""
    from timm.optim import Lars

    def lars(groups, lr):
        return Lars(groups, lr=lr, momentum=momentum, trust_coeff=0.001)

    return warmup_cosine_schedule(module, lars_groups(groups), lars, base_lr, min_lr, warmup_epochs)


def lars_groups(groups: list[dict]) -> list[dict]:
    """Each group split in its weight matrices (trust-ratio adapted) and the rest (not)."""
    split = []
    for group in groups:
        matrices = [p for p in group["params"] if p.ndim > 1]
        vectors = [p for p in group["params"] if p.ndim <= 1]
        split += [{**group, "params": matrices, "always_adapt": True}] if matrices else []
        split += [{**group, "params": vectors, "always_adapt": False}] if vectors else []
    return split
