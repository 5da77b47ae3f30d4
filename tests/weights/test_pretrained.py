"""Weights users already have: official MAE files and maelab checkpoints, loaded strictly."""

import pytest
import torch

from maelab.errors import UserError
from maelab.models.classifier import ViTClassifier
from maelab.models.mae import MaskedAutoencoder
from maelab.weights.pretrained import load_encoder, load_full
from tests.conftest import SMALL, TINY_CLASSIFIER, compose_config, official_state_dict, timm_vit


def test_an_official_mae_file_gives_the_encoder_outputs_of_its_weights(tmp_path):
    source = timm_vit(num_classes=0, global_pool="token", **SMALL)
    path = tmp_path / "mae_pretrain.pth"
    torch.save({"model": official_state_dict(source), "epoch": 799}, path)
    imgs = torch.randn(2, 3, 32, 32)

    probe = ViTClassifier(10, global_pool="token", **SMALL).eval()
    load_encoder(probe, path)
    mae = MaskedAutoencoder(**SMALL, decoder_width=32, decoder_depth=1, decoder_heads=4).eval()
    load_full(mae, path)
    with torch.no_grad():
        expected = source.forward_features(imgs)
        assert torch.allclose(probe.forward_features(imgs), expected, atol=1e-5)
        assert torch.allclose(mae.forward_features(imgs), expected, atol=1e-5)
    assert torch.equal(mae.decoder_pred.weight, torch.load(path)["model"]["decoder_pred.weight"])


def test_an_official_finetuned_file_fine_tunes_with_its_encoder(tmp_path):
    source = timm_vit(num_classes=10, global_pool="avg", **SMALL)  # has fc_norm and head, no norm
    path = tmp_path / "mae_finetuned.pth"
    torch.save({"model": source.state_dict()}, path)
    model = ViTClassifier(10, global_pool="avg", **SMALL).eval()
    load_encoder(model, path)
    for key, value in source.state_dict().items():
        if not key.startswith(("head", "fc_norm")):
            assert torch.equal(model.state_dict()[key], value), key


def test_a_position_embedding_of_another_grid_is_interpolated_and_says_so(tmp_path, caplog):
    source = timm_vit(num_classes=0, global_pool="token", **{**SMALL, "img_size": 16})  # 4x4 grid
    path = tmp_path / "small_grid.pth"
    torch.save({"model": official_state_dict(source)}, path)
    model = ViTClassifier(10, global_pool="token", **SMALL)  # 8x8 grid
    with caplog.at_level("INFO"):
        load_encoder(model, path)
    assert "pos_embed interpolated from 16 to 64 patches" in caplog.text
    assert torch.equal(model.pos_embed[:, 0], source.pos_embed[:, 0].detach())  # cls position kept
    corner = model.pos_embed[0, 1]  # bicubic on a grid keeps the smooth corner close to the source's
    assert torch.allclose(corner, source.pos_embed[0, 1].detach(), atol=0.1)


def test_a_checkpoint_of_another_size_names_the_first_mismatched_key(tmp_path):
    source = timm_vit(num_classes=0, **{**SMALL, "embed_dim": 96, "num_heads": 4})
    path = tmp_path / "wider.pth"
    torch.save({"model": official_state_dict(source)}, path)
    with pytest.raises(UserError, match=r"cls_token is \(1, 1, 96\) there, \(1, 1, 64\) in this model"):
        load_encoder(ViTClassifier(10, **SMALL), path)
    torch.save({"model": {"cls_token": torch.zeros(1, 1, 64)}}, path)
    with pytest.raises(UserError, match="lacks encoder weight"):
        load_encoder(ViTClassifier(10, **SMALL), path)


def test_loading_a_pretraining_checkpoint_gives_bit_identical_encoder_weights(pretrained, tmp_path):
    cfg = compose_config(
        ["+experiment=finetune_vitt_cifar10", *TINY_CLASSIFIER, f"task.pretrained={pretrained}"], tmp_path
    )
    from maelab.run.build import build

    _, module, _ = build(cfg)
    module.load_initial_weights()  # what a fresh run does (a resumed one takes its own checkpoint)
    source = torch.load(pretrained, weights_only=False)["state_dict"]
    encoder = {k: v for k, v in module.model.state_dict().items() if not k.startswith(("head", "fc_norm"))}
    assert encoder and all(torch.equal(v, source[f"model.{k}"]) for k, v in encoder.items())
