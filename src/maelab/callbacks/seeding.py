"""Per-rank random streams, carried through checkpoints."""

import logging
import random

import lightning as L
import numpy as np
import torch
import torch.distributed as dist

from maelab.data.samplers import rank_seed

log = logging.getLogger(__name__)


def _bytes(state: torch.Tensor) -> bytes:
    return state.numpy().tobytes()


def _tensor(state: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(state), dtype=torch.uint8)


def rng_states() -> dict:
    """Generator states as plain Python values: they cross ranks through pickling and load
    from a checkpoint with ``weights_only=True``."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states = {
        "torch": _bytes(torch.get_rng_state()),
        "numpy": (kind, keys.tolist(), pos, has_gauss, gauss),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = [_bytes(s) for s in torch.cuda.get_rng_state_all()]
    return states


def restore_rng_states(states: dict) -> None:
    torch.set_rng_state(_tensor(states["torch"]))
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_tensor(s) for s in states["cuda"]])


class RandomState(L.Callback):
    """Every rank draws its own masks, crops and shuffles: its generators are seeded from the
    run seed and its rank before the model trains (the model itself is initialised identically
    everywhere from the run seed). Checkpoints carry the generator states of every rank, so a
    resumed run continues each stream where it stopped, and at an epoch boundary matches an
    uninterrupted run bit for bit."""

    def __init__(self, seed: int):
        self.seed = seed

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        value = rank_seed(self.seed, trainer.global_rank)
        random.seed(value)
        np.random.seed(value)
        torch.manual_seed(value)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        states = [rng_states()]
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            states = [None] * trainer.world_size
            dist.all_gather_object(states, rng_states())  # every rank saves, rank 0 writes
        checkpoint["rng_states"] = states

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        states = checkpoint.get("rng_states") or []
        if len(states) == trainer.world_size:
            restore_rng_states(states[trainer.global_rank])
        else:
            log.warning(
                "the checkpoint holds random states for %d rank(s), this run has %d: "
                "each rank's stream starts again from the run seed",
                len(states),
                trainer.world_size,
            )
