"""``maelab visualize`` and the reconstruction notebook on a tiny checkpoint."""

import json

import nbformat
import numpy as np
import pytest
from PIL import Image

from maelab.cli import main
from maelab.run.fit import run
from tests.conftest import REPO, TINY, compose_config

NOTEBOOK = REPO / "notebooks" / "visualize_reconstructions.ipynb"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """One epoch at 32 px: 8x8 patches of 4 px, so even a 0.95 ratio keeps 3 visible."""
    out = tmp_path_factory.mktemp("pretrained")
    run(compose_config(TINY + ["data.img_size=32", "trainer.max_epochs=1"], out))
    return out / "checkpoints" / "last.ckpt"


def test_visualize_draws_each_ratio_and_strategy_with_titles(checkpoint, tmp_path, capsys):
    out = tmp_path / "grid.png"
    args = [str(checkpoint), "--num-images", "3", "--mask-ratio", "0.75", "0.95", "--masking", "random", "grid"]
    assert main(["visualize", *args, "--scale", "3", "--out", str(out)]) == 0
    columns = 2 * 2 * 2 + 1  # (masked, reconstruction) x 2 ratios x 2 strategies, original
    cell = 32 * 3 + 2  # scaled image plus the grid's padding
    assert Image.open(out).size == (columns * cell + 2, 3 * cell + 2 + 14)  # and a title band
    assert "masked 95% grid" in capsys.readouterr().out


def test_visualize_reads_a_folder_and_names_what_it_cannot_draw(checkpoint, tmp_path, capsys):
    folder = tmp_path / "photos" / "nested"
    folder.mkdir(parents=True)
    for i, size in enumerate([(40, 60), (64, 48)]):
        Image.new("RGB", size, (40 * i, 100, 200)).save(folder / f"{i}.jpg")
    out = tmp_path / "folder.png"
    assert main(["visualize", str(checkpoint), "--images", str(tmp_path / "photos"), "--out", str(out)]) == 0
    assert Image.open(out).size[1] == 2 * (32 * 3 + 2) + 2 + 14  # both files, enlarged to >= 96 px

    assert main(["visualize", str(checkpoint), "--images", str(tmp_path / "missing")]) == 2
    assert "neither a folder of images nor one of: cifar10, synthetic" in capsys.readouterr().err
    assert main(["visualize", str(checkpoint), "--mask-ratio", "0.99"]) == 2
    assert "--mask-ratio: mask_ratio=0.99 keeps 0 of 64 patches" in capsys.readouterr().err
    hog = tmp_path / "hog"
    run(compose_config(TINY + ["target=hog", "trainer.max_epochs=1"], hog))
    assert main(["visualize", str(hog / "checkpoints" / "last.ckpt")]) == 2
    assert "target HOGTarget is not pixels" in capsys.readouterr().err


def test_the_notebook_is_committed_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


@pytest.mark.slow
def test_the_notebook_runs_headless_on_a_checkpoint(checkpoint, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("MAELAB_NOTEBOOK_CKPT", str(checkpoint))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend turns figures into outputs
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    figures = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.data]
    assert len(figures) == 2  # the ratio figure and the strategy figure
    printed = json.dumps([o.get("text", "") for o in outputs])
    assert "checkpoint:" in printed and "64 patches of 4 px" in printed


@pytest.mark.slow
def test_visualize_draws_cifar10_test_images(checkpoint, cifar10_root, tmp_path):
    out = tmp_path / "cifar.png"
    assert main(["visualize", str(checkpoint), "--images", "cifar10", "--num-images", "2", "--out", str(out)]) == 0
    picture = Image.open(out).convert("RGB")
    assert picture.size == (3 * (32 * 3 + 2) + 2, 2 * (32 * 3 + 2) + 2 + 14)
    original = np.asarray(picture.crop((2 + 2 * 98, 14 + 2, 2 + 2 * 98 + 96, 14 + 2 + 96)))[::3, ::3]  # row 1
    first = sorted((cifar10_root / "test" / "airplane").iterdir())[0]  # the first test image, class by class
    assert np.abs(original.astype(int) - np.asarray(Image.open(first).convert("RGB")).astype(int)).max() <= 1
