"""Hugging Face model directories (``config.json`` + ``model.safetensors`` or
``pytorch_model.bin``, sharded or not) of ``ViTMAEForPreTraining``, ``ViTMAEModel`` and
``ViTForImageClassification``, in maelab's names; and maelab's tensors in Hugging Face's names.

The same tensors go by three sets of names:
- released Hub files (transformers 4.x): ``vit.encoder.layer.N.attention.attention.query``,
  ``...attention.output.dense``, ``...intermediate.dense``, ``...output.dense``;
  ``decoder.decoder_layers.N`` likewise;
- transformers 5.x models: ``vit.layers.N.attention.q_proj``, ``...o_proj``, ``...mlp.fc1|fc2``;
- transformers 5.x ``save_pretrained``: the released names, except the decoder's blocks, which
  come out as ``decoder.decoder_encoder.layer.N`` (its rule ``encoder.layer. -> layers.`` reversed).
Reading applies transformers' own renaming rules (``conversion_mapping.py``, ``ViTModel`` and
``ViTMAEForPreTraining``), which bring all three to the 5.x names, then maps those to maelab's.
Writing uses the released names, which transformers 4.x and 5.x both read.

The traps: q, k and v are three layers there and one (``qkv``) here; Hugging Face's
``layer_norm_eps`` default is 1e-12 where MAE trained with 1e-6 (the released ViTMAE weights
were converted from MAE's, so 1e-6 is their own); the sin-cos table is stored in the file and
read from it, so its layout travels with it."""

import json
import logging
import re
from pathlib import Path

import torch

from maelab.errors import UserError
from maelab.weights.loading import TRUST_SETTING, load_weights_file

log = logging.getLogger(__name__)

MODEL_TYPES = ("vit_mae", "vit")
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # for files that name none
LAYER_NORM_EPS = 1e-6  # MAE's (models/vit.py)

