"""maelab export: timm's VisionTransformer loads the weights strictly and computes the same."""

import timm
import torch

from maelab.models.classifier import ViTClassifier
from maelab.weights.pretrained import load_encoder
from maelab.weights.timm import export
from tests.conftest import SMALL


def test_export_loads_into_timm_strictly_with_the_same_features(pretrained, tmp_path):
    imgs = torch.randn(3, 3, 16, 16)
    for pool in ("token", "avg"):
        out = tmp_path / f"encoder_{pool}.pth"
        meta = export(pretrained, str(out), global_pool=pool)
        assert meta["kwargs"]["num_classes"] == 0
        theirs = timm.create_model(meta["timm_model"], pretrained=False, **meta["kwargs"]).eval()
        theirs.load_state_dict(torch.load(out), strict=True)
        # maelab's view of the same export: the encoder, pooled the same way; with average
        # pooling the encoder's final norm is the norm after pooling
        ours = ViTClassifier(2, global_pool=pool, img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2).eval()
        load_encoder(ours, pretrained)
        if pool == "avg":
            state = torch.load(pretrained, weights_only=False)["state_dict"]
            ours.fc_norm.load_state_dict({"weight": state["model.norm.weight"], "bias": state["model.norm.bias"]})
        with torch.no_grad():
            expected = ours.features(imgs)
            assert torch.allclose(
                theirs.forward_head(theirs.forward_features(imgs), pre_logits=True), expected, atol=1e-5
            )


def test_export_of_a_probe_folds_its_batchnorm_and_gives_the_same_logits(tmp_path):
    torch.manual_seed(0)
    model = ViTClassifier(10, global_pool="token", head_batchnorm=True, head_init_std=0.01, **SMALL).eval()
    bn = model.head[0]
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "probe.pth"
    torch.save({"model": model.state_dict()}, path)
    meta = export(str(path), str(tmp_path / "timm.pth"), num_heads=4)
    assert meta["kwargs"]["num_classes"] == 10
    theirs = timm.create_model(meta["timm_model"], pretrained=False, **meta["kwargs"]).eval()
    theirs.load_state_dict(torch.load(tmp_path / "timm.pth"), strict=True)
    imgs = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(theirs(imgs), model(imgs), atol=1e-4)
