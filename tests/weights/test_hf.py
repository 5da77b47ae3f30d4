"""Hugging Face interop: a transformers ViTMAE / ViT model and maelab's compute the same from the
same tensors, whichever way they travel and whichever key layout the folder has. Small random
models built here; nothing is downloaded."""

import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from maelab.errors import UserError
from maelab.models.classifier import ViTClassifier
from maelab.models.mae import MaskedAutoencoder
from maelab.models.pos_embed import get_2d_sincos_pos_embed
from maelab.weights.hf_export import export_hf
from maelab.weights.pretrained import load_encoder, load_full

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    AutoModelForImageClassification,
    ViTConfig,
    ViTForImageClassification,
    ViTMAEConfig,
    ViTMAEForPreTraining,
    ViTMAEModel,
)
from transformers.models.vit_mae.modeling_vit_mae import build_2d_sinusoidal_position_embedding  # noqa: E402

ENCODER = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
DECODER = dict(decoder_width=16, decoder_depth=1, decoder_heads=2)
HF_SIZES = dict(
    image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128
)
HF_DECODER = dict(
    decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=2, decoder_intermediate_size=64
)

# transformers' published rules (conversion_mapping.py, "ViTModel" and "ViTMAEForPreTraining"),
# released name -> 5.x name; the test runs them backwards to make a released-layout file
PUBLISHED_RULES = [
    ("attention.attention.query", "attention.q_proj"),
    ("attention.attention.key", "attention.k_proj"),
    ("attention.attention.value", "attention.v_proj"),
    ("attention.output.dense", "attention.o_proj"),
    ("intermediate.dense", "mlp.fc1"),
    ("output.dense", "mlp.fc2"),
]