# transformers' renaming rules, released name -> 5.x name, in the order it applies them
RELEASED_TO_CURRENT = [
    ("encoder.layer.", "layers."),  # also turns 5.x's decoder.decoder_encoder.layer. into decoder_layers.
    ("attention.attention.query.", "attention.q_proj."),
    ("attention.attention.key.", "attention.k_proj."),
    ("attention.attention.value.", "attention.v_proj."),
    ("attention.output.dense.", "attention.o_proj."),
    ("intermediate.dense.", "mlp.fc1."),
    ("output.dense.", "mlp.fc2."),
]
# 5.x names -> maelab's (official MAE's, timm's): everything but the blocks
CURRENT_TO_MAELAB = {
    "vit.embeddings.cls_token": "cls_token",
    "vit.embeddings.position_embeddings": "pos_embed",
    "vit.embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "vit.embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "vit.layernorm.weight": "norm.weight",
    "vit.layernorm.bias": "norm.bias",
    "decoder.mask_token": "mask_token",
    "decoder.decoder_pos_embed": "decoder_pos_embed",
    "decoder.decoder_embed.weight": "decoder_embed.weight",
    "decoder.decoder_embed.bias": "decoder_embed.bias",
    "decoder.decoder_norm.weight": "decoder_norm.weight",
    "decoder.decoder_norm.bias": "decoder_norm.bias",
    "decoder.decoder_pred.weight": "decoder_pred.weight",
    "decoder.decoder_pred.bias": "decoder_pred.bias",
    "classifier.weight": "head.weight",
    "classifier.bias": "head.bias",
}
BLOCKS = {"vit.layers.": "blocks.", "decoder.decoder_layers.": "decoder_blocks."}
BLOCK_PARTS = {  # inside a block, 5.x -> maelab; q_proj, k_proj, v_proj become one qkv
    "layernorm_before": "norm1",
    "attention.o_proj": "attn.proj",
    "layernorm_after": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
QKV = ("q_proj", "k_proj", "v_proj")
BLOCK_KEY = re.compile(r"^(vit\.layers\.|decoder\.decoder_layers\.)(\d+)\.(.+)\.(weight|bias)$")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def is_hf_directory(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def current_name(key: str, prefix: str) -> str:
    """A file's key in transformers 5.x's names with the ``vit.`` prefix a model with a head has."""
    for released, current in RELEASED_TO_CURRENT:
        key = key.replace(released, current)
    if prefix and key.startswith(("embeddings.", "layers.", "layernorm.", "pooler.")):
        key = prefix + key  # a ViTMAEModel / ViTModel saved on its own
    return key


def maelab_state(hf_state: dict[str, torch.Tensor], source: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(state dict in maelab's names, keys of the file with no counterpart) from any of the
    three layouts."""
    state, qkv, unused = {}, {}, []
    for key, value in hf_state.items():
        name = current_name(key, "vit.")
        block = BLOCK_KEY.match(name)
        if name in CURRENT_TO_MAELAB:
            state[CURRENT_TO_MAELAB[name]] = value
        elif block and block[3] in BLOCK_PARTS:
            state[f"{BLOCKS[block[1]]}{block[2]}.{BLOCK_PARTS[block[3]]}.{block[4]}"] = value
        elif block and block[3].startswith("attention.") and block[3].split(".")[-1] in QKV:
            qkv.setdefault((BLOCKS[block[1]], block[2], block[4]), {})[block[3].split(".")[-1]] = value
        else:
            unused.append(key)
    for (blocks, index, kind), parts in qkv.items():
        if set(parts) != set(QKV):
            raise UserError(f"{source}: block {index} has {sorted(parts)} of its attention {kind}s, not q, k and v")
        state[f"{blocks}{index}.attn.qkv.{kind}"] = torch.cat([parts[name] for name in QKV])
    return state, unused


def hf_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """maelab's names -> the released Hugging Face names (``vit.encoder.layer.N...``)."""
    to_current = {ours: theirs for theirs, ours in CURRENT_TO_MAELAB.items()}
    out = {}
    for key, value in state.items():
        if key in to_current:
            out[released_name(to_current[key])] = value
            continue
        blocks, index, rest = key.split(".", 2)
        prefix = {ours: theirs for theirs, ours in BLOCKS.items()}[blocks + "."]
        part, kind = rest.rsplit(".", 1)
        if part == "attn.qkv":
            for name, chunk in zip(QKV, value.chunk(3)):
                out[released_name(f"{prefix}{index}.attention.{name}.{kind}")] = chunk
        else:
            inner = {ours: theirs for theirs, ours in BLOCK_PARTS.items()}[part]
            out[released_name(f"{prefix}{index}.{inner}.{kind}")] = value
    return {k: v.contiguous() for k, v in out.items()}


def released_name(key: str) -> str:
    """transformers 5.x name -> the released one (the rules above, backwards; the decoder's
    blocks were always ``decoder_layers``)."""
    key = re.sub(r"^vit\.layers\.", "vit.encoder.layer.", key)
    for released, current in reversed(RELEASED_TO_CURRENT[1:]):
        key = key.replace(current, released)
    return key


def read_config(folder: Path) -> dict:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{folder / 'config.json'}: not a readable JSON file ({e})") from None
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise UserError(
            f"{folder / 'config.json'}: model_type {model_type!r}; maelab reads Hugging Face "
            "ViTMAE (vit_mae: ViTMAEForPreTraining, ViTMAEModel) and ViT (vit: ViTForImageClassification) models"
        )
    for key, wanted in (("hidden_act", "gelu"), ("qkv_bias", True)):
        if config.get(key, wanted) != wanted:
            raise UserError(f"{folder / 'config.json'}: {key}={config[key]!r}; MAE's ViT has {key}={wanted!r}")
    return config


def read_preprocessing(folder: str | Path) -> dict:
    """``mean`` and ``std`` from a folder's ``preprocessor_config.json``; ImageNet's without one."""
    path = Path(folder) / "preprocessor_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    return {"mean": config.get("image_mean", IMAGENET_MEAN), "std": config.get("image_std", IMAGENET_STD)}


def weight_files(folder: Path) -> list[Path]:
    """The file (or, for a sharded model, the files of its index) that hold the weights."""
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return [folder / name]
        index = folder / f"{name}.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [folder / shard for shard in shards]
    raise UserError(f"{folder}: has config.json but no weights ({' or '.join(WEIGHT_FILES)}, or their .index.json)")


def read_tensors(path: Path, trust: bool, setting: str) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":  # tensors and a header, never code
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except (SafetensorError, OSError) as e:
            raise UserError(f"{path}: unreadable, truncated or corrupt safetensors file ({e})") from None
    return load_weights_file(path, trust=trust, setting=setting)


def read_hf_directory(
    folder: str | Path, trust: bool = False, setting: str = TRUST_SETTING
) -> tuple[dict[str, torch.Tensor], dict, str]:
    """(state dict in maelab's names, the model's settings, what the folder was)."""
    folder = Path(folder)
    config = read_config(folder)
    hf = {}
    for path in weight_files(folder):
        hf.update(read_tensors(path, trust, setting))
    kind = f"Hugging Face {(config.get('architectures') or [config['model_type']])[0]}"
    state, unused = maelab_state(hf, f"{folder} ({kind})")
    if unused:
        more = " ..." if len(unused) > 5 else ""
        log.info(f"{folder}: not used from the file: {', '.join(sorted(unused)[:5])}{more}")
    return state, settings_of(config), kind


def settings_of(config: dict) -> dict:
    """maelab's model settings from a Hugging Face config (ViTMAE's decoder settings when present)."""
    width = config["hidden_size"]
    settings = {
        "img_size": config.get("image_size", 224),
        "patch_size": config.get("patch_size", 16),
        "in_chans": config.get("num_channels", 3),
        "embed_dim": width,
        "depth": config["num_hidden_layers"],
        "num_heads": config["num_attention_heads"],
        "mlp_ratio": config.get("intermediate_size", 4 * width) / width,
        "layer_norm_eps": config.get("layer_norm_eps", 1e-12),
    }
    if config["model_type"] == "vit_mae":
        settings.update(
            decoder_width=config.get("decoder_hidden_size", 512),
            decoder_depth=config.get("decoder_num_hidden_layers", 8),
            decoder_heads=config.get("decoder_num_attention_heads", 16),
            mask_ratio=config.get("mask_ratio", 0.75),
            norm_pix_loss=config.get("norm_pix_loss", False),
        )
    return settings


# maelab's setting -> (Hugging Face's key, the config key that sets it here)
SETTING_NAMES = {
    "in_chans": ("num_channels", "data.channels"),
    "patch_size": ("patch_size", "model.patch_size"),
    "embed_dim": ("hidden_size", "model.embed_dim"),
    "depth": ("num_hidden_layers", "model.depth"),
    "num_heads": ("num_attention_heads", "model.num_heads"),
    "mlp_ratio": ("intermediate_size / hidden_size", "model.mlp_ratio"),
    "decoder_width": ("decoder_hidden_size", "task.decoder_width"),
    "decoder_depth": ("decoder_num_hidden_layers", "task.decoder_depth"),
    "decoder_heads": ("decoder_num_attention_heads", "task.decoder_heads"),
}


def model_settings(model) -> dict:
    """The settings of a maelab encoder (and decoder, for an MAE) that a config.json also names."""
    block = model.blocks[0]
    own = {
        "in_chans": model.patch_embed.proj.in_channels,
        "patch_size": model.patch_embed.patch_size,
        "embed_dim": model.embed_dim,
        "depth": len(model.blocks),
        "num_heads": block.attn.num_heads,
        "mlp_ratio": block.mlp.fc1.out_features / model.embed_dim,
    }
    if hasattr(model, "decoder_blocks"):
        own.update(
            decoder_width=model.decoder_embed.out_features,
            decoder_depth=len(model.decoder_blocks),
            decoder_heads=model.decoder_blocks[0].attn.num_heads,
        )
    return own


def check_settings(model, settings: dict, source: str, decoder: bool) -> None:
    """Refuse a model whose settings differ from the file's config, naming both; say when the
    file's LayerNorm epsilon is not MAE's. The image size may differ (positions are resized)."""
    own = model_settings(model)
    names = [k for k in SETTING_NAMES if k in own and k in settings and (decoder or not k.startswith("decoder"))]
    wrong = [k for k in names if own[k] != settings[k]]
    if wrong:
        pairs = "; ".join(
            f"{SETTING_NAMES[k][0]}={settings[k]:g} there, {SETTING_NAMES[k][1]}={own[k]:g} here" for k in wrong
        )
        fix = " ".join(f"{SETTING_NAMES[k][1]}={settings[k]:g}" for k in wrong)
        raise UserError(f"{source} is another model: {pairs}; choose the model it is ({fix})")
    if settings["layer_norm_eps"] != LAYER_NORM_EPS:
        log.info(
            f"{source}: config.json says layer_norm_eps={settings['layer_norm_eps']:g} (Hugging Face's default); "
            f"maelab keeps MAE's {LAYER_NORM_EPS:g}, the value the released MAE weights were trained with"
        )
