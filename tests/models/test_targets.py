"""Reconstruction targets: HOG (MaskFeat) and PCA, alone and in pretraining runs."""

import csv
import logging

import pytest
import torch

from maelab.errors import UserError
from maelab.models.patches import patchify
from maelab.models.targets import HOGTarget, PCATarget
from maelab.run.fit import run
from tests.conftest import TINY, compose_config


def edges(vertical: bool, n: int = 2, size: int = 32) -> torch.Tensor:
    """Images with one step edge through the middle: dark left/top, bright right/bottom."""
    img = torch.zeros(n, 3, size, size)
    if vertical:
        img[..., size // 2 :] = 1.0
    else:
        img[..., size // 2 :, :] = 1.0
    return img


def test_hog_has_maskfeat_size_and_normalised_cells():
    hog = HOGTarget(patch_size=16)
    assert hog.out_dim == 3 * 4 * 9 == 108  # channels x 8-px cells per 16-px patch x bins
    out = hog(torch.randn(2, 3, 224, 224))
    assert out.shape == (2, 196, 108)
    norms = out.view(2, 196, 3, 4, 9).norm(dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)  # L2 per cell and channel


def test_hog_bins_follow_the_edge_orientation():
    hog = HOGTarget(patch_size=8, bins=9, cell=8)
    # a vertical edge has a horizontal gradient (0 degrees, bin 0); a horizontal one 90 degrees (bin 4)
    for vertical, strongest in ((True, 0), (False, 4)):
        out = hog(edges(vertical)).view(2, 16, 3, 9)
        on_edge = out[:, out.sum(dim=(0, 2, 3)).nonzero().flatten()]  # patches the edge crosses
        assert len(on_edge[0]) > 0
        assert (on_edge.argmax(dim=-1) == strongest).all(), vertical
    flat = hog(torch.full((1, 3, 32, 32), 0.3))
    assert torch.equal(flat, torch.zeros_like(flat))  # no gradient, no votes


def test_hog_of_a_batch_is_each_image_s_own():
    hog = HOGTarget(patch_size=4, cell=2)
    images = torch.randn(3, 3, 16, 16)
    batch = hog(images)
    for i in range(3):
        assert torch.allclose(batch[i], hog(images[i : i + 1])[0], atol=1e-6)


def test_hog_refuses_a_cell_that_does_not_divide_the_patch():
    with pytest.raises(UserError, match="target.cell=3 does not divide the 16-px patches"):
        HOGTarget(patch_size=16, cell=3)


def test_pca_recovers_a_low_rank_patch_space_and_travels_in_the_state_dict():
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(48, 3, generator=g))[0]  # 4-px RGB patches in a 3-d subspace
    codes = torch.randn(64 * 16, 3, generator=g) * torch.tensor([3.0, 2.0, 1.0])
    patches = (codes @ basis.T + 0.5).view(64, 16, 48)
    from maelab.models.patches import unpatchify

    images = unpatchify(patches, 4, (4, 4))
    pca = PCATarget(patch_size=4, k=3)
    pca.fit(images)
    components = pca.components
    assert torch.allclose(components.T @ components, torch.eye(3), atol=1e-5)
    rebuilt = pca.to_pixels(pca(images), images)
    assert torch.allclose(rebuilt, patchify(images, 4), atol=1e-4)  # the subspace, exactly
    variance = pca(images).var(dim=(0, 1))
    assert variance[0] > variance[1] > variance[2]  # largest component first

    copy = PCATarget(patch_size=4, k=3)
    copy.load_state_dict(pca.state_dict())
    assert bool(copy.fitted) and torch.equal(copy(images), pca(images))
    with pytest.raises(RuntimeError, match="fit"):
        PCATarget(patch_size=4, k=3)(images)
    with pytest.raises(UserError, match="target.k=49: a 4-px patch has 48 values"):
        PCATarget(patch_size=4, k=49)


def val_losses(run_dir) -> list[float]:
    rows = csv.DictReader((run_dir / "csv" / "metrics.csv").read_text().splitlines())
    return [float(r["val/loss"]) for r in rows if r["val/loss"]]


def test_a_hog_run_learns_and_draws_no_reconstructions(tmp_path):
    overrides = ["target=hog", "trainer.max_epochs=4", "task.base_lr=1e-2", "task.warmup_epochs=1"]
    run(compose_config(TINY + overrides, tmp_path))
    val = val_losses(tmp_path)
    assert val[-1] < 0.6 * val[0]  # measured: 0.46 -> 0.18
    assert not (tmp_path / "reconstructions").exists()


def test_a_pca_run_learns_draws_reconstructions_and_resumes_with_its_components(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="maelab")
    overrides = ["target=pca", "target.k=8", "task.base_lr=1e-2", "task.warmup_epochs=1"]
    run(compose_config(TINY + overrides + ["trainer.max_epochs=3"], tmp_path))
    val = val_losses(tmp_path)
    assert val[-1] < 0.85 * val[0]  # measured: 4.5 -> 3.5
    assert (tmp_path / "reconstructions" / "epoch_0002.png").is_file()
    first = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert first["model.target.components"].shape == (48, 8) and bool(first["model.target.fitted"])
    run(compose_config(TINY + overrides + ["trainer.max_epochs=4", "ckpt_path=last"], tmp_path))
    second = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert torch.equal(first["model.target.components"], second["model.target.components"])
    assert caplog.text.count("components fitted") == 1  # the resumed run took them from its checkpoint


def test_targets_stay_in_full_precision_under_bf16_autocast():
    images = torch.randn(2, 3, 32, 32)
    hog, pca = HOGTarget(patch_size=8), PCATarget(patch_size=8, k=16)
    pca.fit(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what a bf16-mixed training step runs under
        hog_mixed, pca_mixed = hog(images), pca(images)
    assert hog_mixed.dtype == pca_mixed.dtype == torch.float32
    assert torch.equal(hog_mixed, hog(images)) and torch.equal(pca_mixed, pca(images))
