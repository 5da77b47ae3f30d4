"""The timm layout: the encoder (and head) of a maelab or official MAE checkpoint as a state dict
that timm's ``VisionTransformer`` loads with ``strict=True``, plus ``OUT.json`` with the
``timm.create_model`` arguments that fit it (``maelab export``).

timm's layout: with ``global_pool='token'`` the final LayerNorm is ``norm`` and ``fc_norm`` is
absent; with ``'avg'`` it is the other way round. A linear probe's BatchNorm head (running
statistics, no affine) is folded into the linear layer, which computes the same logits."""

import json
from pathlib import Path

import torch

from maelab.atomic import write_atomically, write_text_atomically
from maelab.errors import UserError
from maelab.weights.loading import load_user_file, tensor_bytes
from maelab.weights.pretrained import state_dict_of

ENCODER_KEYS = ("cls_token", "pos_embed", "patch_embed.", "blocks.")
HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}  # the named ViT sizes
TIMM_NAMES = {  # (width, depth) -> the timm model of that size; others: vit_base with every size given
    (192, 12): "vit_tiny_patch16_224",
    (384, 12): "vit_small_patch16_224",
    (768, 12): "vit_base_patch16_224",
    (1024, 24): "vit_large_patch16_224",
    (1280, 32): "vit_huge_patch14_224",
}


def fold_batchnorm_head(state: dict[str, torch.Tensor], eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear(BatchNorm(x)) with running statistics and no affine -> one Linear (weight, bias)."""
    mean, var = state["head.0.running_mean"], state["head.0.running_var"]
    weight, bias = state["head.1.weight"], state["head.1.bias"]
    scale = (var + eps).rsqrt()
    return weight * scale, bias - (weight * scale) @ mean


def architecture(state: dict[str, torch.Tensor], hparams: dict, num_heads: int | None) -> dict:
    """timm VisionTransformer arguments for the encoder in ``state``."""
    width = state["cls_token"].shape[-1]
    patch = state["patch_embed.proj.weight"].shape[-1]
    grid = round((state["pos_embed"].shape[1] - 1) ** 0.5)
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    heads = num_heads or (hparams.get("model") or {}).get("num_heads") or HEADS_BY_WIDTH.get(width)
    if heads is None:
        raise UserError(f"cannot tell the number of heads of a {width}-wide encoder: pass --num-heads")
    channels = state["patch_embed.proj.weight"].shape[1]
    return {
        "img_size": grid * patch,
        "patch_size": patch,
        **({"in_chans": channels} if channels != 3 else {}),  # timm's default is RGB
        "embed_dim": width,
        "depth": depth,
        "num_heads": heads,
        "mlp_ratio": state["blocks.0.mlp.fc1.weight"].shape[0] / width,
    }


def timm_state_dict(state: dict[str, torch.Tensor], global_pool: str) -> tuple[dict[str, torch.Tensor], int]:
    """(timm state dict, num_classes; 0 for an encoder without a head)."""
    out = {k: v for k, v in state.items() if k.startswith(ENCODER_KEYS)}
    has_norm, has_fc_norm = "norm.weight" in state, "fc_norm.weight" in state
    if global_pool == "token":
        if not has_norm:
            raise UserError("this checkpoint pools by average (no final norm before pooling): export --global-pool avg")
        out["norm.weight"], out["norm.bias"] = state["norm.weight"], state["norm.bias"]
    else:
        # an encoder's final norm becomes the norm after pooling, as timm's avg layout has it
        src = "fc_norm" if has_fc_norm else "norm"
        if f"{src}.weight" not in state:
            raise UserError(
                "an average-pooled linear probe (its BatchNorm in place of fc_norm) has no timm layout: "
                "timm's average pooling always has a LayerNorm before or after it"
            )
        out["fc_norm.weight"], out["fc_norm.bias"] = state[f"{src}.weight"], state[f"{src}.bias"]
    if "head.1.weight" in state:
        out["head.weight"], out["head.bias"] = fold_batchnorm_head(state)
    elif "head.weight" in state:
        out["head.weight"], out["head.bias"] = state["head.weight"], state["head.bias"]
    num_classes = out["head.weight"].shape[0] if "head.weight" in out else 0
    return {k: v.contiguous() for k, v in out.items()}, num_classes


def export(
    ckpt: str, out: str, global_pool: str | None = None, num_heads: int | None = None, trust: bool = False
) -> dict:
    raw = load_user_file(ckpt, trust=trust, setting="--trust-checkpoint-code")
    state, kind = state_dict_of(raw, ckpt)
    hparams = dict(raw.get("hyper_parameters") or {}) if isinstance(raw, dict) else {}
    missing = [k for k in ("cls_token", "pos_embed", "patch_embed.proj.weight") if k not in state]
    if missing:
        raise UserError(f"{ckpt} ({kind}) has no ViT encoder: {missing[0]} is missing")
    own_pool = hparams.get("global_pool") or ("avg" if "fc_norm.weight" in state else "token")
    has_head = any(k.startswith("head.") for k in state)
    if has_head and global_pool not in (None, own_pool):
        raise UserError(
            f"{ckpt} is a classifier trained on {own_pool!r} pooling; its head means nothing on "
            f"{global_pool!r} features: leave out --global-pool"
        )
    global_pool = global_pool or (own_pool if has_head else "token")  # an encoder's default: the cls token
    timm_state, num_classes = timm_state_dict(state, global_pool)
    kwargs = {**architecture(state, hparams, num_heads), "num_classes": num_classes, "global_pool": global_pool}
    out_path = Path(out)
    write_atomically(out_path, lambda f: torch.save(timm_state, f), size_hint=tensor_bytes(timm_state))
    name = TIMM_NAMES.get((kwargs["embed_dim"], kwargs["depth"]), "vit_base_patch16_224")
    meta = {"timm_model": name, "kwargs": kwargs, "source": f"{ckpt} ({kind})"}
    write_text_atomically(out_path.with_name(out_path.name + ".json"), json.dumps(meta, indent=2) + "\n")
    return meta
