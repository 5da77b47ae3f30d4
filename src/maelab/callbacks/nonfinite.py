"""Stop a run at its first non-finite loss or gradient, as the official MAE code stops
(``if not math.isfinite(loss_value): sys.exit(1)``), before the optimizer step writes NaN into
the weights: the last checkpoint stays the last finite state.

``max_skipped_steps`` > 0 instead skips that many bad optimizer steps (no update, as a
mixed-precision grad scaler skips an overflow), each logged and counted in ``train/skipped_steps``,
and stops at the next one: a rare spike survives, a diverged run still ends.

The check costs one host sync per optimizer step (the official code syncs on ``loss.item()``
every step too). Under DDP every rank takes part in one reduction, so all ranks skip or stop
together."""

import logging

import lightning as L
import torch

from maelab.errors import UserError

log = logging.getLogger(__name__)


class TrainingDiverged(UserError):
    """The loss or a gradient became NaN or Inf."""


class NonFiniteGuard(L.Callback):
    def __init__(self, max_skipped_steps: int = 0):
        self.max_skipped = max_skipped_steps
        self.skipped = 0  # over every job of the run (carried in checkpoints); results.json reads it
        self._loss: torch.Tensor | None = None  # the worst loss of the micro-batches of this step

    def state_dict(self) -> dict:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped = state_dict["skipped"]

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        # the latest loss, or the non-finite one of an earlier micro-batch: tensor ops, no host sync
        loss = loss.detach().float()
        self._loss = loss if self._loss is None else torch.where(torch.isfinite(self._loss), loss, self._loss)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        loss, self._loss = self._loss, None
        state = torch.zeros(3, device=pl_module.device)  # loss not finite, gradients not finite, loss
        if loss is not None:
            state[0], state[2] = (~torch.isfinite(loss)).float(), loss
        if not scaler_handles_overflow(trainer):  # fp16's grad scaler skips overflowed steps itself
            state[1] = (~torch.isfinite(grad_norm(optimizer))).float()
        loss_bad, grads_bad, loss_sum = trainer.strategy.reduce(state, reduce_op="sum").tolist()  # all ranks agree
        if not (loss_bad or grads_bad):
            return
        self.skipped += 1
        what = "the loss is NaN or Inf" if loss_bad else "the gradients hold NaN or Inf"
        where = where_it_stopped(trainer, optimizer, loss_sum / trainer.world_size)
        if self.skipped > self.max_skipped:
            if trainer.global_rank != 0:
                raise SystemExit(2)  # every rank stops here; rank 0 reports it, once
            raise TrainingDiverged(
                f"training diverged: {what} at {where}"
                + (f", after skipping {self.skipped - 1}" if self.max_skipped else "")
                + f"; {last_checkpoint(trainer)} Lower task.base_lr or raise task.warmup_epochs; "
                "callbacks.nonfinite_guard.max_skipped_steps=N skips N such steps"
            )
        log.warning("%s: skipped the optimizer step at %s (%d of %d)", what, where, self.skipped, self.max_skipped)
        optimizer.zero_grad(set_to_none=True)  # no gradient: the optimizer leaves every weight as it is
        pl_module.log("train/skipped_steps", float(self.skipped), on_step=True, on_epoch=False, rank_zero_only=True)


def scaler_handles_overflow(trainer: L.Trainer) -> bool:
    return getattr(trainer.precision_plugin, "scaler", None) is not None


def grad_norm(optimizer) -> torch.Tensor:
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))


def where_it_stopped(trainer: L.Trainer, optimizer, loss: float) -> str:
    """Step, epoch, the loss (averaged over ranks) and the largest learning rate of the groups."""
    lr = max(group["lr"] for group in optimizer.param_groups)
    return f"step {trainer.global_step} (epoch {trainer.current_epoch}; train/loss {loss:.4g}, lr {lr:.3g})"


def last_checkpoint(trainer: L.Trainer) -> str:
    """What the run's last.ckpt holds now (the last finite state), as a sentence."""
    from maelab.callbacks.last_checkpoint import LastCheckpoint

    last = next((c for c in trainer.callbacks if isinstance(c, LastCheckpoint)), None)
    if last is None or not last.path.is_file():
        return "no checkpoint was written before it."
    step = last.saved_step if last.saved_step is not None else "an earlier job's"
    return f"{last.path} holds the last finite state (step {step})."
