"""Weights users already have: maelab checkpoints (Lightning ``.ckpt``), the official MAE
``.pth`` files (``{'model': state_dict, ...}``, the same parameter names as maelab's models) and
Hugging Face ViTMAE / ViT folders (renamed in ``weights/hf.py``).

Loading is strict about what matters: every encoder tensor the model has must come from the
file with the same shape, except a head and its ``fc_norm`` (new for a classifier) and a
position embedding of another grid, which is interpolated (bicubic, cls position kept)."""

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from maelab.errors import UserError
from maelab.weights.hf import check_settings, is_hf_directory, read_config, read_hf_directory, settings_of
from maelab.weights.loading import TRUST_SETTING, load_user_file

log = logging.getLogger(__name__)

ENCODER_PREFIXES = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")
HEAD_PREFIXES = ("head.", "fc_norm.")
FIXED_POSITIONS = ("pos_embed", "decoder_pos_embed")


def read_state_dict(
    path: str | Path, trust: bool = False, setting: str = TRUST_SETTING
) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict with the model's own names, what the file was) from a maelab checkpoint,
    an official MAE file, a bare state dict or a Hugging Face model folder; read as weights only
    unless ``trust``."""
    if is_hf_directory(path):
        state, _, kind = read_hf_directory(path, trust, setting)
        return state, kind
    ckpt = load_user_file(path, trust=trust, setting=setting)
    return state_dict_of(ckpt, path)


def check_hf_settings(model: nn.Module, path: str | Path, decoder: bool) -> None:
    """A Hugging Face folder names its model's settings: refuse a model of other settings."""
    if is_hf_directory(path):
        check_settings(model, settings_of(read_config(Path(path))), str(path), decoder)


def state_dict_of(ckpt, path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict with the model's own names, what the file was) from a loaded file."""
    if isinstance(ckpt, dict) and "state_dict" in ckpt and "pytorch-lightning_version" in ckpt:
        prefix = "model."
        state = {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
        return state, f"maelab checkpoint (epoch {ckpt.get('epoch')}, step {ckpt.get('global_step')})"
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict):
        return ckpt["model"], "official MAE checkpoint"
    if isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return ckpt, "state dict"
    raise UserError(
        f"{path}: expected a maelab .ckpt (with 'state_dict'), an official MAE .pth (with 'model') "
        "or a state dict of tensors"
    )


def interpolate_pos_embed(pos: torch.Tensor, num_patches: int) -> torch.Tensor:
    """(1, 1 + L_old, D) -> (1, 1 + num_patches, D): the patch positions resized bicubically as a
    square grid, the cls position kept."""
    cls, grid = pos[:, :1], pos[:, 1:]
    old, new = int(grid.shape[1] ** 0.5), int(num_patches**0.5)
    grid = grid.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new * new, -1).to(pos.dtype)
    return torch.cat([cls, grid], dim=1)


def fit_positions(state: dict[str, torch.Tensor], model: nn.Module, source: str) -> None:
    """Interpolate position embeddings of another grid in place (and say so)."""
    own = model.state_dict()
    for key in FIXED_POSITIONS:
        if key in state and key in own and state[key].shape != own[key].shape:
            theirs, ours = state[key].shape, own[key].shape
            if theirs[-1] != ours[-1] or theirs[1] < 2:
                continue  # a width mismatch: reported with the other shape errors
            state[key] = interpolate_pos_embed(state[key], ours[1] - 1)
            log.info(f"{source}: {key} interpolated from {theirs[1] - 1} to {ours[1] - 1} patches (bicubic, cls kept)")


def check_shapes(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor], source: str) -> None:
    channels = "patch_embed.proj.weight"
    if channels in state and channels in own and state[channels].shape[1] != own[channels].shape[1]:
        raise UserError(
            f"{source} takes images of {state[channels].shape[1]} channel(s), this model {own[channels].shape[1]}: "
            f"set data.channels={state[channels].shape[1]}"
        )
    for key, value in own.items():
        if key in state and state[key].shape != value.shape:
            raise UserError(
                f"{source}: {key} is {tuple(state[key].shape)} there, {tuple(value.shape)} in this model; "
                "choose the model config the checkpoint was trained with (model=..., model.patch_size=...)"
            )


def _first(keys: list[str]) -> str:
    return keys[0] + (f" and {len(keys) - 1} more" if len(keys) > 1 else "")


def load_encoder(model: nn.Module, path: str | Path, trust: bool = False) -> None:
    """Load the encoder of ``path`` into a classifier (or any model with the encoder's names)."""
    check_hf_settings(model, path, decoder=False)
    state, kind = read_state_dict(path, trust)
    load_encoder_state(model, state, f"{path} ({kind})")


def load_encoder_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``load_encoder`` on a state dict already read; ``source`` names it in messages."""
    own = model.state_dict()
    unused = sorted({k.split(".")[0] for k in state if k not in own or k.startswith(HEAD_PREFIXES)})
    state = {k: v for k, v in state.items() if k in own and not k.startswith(HEAD_PREFIXES)}
    missing = [k for k in own if not k.startswith(HEAD_PREFIXES) and k not in state]
    if missing:
        raise UserError(
            f"{source} lacks encoder weight {_first(missing)}; "
            "pass a maelab pretraining or classifier checkpoint, an official MAE file or a Hugging Face folder"
        )
    fit_positions(state, model, source)
    check_shapes(state, own, source)
    model.load_state_dict(state, strict=False)
    fresh = sorted({k.split(".")[0] for k in own if k not in state})
    log.info(
        f"loaded the encoder ({len(state)} tensors) from {source}; "
        f"not used from the file: {', '.join(unused) or 'nothing'}; starting fresh: {', '.join(fresh) or 'nothing'}"
    )


def load_full(model: nn.Module, path: str | Path, trust: bool = False) -> None:
    """Load every tensor of ``model`` (encoder and decoder) from ``path``: an MAE that continues
    from an official or maelab pretraining checkpoint, or a Hugging Face ViTMAEForPreTraining."""
    check_hf_settings(model, path, decoder=True)
    state, kind = read_state_dict(path, trust)
    source = f"{path} ({kind})"
    own = model.state_dict()
    # a target estimated from data (PCA) is fitted again at the start, with this run's settings
    own = {k: v for k, v in own.items() if not k.startswith("target.")}
    missing = [k for k in own if k not in state]
    if missing:
        raise UserError(
            f"{source} lacks {_first(missing)}; "
            "task.init_from needs a pretraining checkpoint with its decoder (maelab, official MAE or Hugging Face "
            "ViTMAEForPreTraining)"
        )
    state = {k: state[k] for k in own if k in state}
    fit_positions(state, model, source)
    check_shapes(state, own, source)
    model.load_state_dict(state, strict=False)
    log.info(f"initialised encoder and decoder ({len(state)} tensors) from {source}")