def released_layout(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        for released, current in reversed(PUBLISHED_RULES):
            key = key.replace(current, released)
        out[key.replace("vit.layers.", "vit.encoder.layer.")] = value  # ViTModel's "encoder.layer." -> "layers."
    return out


def sincos(width: int, grid: int) -> torch.Tensor:
    """Hugging Face's table as its initialisation lays it out (the halves swapped to MAE's order)."""
    table = build_2d_sinusoidal_position_embedding(grid, grid, embed_dim=width, cls_token=True)
    half = width // 2
    return torch.cat([table[..., half:], table[..., :half]], dim=-1).unsqueeze(0).float()


def hf_mae(layer_norm_eps: float = 1e-6, seed: int = 0) -> ViTMAEForPreTraining:
    """A random ViTMAEForPreTraining with the sin-cos tables a released file holds."""
    torch.manual_seed(seed)
    config = ViTMAEConfig(**HF_SIZES, **HF_DECODER, layer_norm_eps=layer_norm_eps, norm_pix_loss=True)
    model = ViTMAEForPreTraining(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # every tensor distinct from its initial value
        model.vit.embeddings.position_embeddings.copy_(sincos(32, 4))
        model.decoder.decoder_pos_embed.copy_(sincos(16, 4))
    return model


def test_the_sincos_table_is_maelabs_once_hugging_face_swaps_its_halves():
    """The trap: Hugging Face builds [sin_h|cos_h|sin_w|cos_w] and swaps the halves to match
    the released weights; MAE's table (and maelab's) is that swapped one."""
    ours = get_2d_sincos_pos_embed(768, (14, 14), cls_token=True).float().unsqueeze(0)
    assert torch.allclose(sincos(768, 14), ours, atol=1e-6)
    unswapped = build_2d_sinusoidal_position_embedding(14, 14, embed_dim=768, cls_token=True).float()
    assert (unswapped - ours).abs().max() > 1.0


def write_layout(model, folder, layout: str) -> None:
    """The folder Hugging Face users have, in one of the layouts found in the wild."""
    if layout == "save_pretrained":  # transformers 5.x's writer (released names, its decoder quirk)
        model.save_pretrained(folder)
        return
    folder.mkdir()
    (folder / "config.json").write_text(model.config.to_json_string())
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if layout == "current":  # the names of a transformers 5.x model
        save_file(state, folder / "model.safetensors")
    elif layout == "released":  # the Hub's files: vit.encoder.layer.N.attention.attention.query
        save_file(released_layout(state), folder / "model.safetensors")
    elif layout == "released_bin":
        torch.save(released_layout(state), folder / "pytorch_model.bin")


def maelab_mae(**settings) -> MaskedAutoencoder:
    return MaskedAutoencoder(mlp_ratio=4.0, **{**ENCODER, **DECODER, **settings}).eval()


@pytest.mark.parametrize("layout", ["save_pretrained", "current", "released", "released_bin"])
def test_a_hugging_face_mae_reads_into_maelab_with_the_same_loss_prediction_and_mask(tmp_path, layout):
    theirs = hf_mae()
    write_layout(theirs, tmp_path / "hf", layout)
    ours = maelab_mae()
    load_full(ours, tmp_path / "hf")
    imgs, noise = torch.randn(3, 3, 32, 32), torch.rand(3, 16)
    with torch.no_grad():
        expected = theirs(pixel_values=imgs, noise=noise)
        loss, pred, mask = ours(imgs, 0.75, noise)
    assert torch.equal(mask, expected.mask)
    assert torch.allclose(pred, expected.logits, atol=1e-6)
    assert abs(loss.item() - expected.loss.item()) < 1e-6
    assert loss.item() > 0.1  # a real loss, not two models that both output nothing


def test_the_released_layout_made_here_is_one_transformers_reads(tmp_path):
    write_layout(hf_mae(), tmp_path / "hf", "released")
    _, info = ViTMAEForPreTraining.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    names = set(load_file(tmp_path / "hf" / "model.safetensors"))
    assert "vit.encoder.layer.1.attention.attention.query.weight" in names
    assert "decoder.decoder_layers.0.output.dense.bias" in names


def test_a_hugging_face_encoder_initialises_a_classifier_with_the_same_features(tmp_path):
    theirs = hf_mae().vit
    theirs.config.mask_ratio = 0.0  # ViTMAEModel always masks: keep every patch, in order
    theirs.save_pretrained(tmp_path / "encoder")
    ours = ViTClassifier(10, global_pool="token", **ENCODER).eval()
    load_encoder(ours, tmp_path / "encoder")
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = theirs(pixel_values=imgs, noise=torch.arange(16.0).expand(2, 16)).last_hidden_state
        assert torch.allclose(ours.forward_features(imgs), expected, atol=1e-5)


def test_hugging_face_layer_norm_eps_is_named_and_mae_s_kept(tmp_path, caplog):
    theirs = hf_mae(layer_norm_eps=1e-12)
    theirs.save_pretrained(tmp_path / "hf")
    ours = maelab_mae()
    with caplog.at_level(logging.INFO):
        load_full(ours, tmp_path / "hf")
    assert "layer_norm_eps=1e-12" in caplog.text and "keeps MAE's 1e-06" in caplog.text
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    with torch.no_grad():
        assert torch.allclose(ours(imgs, 0.75, noise)[1], theirs(pixel_values=imgs, noise=noise).logits, atol=1e-4)


def test_a_model_of_other_settings_is_refused_naming_both(tmp_path):
    hf_mae().save_pretrained(tmp_path / "hf")
    with pytest.raises(UserError) as e:
        load_full(maelab_mae(num_heads=4), tmp_path / "hf")
    assert "num_attention_heads=2 there, model.num_heads=4 here" in str(e.value)
    assert "(model.num_heads=2)" in str(e.value)
    with pytest.raises(UserError, match="decoder_num_hidden_layers=1 there, task.decoder_depth=2 here"):
        load_full(maelab_mae(decoder_depth=2), tmp_path / "hf")


def test_a_folder_without_weights_or_of_another_model_is_one_line(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**HF_SIZES, **HF_DECODER, "model_type": "vit_mae"}))
    with pytest.raises(UserError, match="has config.json but no weights"):
        load_full(maelab_mae(), folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UserError, match="model_type 'bert'; maelab reads Hugging Face ViTMAE"):
        load_full(maelab_mae(), folder)


def maelab_checkpoint(path, model, **hparams) -> str:
    """A maelab .ckpt as Lightning writes it (the parts the readers use)."""
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    hparams = {"model": {k: v for k, v in ENCODER.items() if k != "img_size"}, "img_size": 32, **hparams}
    torch.save({"state_dict": state, "pytorch-lightning_version": "2.5", "hyper_parameters": hparams}, path)
    return str(path)


def random_mae(seed: int = 1) -> MaskedAutoencoder:
    torch.manual_seed(seed)
    model = maelab_mae()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "pos_embed" not in name:
                p.add_(torch.randn_like(p) * 0.05)
    return model


