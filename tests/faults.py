"""Faults injected into real runs through the config, as a user's run would meet them:
``+callbacks.fault._target_=tests.faults.NonFiniteAt +callbacks.fault.steps=[5]``."""

import lightning as L
import torch


class NonFiniteAt(L.Callback):
    """Turn the patch embedding's output into NaN (or Inf) during the training batches of the
    given optimizer steps, on the given ranks: the loss and every gradient become non-finite
    while the weights are untouched."""

    def __init__(self, steps: list[int], ranks: list[int] | None = None, value: float = float("nan")):
        self.steps, self.ranks, self.value = set(steps), ranks, value
        self.active = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        pl_module.model.patch_embed.register_forward_hook(lambda m, i, out: out * self.value if self.active else out)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        rank_chosen = self.ranks is None or trainer.global_rank in self.ranks
        self.active = rank_chosen and trainer.global_step in self.steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.active = False


def finite_weights(path) -> bool:
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())
