"""``torch.compile`` with an eager fallback, for training (``task.compile=true``) and the bench.

The compiled wrapper is kept in the LightningModule's ``__dict__``, outside its children, so
checkpoints keep the plain parameter names. Where compilation is unavailable (no C++ compiler,
an unsupported op) the first step logs why and the run goes on eagerly: eager is correct, only
slower.
"""

import logging

import torch

log = logging.getLogger(__name__)

_KEY = "_compiled_model"


def compile_or_explain(model: torch.nn.Module, backend: str = "inductor"):
    """(``torch.compile(model)``, None), or (model, why) where this platform cannot compile it.
    torch.compile defers most work to the first call: a caller also falls back there."""
    try:
        return torch.compile(model, backend=backend), None
    except Exception as e:  # noqa: BLE001  (no compiler on this platform)
        return model, f"{type(e).__name__}: {str(e).splitlines()[0]}"


def compiled_call(owner: torch.nn.Module, model: torch.nn.Module, enabled: bool, *args):
    """``model(*args)``, through ``torch.compile(model)`` when ``enabled``."""
    if not enabled:
        return model(*args)
    compiled = owner.__dict__.get(_KEY)
    if compiled is None:
        compiled, why = compile_or_explain(model)
        if why is not None:
            log.warning("task.compile=true: torch.compile failed (%s); training eagerly", why)
        owner.__dict__[_KEY] = compiled
    if compiled is model:
        return model(*args)
    try:
        return compiled(*args)
    except Exception as e:  # noqa: BLE001
        log.warning("task.compile=true: torch.compile failed (%s: %s); training eagerly", type(e).__name__, e)
        owner.__dict__[_KEY] = model
        return model(*args)