def test_a_maelab_mae_exports_to_a_folder_transformers_loads_strictly_computing_the_same(tmp_path):
    ours = random_mae()
    target = {"_target_": "maelab.models.targets.NormPixelTarget"}
    ckpt = maelab_checkpoint(tmp_path / "last.ckpt", ours, target=target, mask_ratio=0.75, decoder_heads=2)
    meta = export_hf(ckpt, str(tmp_path / "hf"))
    assert meta["class"] == "ViTMAEForPreTraining"
    theirs, info = ViTMAEForPreTraining.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert theirs.config.layer_norm_eps == 1e-6 and theirs.config.norm_pix_loss
    imgs, noise = torch.randn(3, 3, 32, 32), torch.rand(3, 16)
    with torch.no_grad():
        expected = theirs.eval()(pixel_values=imgs, noise=noise)
        loss, pred, mask = ours(imgs, 0.75, noise)
    assert torch.equal(mask, expected.mask)
    assert torch.allclose(pred, expected.logits, atol=1e-6)
    assert abs(loss.item() - expected.loss.item()) < 1e-6
    # and back: the folder reads into maelab bit for bit
    again = maelab_mae()
    load_full(again, tmp_path / "hf")
    for key, value in ours.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    # its encoder alone: ViTMAEModel, from the same folder and from --encoder-only
    _, info = ViTMAEModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"], info
    assert export_hf(ckpt, str(tmp_path / "enc"), encoder_only=True)["class"] == "ViTMAEModel"
    _, info = ViTMAEModel.from_pretrained(tmp_path / "enc", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info


def random_classifier(pool: str, probe: bool = False) -> ViTClassifier:
    torch.manual_seed(2)
    model = ViTClassifier(10, global_pool=pool, head_batchnorm=probe, head_init_std=0.1, **ENCODER).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "pos_embed" not in name:
                p.add_(torch.randn_like(p) * 0.05)
        if probe:
            model.head[0].running_mean.normal_()
            model.head[0].running_var.uniform_(0.5, 2.0)
    return model


@pytest.mark.parametrize("pool,probe", [("token", False), ("token", True), ("avg", False)])
def test_a_maelab_classifier_exports_to_a_transformers_classifier_with_the_same_logits(tmp_path, pool, probe):
    ours = random_classifier(pool, probe)
    ckpt = maelab_checkpoint(tmp_path / "best.ckpt", ours, global_pool=pool, num_classes=10)
    meta = export_hf(ckpt, str(tmp_path / "hf"))
    wanted = "ViTForImageClassification" if pool == "token" else "TimmWrapperForImageClassification"
    assert meta["class"] == wanted
    theirs, info = AutoModelForImageClassification.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert type(theirs).__name__ == wanted
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    imgs = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        logits = theirs.eval()(pixel_values=imgs).logits
        assert torch.allclose(logits, ours(imgs), atol=1e-5)
    assert (logits - logits.mean(0)).abs().max() > 0.1  # logits that tell images apart
    if pool == "token":  # and back into maelab: the encoder and the head
        again = ViTClassifier(10, global_pool="token", **ENCODER).eval()
        load_encoder(again, tmp_path / "hf")
        with torch.no_grad():
            assert torch.allclose(again.features(imgs), ours.features(imgs), atol=1e-6)


def test_a_vit_classifier_folder_from_transformers_reads_into_maelab(tmp_path):
    torch.manual_seed(3)
    config = ViTConfig(**HF_SIZES, layer_norm_eps=1e-6, num_labels=5)
    theirs = ViTForImageClassification(config).eval()
    with torch.no_grad():  # no tensor at its initial value: swapped norms or dropped biases would show
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    theirs.save_pretrained(tmp_path / "vit")
    ours = ViTClassifier(5, global_pool="token", **ENCODER).eval()
    load_encoder(ours, tmp_path / "vit")
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        hidden = theirs.vit(pixel_values=imgs).last_hidden_state
        assert torch.allclose(ours.forward_features(imgs), hidden, atol=1e-5)
        ours.head.load_state_dict({"weight": theirs.classifier.weight, "bias": theirs.classifier.bias})
        assert torch.allclose(ours(imgs), theirs(pixel_values=imgs).logits, atol=1e-5)  # cls token, norm, head


def test_a_run_exported_by_the_cli_fine_tunes_draws_and_embeds_from_the_folder(pretrained, tmp_path, capsys):
    """The user's chain: maelab export --format hf, then the folder as task.pretrained (through
    Hydra and the config checks), visualize and embed, each as from the original checkpoint."""
    from maelab.cli import main
    from maelab.commands.embed import load_encoder as embed_encoder
    from maelab.config.checks import validate
    from maelab.run.build import build
    from tests.conftest import TINY_CLASSIFIER, compose_config

    folder = tmp_path / "hf"
    assert main(["export", pretrained, str(folder), "--format", "hf"]) == 0
    assert "ViTMAEForPreTraining.from_pretrained(" in capsys.readouterr().out
    assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors", "preprocessor_config.json"}
    cfg = compose_config(["+experiment=finetune_vitt_cifar10", *TINY_CLASSIFIER, f"task.pretrained={folder}"], tmp_path)
    validate(cfg)
    _, module, _ = build(cfg)
    module.load_initial_weights()
    source = torch.load(pretrained, weights_only=False)["state_dict"]
    encoder = {k: v for k, v in module.model.state_dict().items() if not k.startswith(("head", "fc_norm"))}
    assert encoder and all(torch.equal(v, source[f"model.{k}"]) for k, v in encoder.items())

    out = tmp_path / "reconstructions.png"
    assert main(["visualize", str(folder), "--num-images", "2", "--out", str(out)]) == 0
    assert out.stat().st_size > 1000
    imgs = torch.rand(2, 3, 16, 16)
    (theirs, hf_settings), (ours, settings) = embed_encoder(str(folder), False), embed_encoder(pretrained, False)
    assert hf_settings == settings  # the mean and std travel in preprocessor_config.json
    with torch.no_grad():
        assert torch.equal(theirs(imgs), ours(imgs))

    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = compose_config(["+experiment=finetune_vitt_cifar10", *TINY_CLASSIFIER, f"task.pretrained={empty}"], tmp_path)
    with pytest.raises(UserError, match="a folder without config.json; a Hugging Face model folder has one"):
        validate(cfg)


def test_the_folder_preprocesses_as_maelab_evaluates_and_an_export_replaces_an_older_folder(tmp_path):
    """At 224 px the image-folder recipes evaluate on resize-to-256 + center crop 224: the exported
    preprocessor_config.json does the same; an earlier export's weights files go."""
    import numpy as np
    from PIL import Image
    from torchvision import transforms as T
    from transformers import AutoImageProcessor

    from maelab.weights.hf_export import preprocessor

    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor([0.5] * 3, [0.25] * 3, 224)))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (375, 500, 3), dtype=np.uint8))
    theirs = AutoImageProcessor.from_pretrained(folder)(images=image, return_tensors="pt")["pixel_values"][0]
    view = [T.Resize(256, T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor()]
    ours = T.Compose([*view, T.Normalize([0.5] * 3, [0.25] * 3)])(image)
    assert theirs.shape == (3, 224, 224) and (theirs - ours).abs().mean() < 1e-3

    ckpt = maelab_checkpoint(tmp_path / "last.ckpt", random_mae(), decoder_heads=2)
    (tmp_path / "hf").mkdir()
    torch.save({"vit.embeddings.cls_token": torch.zeros(1, 1, 32)}, tmp_path / "hf" / "pytorch_model.bin")
    export_hf(ckpt, str(tmp_path / "hf"))
    assert not (tmp_path / "hf" / "pytorch_model.bin").exists()
    again = maelab_mae()
    load_full(again, tmp_path / "hf")
    assert torch.equal(again.cls_token, random_mae().cls_token)


def test_a_checkpoint_of_other_channels_names_data_channels(tmp_path):
    hf_mae().save_pretrained(tmp_path / "hf")
    with pytest.raises(UserError, match=r"num_channels=3 there, data.channels=1 here"):
        load_encoder(ViTClassifier(2, in_chans=1, **ENCODER), tmp_path / "hf")
    ckpt = maelab_checkpoint(tmp_path / "rgb.ckpt", random_mae())
    with pytest.raises(UserError, match=r"takes images of 3 channel\(s\), this model 1: set data.channels=3"):
        load_encoder(ViTClassifier(2, in_chans=1, **ENCODER), ckpt)
