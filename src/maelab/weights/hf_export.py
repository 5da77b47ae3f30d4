"""``maelab export CKPT OUT --format hf``: a checkpoint as a Hugging Face model directory
(``config.json``, ``model.safetensors`` in the released key layout, ``preprocessor_config.json``):

- a pretraining checkpoint -> ``ViTMAEForPreTraining`` (``ViTMAEModel`` loads the same folder);
  with ``--encoder-only`` a ``ViTMAEModel`` folder without the decoder;
- a classifier pooled on the cls token (a linear probe's BatchNorm folded into its layer) ->
  ``ViTForImageClassification``;
- a classifier pooled by average: no ``transformers`` ViT class pools that way (they all classify
  the cls token), so the folder is timm's layout with the config ``transformers``' ``TimmWrapper``
  reads: ``AutoModelForImageClassification.from_pretrained(OUT)`` loads it, computing the same logits.
"""

import json
from pathlib import Path

import torch

from maelab.atomic import remove_quietly, write_atomically, write_text_atomically
from maelab.errors import UserError
from maelab.weights.hf import IMAGENET_MEAN, IMAGENET_STD, LAYER_NORM_EPS, hf_state
from maelab.weights.loading import load_user_file
from maelab.weights.pretrained import state_dict_of
from maelab.weights.timm import TIMM_NAMES, architecture, fold_batchnorm_head, timm_state_dict

ENCODER_PREFIXES = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")
DECODER_PREFIXES = ("mask_token", "decoder_")
PIXEL_TARGETS = {"NormPixelTarget": True, "PixelTarget": False}  # target class -> norm_pix_loss
OFFICIAL_DECODER_HEADS = 16  # every official mae_vit_* model
STALE = (
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "preprocessor_config.json",
)


def vit_config(arch: dict, in_chans: int) -> dict:
    """The config keys ViT and ViTMAE share, for MAE's ViT."""
    return {
        "hidden_size": arch["embed_dim"],
        "num_hidden_layers": arch["depth"],
        "num_attention_heads": arch["num_heads"],
        "intermediate_size": round(arch["embed_dim"] * arch["mlp_ratio"]),
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": LAYER_NORM_EPS,  # not Hugging Face's default 1e-12
        "image_size": arch["img_size"],
        "patch_size": arch["patch_size"],
        "num_channels": in_chans,
        "qkv_bias": True,
        "dtype": "float32",
    }


def mae_config(state: dict, hparams: dict, arch: dict, in_chans: int, source: str) -> dict:
    target = ((hparams.get("target") or {}).get("_target_") or "").rsplit(".", 1)[-1]
    if target and target not in PIXEL_TARGETS:
        raise UserError(
            f"{source} predicts {target}; Hugging Face's ViTMAE predicts pixels (norm_pix_loss true or false): "
            "export the encoder alone with --encoder-only"
        )
    width = state["decoder_embed.weight"].shape[0]
    return {
        "architectures": ["ViTMAEForPreTraining"],
        "model_type": "vit_mae",
        **vit_config(arch, in_chans),
        "decoder_hidden_size": width,
        "decoder_num_hidden_layers": 1 + max(int(k.split(".")[1]) for k in state if k.startswith("decoder_blocks.")),
        "decoder_num_attention_heads": hparams.get("decoder_heads", OFFICIAL_DECODER_HEADS),
        "decoder_intermediate_size": state["decoder_blocks.0.mlp.fc1.weight"].shape[0],
        "mask_ratio": hparams.get("mask_ratio", 0.75),
        "norm_pix_loss": PIXEL_TARGETS.get(target, True),  # the official files were trained with it
    }


def classifier_state(state: dict) -> dict:
    """The encoder and the head as one linear layer (a probe's BatchNorm folded in)."""
    out = {k: v for k, v in state.items() if k.startswith(ENCODER_PREFIXES)}
    if "head.1.weight" in state:
        out["head.weight"], out["head.bias"] = fold_batchnorm_head(state)
    else:
        out["head.weight"], out["head.bias"] = state["head.weight"], state["head.bias"]
    return out


EVAL_CROP = 0.875  # the image-folder recipes' evaluation view: resize to size / 0.875, center crop
FOLDER_SIZES = 224  # from this size up the recipes read image folders; below, whole images (CIFAR-10's)


def crop_fraction(size: int) -> float:
    return EVAL_CROP if size >= FOLDER_SIZES else 1.0


