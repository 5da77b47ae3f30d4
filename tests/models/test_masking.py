"""Mask sampling strategies: the property that defines each, and runs that use them."""

import csv

import pytest
import torch

from maelab.errors import UserError
from maelab.models.mae import MaskedAutoencoder
from maelab.models.masking import BlockMasking, GridMasking, RandomMasking
from maelab.run.fit import run
from tests.conftest import TINY, compose_config

GRID = (14, 14)  # ViT-B/16 at 224 px


def masks(strategy, n: int, ratio: float, grid=GRID, seed: int = 0) -> torch.Tensor:
    """(n, H, W) bool, True = masked, through the model's own masking."""
    model = MaskedAutoencoder(
        img_size=grid[0] * 2, patch_size=2, embed_dim=16, depth=1, num_heads=1,
        decoder_width=16, decoder_depth=1, decoder_heads=1, masking=strategy,
    )  # fmt: skip
    noise = strategy.noise(n, grid, ratio, generator=torch.Generator().manual_seed(seed))
    _, mask, _ = model.random_masking(torch.zeros(n, grid[0] * grid[1], 4), ratio, noise)
    return mask.view(n, *grid).bool()


def neighbour_agreement(m: torch.Tensor) -> float:
    """How often two adjacent patches are both masked or both visible."""
    same = torch.cat([(m[:, 1:] == m[:, :-1]).flatten(1), (m[:, :, 1:] == m[:, :, :-1]).flatten(1)], dim=1)
    return same.float().mean().item()


@pytest.mark.parametrize("strategy", [RandomMasking(), BlockMasking(), GridMasking()])
@pytest.mark.parametrize("ratio", [0.75, 0.9])
def test_every_strategy_masks_exactly_the_ratio_and_repeats_with_its_seed(strategy, ratio):
    m = masks(strategy, 64, ratio)
    assert m.flatten(1).sum(1).tolist() == [196 - int(196 * (1 - ratio))] * 64  # rectangular batches
    assert torch.equal(m, masks(strategy, 64, ratio))
    assert not torch.equal(m, masks(strategy, 64, ratio, seed=1))


def test_random_masks_differ_per_sample_and_cover_every_position_evenly():
    m = masks(RandomMasking(), 4000, 0.75)
    assert len({tuple(x.flatten().tolist()) for x in m[:100]}) == 100
    frequency = m.float().mean(0)  # 0.75 expected at every position; 4000 draws: std 0.007
    assert frequency.min() > 0.72 and frequency.max() < 0.78
    assert abs(neighbour_agreement(m) - (0.75**2 + 0.25**2)) < 0.01  # independent patches: 0.625


def test_block_masks_are_unions_of_rectangles_that_reach_the_ratio():
    strategy = BlockMasking()
    blocks = strategy.blocks(256, GRID, 0.75, generator=torch.Generator().manual_seed(0))
    target = 196 - int(196 * 0.25)
    counts = blocks.flatten(1).sum(1)
    assert counts.max() <= target  # a block never passes the ratio
    assert counts.float().mean() > 0.97 * target  # and the blocks nearly always make it up alone
    # contiguous regions: adjacent patches agree far more often than the random 0.625
    assert neighbour_agreement(masks(strategy, 256, 0.75)) > 0.8
    # each masked region of a sample is a union of rectangles: a 2x2 window never has exactly
    # one masked patch surrounded by three visible ones in more than a few places
    m = masks(strategy, 256, 0.75).float()
    windows = m[:, 1:, 1:] + m[:, :-1, 1:] + m[:, 1:, :-1] + m[:, :-1, :-1]
    assert (windows == 1).float().mean() < 0.05


def test_grid_masks_keep_one_corner_of_every_2x2_group():
    m = masks(GridMasking(), 64, 0.75)
    corners = set()
    for sample in m:
        visible = (~sample).nonzero()
        assert len(visible) == 49  # one per group
        offsets = {(int(r) % 2, int(c) % 2) for r, c in visible}
        assert len(offsets) == 1  # the same corner of every group: a regular grid
        corners |= offsets
    assert corners == {(0, 0), (0, 1), (1, 0), (1, 1)}  # which corner varies between samples
    for sample in masks(GridMasking(), 16, 0.9):  # a higher ratio keeps a subset of one grid
        assert len({(int(r) % 2, int(c) % 2) for r, c in (~sample).nonzero()}) == 1


def test_grid_masking_refuses_a_ratio_or_grid_it_cannot_make():
    with pytest.raises(UserError, match=r"task.mask_ratio=0.5 with masking=grid.*choose task.mask_ratio >= 0.75"):
        GridMasking().check(GRID, 0.5)
    with pytest.raises(UserError, match=r"patch grid is 7x7"):
        GridMasking().check((7, 7), 0.75)


@pytest.mark.parametrize("masking", ["block", "grid"])
def test_a_pretraining_run_learns_with_structured_masks(masking, tmp_path):
    overrides = TINY + [f"masking={masking}", "trainer.max_epochs=4", "task.base_lr=3e-3", "task.warmup_epochs=1"]
    results = run(compose_config(overrides, tmp_path))
    assert results["config"]["masking"]["_target_"].endswith(masking.capitalize() + "Masking")
    rows = csv.DictReader((tmp_path / "csv" / "metrics.csv").read_text().splitlines())
    val = [float(r["val/loss"]) for r in rows if r["val/loss"]]  # the same masks every epoch
    assert len(val) == 4 and val[-1] < val[0] - 0.05  # measured: 1.36 -> 1.28


@pytest.mark.slow
def test_the_command_line_names_an_impossible_grid_ratio_in_one_line(tmp_path):
    from tests.conftest import maelab

    done = maelab("train", "+experiment=quickstart", "masking=grid", "task.mask_ratio=0.5", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "error: task.mask_ratio=0.5 with masking=grid: keeping one patch in every 2x2 group masks 0.75 of the "
        "patches at least; choose task.mask_ratio >= 0.75"
    )


@pytest.mark.slow
@pytest.mark.parametrize("strategy", [RandomMasking(), BlockMasking(min_patches=2), GridMasking()])
def test_a_compiled_model_traces_its_masks_for_any_batch_size(strategy):
    # torch.compile makes the batch size symbolic once a model meets a second one (a sweep's next
    # job, a last partial batch); a draw given generator=None could not be traced then, and the
    # run fell back to eager. The eager backend runs dynamo's tracing alone, in a second.
    import torch._dynamo

    torch._dynamo.reset()
    model = MaskedAutoencoder(
        img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2,
        decoder_width=16, decoder_depth=1, decoder_heads=2, masking=strategy,
    )  # fmt: skip
    compiled = torch.compile(model, backend="eager", dynamic=True, fullgraph=True)
    for batch in (4, 6):
        loss, pred, mask = compiled(torch.randn(batch, 3, 16, 16), 0.75)
        assert mask.shape == (batch, 16) and (mask.sum(1) == 12).all() and torch.isfinite(loss)
