"""Each validation epoch's metrics, kept through checkpoints, for results.json's best and last."""

import lightning as L


class MetricHistory(L.Callback):
    """Records ``val/*`` after every validation epoch (not the sanity check). ``best()`` picks
    the epoch by the module's ``monitor`` (name, 'max' or 'min'), on the validation split only."""

    def __init__(self):
        self.epochs: list[dict] = []

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        self.epochs.append({"epoch": trainer.current_epoch, **dict(sorted(metrics.items()))})

    def best(self, monitor: str, mode: str) -> dict | None:
        scored = [e for e in self.epochs if monitor in e]
        if not scored:
            return None
        pick = max if mode == "max" else min
        return pick(scored, key=lambda e: e[monitor])

    def state_dict(self) -> dict:
        return {"epochs": self.epochs}

    def load_state_dict(self, state_dict: dict) -> None:
        self.epochs = list(state_dict["epochs"])
