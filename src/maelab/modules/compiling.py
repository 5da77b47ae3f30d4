"""``task.compile=true``: run a module's model through ``torch.compile``, or eagerly where it
cannot be compiled.

The compiled wrapper is kept in the LightningModule's ``__dict__``, outside its children, so
checkpoints keep the plain parameter names. Where compilation is unavailable (no C++ compiler,
an unsupported op) the first step logs why and the run goes on eagerly: eager is correct, only
slower.
"""

import logging

import torch

log = logging.getLogger(__name__)

_KEY = "_compiled_model"


def compiled_call(owner: torch.nn.Module, model: torch.nn.Module, enabled: bool, *args):
    """``model(*args)``, through ``torch.compile(model)`` when ``enabled``."""
    if not enabled:
        return model(*args)
    compiled = owner.__dict__.get(_KEY)
    if compiled is None:
        compiled = owner.__dict__[_KEY] = torch.compile(model)
    if compiled is model:
        return model(*args)
    try:
        return compiled(*args)
    except Exception as e:  # noqa: BLE001
        log.warning("task.compile=true: torch.compile failed (%s: %s); training eagerly", type(e).__name__, e)
        owner.__dict__[_KEY] = model
        return model(*args)
