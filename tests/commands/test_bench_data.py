"""``maelab bench-data``: maelab's loader beside the official MAE pipeline, on generated JPEGs."""

import json

import numpy as np
import pytest
from PIL import Image

from maelab.commands.bench_data import generate, main
from maelab.errors import UserError


def test_it_times_every_pipeline_on_a_generated_folder_and_prints_one_json_line(tmp_path, capsys):
    folder = tmp_path / "generated"
    args = ["--generate", str(folder), "--count", "40", "--workers", "0", "--batch-size", "8", "--images", "16"]
    assert main([*args, "--warmup", "1", "--rounds", "1", "--size", "64"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert set(result["pipelines"]) == {"official", "maelab_pil", "maelab_fast"}
    for figures in result["pipelines"].values():
        assert figures["img_per_s"] > 0 and figures["img_per_s_per_core"] == figures["img_per_s"]  # 0 workers: 1 core
    assert result["img_per_s"] == result["pipelines"]["maelab_fast"]["img_per_s"] > 0
    official = result["pipelines"]["official"]["img_per_s"]
    for name in ("maelab_pil", "maelab_fast"):  # the ratios printed are the pipelines' own
        assert result["speedup_over_official"][name] == round(result["pipelines"][name]["img_per_s"] / official, 2)
    assert result["per_core"] == "img_per_s / max(1, workers)"
    assert (result["files"], result["timed_images"], result["warmup_images"]) == (24, 16, 8)


def test_generated_images_are_imagenet_like_jpegs_none_alike(tmp_path):
    generate(tmp_path, 12)
    files = sorted(tmp_path.glob("train/*/*.JPEG"))
    assert len(files) == 12 and len({f.parent.name for f in files}) == 10
    images = [Image.open(f) for f in files]
    assert all(im.format == "JPEG" and im.mode == "RGB" for im in images)
    assert max(max(im.size) for im in images) >= 500 and len({im.size for im in images}) > 2
    assert len({np.asarray(im.convert("L").resize((8, 8))).tobytes() for im in images}) == 12


def test_a_missing_or_empty_folder_is_one_line(tmp_path):
    with pytest.raises(UserError, match="no such folder"):
        main([str(tmp_path / "missing")])
    (tmp_path / "empty" / "train" / "n0").mkdir(parents=True)
    with pytest.raises(UserError, match="no images in class folders"):
        main([str(tmp_path / "empty")])
    with pytest.raises(UserError, match="give a FOLDER or --generate DIR"):
        main([])
    with pytest.raises(UserError, match=r"--workers=-1: expected 0 or more"):
        main([str(tmp_path / "empty"), "--workers", "-1"])
