"""``maelab visualize --attention``: the last block's cls-to-patch attention, per head and
averaged, as timm computes it, drawn over the image."""

import os

import pytest
import torch
from PIL import Image

from maelab.commands.embed import load_encoder
from maelab.commands.visualize import cls_attention, main
from maelab.data.transforms import model_input
from tests.conftest import SMALL, official_state_dict, timm_vit


def test_the_attention_drawn_is_timm_s_own_for_an_official_file(tmp_path):
    source = timm_vit(num_classes=0, global_pool="token", **SMALL).eval()
    path = tmp_path / "mae_pretrain.pth"
    torch.save({"model": official_state_dict(source)}, path)
    model, settings = load_encoder(str(path), trust=False, num_heads=4)  # 64 wide: not a named ViT size
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    x = model_input(images, settings["mean"], settings["std"], settings["img_size"])

    ours = cls_attention(model, x)
    assert ours.shape == (3, 4, 64) and model.blocks[-1].attn.fused_attn == source.blocks[-1].attn.fused_attn
    seen = []
    last = source.blocks[-1].attn
    last.fused_attn = False
    last.attn_drop.register_forward_hook(lambda m, a, out: seen.append(out))
    with torch.no_grad():
        source.forward_features(x)
    assert torch.allclose(ours, seen[0][:, :, 0, 1:], atol=1e-6)  # timm's probabilities, cls row, patches
    assert torch.all(ours.sum(dim=-1) < 1) and torch.all(ours > 0)  # the rest goes to the cls token itself


def test_the_figure_has_the_original_the_mean_and_each_head_for_every_image(tmp_path, capsys):
    source = timm_vit(num_classes=0, global_pool="token", **SMALL).eval()
    path = tmp_path / "mae_pretrain.pth"
    torch.save({"model": official_state_dict(source)}, path)
    out = tmp_path / "attention.png"
    assert main([str(path), "--attention", "--images", "synthetic", "--num-images", "3", "--num-heads", "4",
                 "--out", str(out)]) == 0  # fmt: skip
    assert "3 images x 6 columns (original, mean of heads, 4 heads)" in capsys.readouterr().out
    cell = 32 * 3 + 2  # 32 px enlarged to >= 96, 2 px of padding
    assert Image.open(out).size == (6 * cell + 2, 3 * cell + 2 + 14)  # titles above


@pytest.mark.skipif("MAELAB_CIFAR10" not in os.environ, reason="needs the CIFAR-10 copy (MAELAB_CIFAR10)")
def test_cifar10_test_images_are_drawn(tmp_path):
    source = timm_vit(num_classes=0, global_pool="token", **SMALL).eval()
    torch.save({"model": official_state_dict(source)}, tmp_path / "mae.pth")
    out = tmp_path / "attention.png"
    main([str(tmp_path / "mae.pth"), "--attention", "--images", "cifar10", "--num-images", "2", "--num-heads", "4",
          "--out", str(out)])  # fmt: skip
    assert Image.open(out).size == (6 * 98 + 2, 2 * 98 + 2 + 14)
