"""Random-number-generator state saved with checkpoints, so a resumed run draws the same
masks, crops and shuffles as one that was never stopped."""

import random

import numpy as np
import torch


def _numpy_state() -> tuple:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return kind, torch.from_numpy(keys.copy()), pos, has_gauss, gauss  # loadable with weights_only


def rng_states() -> dict:
    states = {
        "torch": torch.get_rng_state(),
        "numpy": _numpy_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, gauss))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