def preprocessor(mean: list, std: list, size: int) -> dict:
    """What ``AutoImageProcessor.from_pretrained(OUT)`` builds, maelab's evaluation view: at 224 px
    and more, the short side resized to size / 0.875 and the center crop (ConvNext's processor does
    exactly that below 384 px); below, the whole image resized (CIFAR-10's view). Then scaled to
    [0, 1] and normalised with the checkpoint's mean and std."""
    cropped = {"image_processor_type": "ConvNextImageProcessor", "size": {"shortest_edge": size}, "crop_pct": EVAL_CROP}
    whole = {"image_processor_type": "ViTImageProcessor", "size": {"height": size, "width": size}}
    return {
        **(cropped if crop_fraction(size) < 1 else whole),
        "do_resize": True,
        "resample": 3,  # bicubic
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": mean,
        "image_std": std,
    }


def write_folder(out: Path, tensors: dict[str, torch.Tensor], config: dict, extra: dict[str, dict]) -> list[str]:
    from safetensors.torch import save

    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; --format hf writes a folder: name a new or existing folder")
    out.mkdir(parents=True, exist_ok=True)
    for stale in STALE:  # an earlier export's, or another library's: readers would take them first
        remove_quietly(out / stale)
    data = save({k: v.contiguous() for k, v in tensors.items()}, metadata={"format": "pt"})
    write_atomically(out / "model.safetensors", lambda f: f.write(data), size_hint=len(data))
    for name, content in {"config.json": config, **extra}.items():
        write_text_atomically(out / name, json.dumps(content, indent=2) + "\n")
    return ["model.safetensors", "config.json", *extra]


def export_hf(ckpt: str, out: str, encoder_only: bool = False, num_heads: int | None = None, trust: bool = False):
    raw = load_user_file(ckpt, trust=trust, setting="--trust-checkpoint-code")
    state, kind = state_dict_of(raw, ckpt)
    source = f"{ckpt} ({kind})"
    hparams = dict(raw.get("hyper_parameters") or {}) if isinstance(raw, dict) else {}
    if "cls_token" not in state:
        raise UserError(f"{source} has no ViT encoder: cls_token is missing")
    arch = architecture(state, hparams, num_heads)
    in_chans = state["patch_embed.proj.weight"].shape[1]
    mean, std = list(hparams.get("mean") or IMAGENET_MEAN), list(hparams.get("std") or IMAGENET_STD)
    extra = {"preprocessor_config.json": preprocessor(mean, std, arch["img_size"])}
    has_head = any(k.startswith("head.") for k in state)
    if "decoder_pred.weight" in state and not encoder_only:
        config = mae_config(state, hparams, arch, in_chans, source)
        tensors = {k: v for k, v in state.items() if k.startswith(ENCODER_PREFIXES + DECODER_PREFIXES)}
    elif has_head and not encoder_only and "norm.weight" in state:
        num_classes = state["head.1.weight" if "head.1.weight" in state else "head.weight"].shape[0]
        config = {"architectures": ["ViTForImageClassification"], "model_type": "vit", **vit_config(arch, in_chans)}
        config.update(encoder_stride=arch["patch_size"], id2label={str(i): f"LABEL_{i}" for i in range(num_classes)})
        tensors = classifier_state(state)
    elif has_head and not encoder_only:
        return export_timm_wrapper(state, arch, mean, std, Path(out), source)
    elif "norm.weight" in state:
        config = {"architectures": ["ViTMAEModel"], "model_type": "vit_mae", **vit_config(arch, in_chans)}
        tensors = {k: v for k, v in state.items() if k.startswith(ENCODER_PREFIXES)}
    else:
        raise UserError(
            f"{source} pools by average with its LayerNorm after the pooling; ViTMAEModel normalises every "
            "token before it: export it with --format timm (timm's global_pool='avg')"
        )
    files = write_folder(Path(out), hf_state(tensors), config, extra)
    return {"class": config["architectures"][0], "files": files, "source": source}


def export_timm_wrapper(state: dict, arch: dict, mean: list, std: list, out: Path, source: str) -> dict:
    """An average-pooled classifier in timm's layout, with the config transformers' TimmWrapper reads."""
    tensors, num_classes = timm_state_dict(state, "avg")
    args = {**arch, "global_pool": "avg"}
    config = {
        "architecture": TIMM_NAMES.get((arch["embed_dim"], arch["depth"]), "vit_base_patch16_224"),
        "model_args": args,
        "num_classes": num_classes,
        "num_features": arch["embed_dim"],
        "global_pool": "avg",
        "label_names": [f"LABEL_{i}" for i in range(num_classes)],
        "pretrained_cfg": {
            "input_size": [arch.get("in_chans", 3), arch["img_size"], arch["img_size"]],
            "interpolation": "bicubic",
            "crop_pct": crop_fraction(arch["img_size"]),
            "crop_mode": "center",
            "mean": mean,
            "std": std,
        },
    }
    files = write_folder(out, tensors, config, {})
    return {"class": "TimmWrapperForImageClassification", "files": files, "source": source}
