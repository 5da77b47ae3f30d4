"""``benchmarks/gpu_check.sh --cpu``: the GPU check's every part, rehearsed on the CPU with tiny sizes,
so the one run a GPU machine gives cannot fail on a typo."""

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def test_the_gpu_check_rehearses_every_part_on_the_cpu_and_writes_its_figures(tmp_path):
    out = tmp_path / "out"
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # python3: this environment's
        "GPU_CHECK_WORK": str(tmp_path / "work"),
        "PYTHONUNBUFFERED": "1",
    }
    done = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--cpu", str(out)], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = {row["part"]: row for row in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert list(rows) == ["env", "gpu_tests", "bench_vitb", "bench_vitl", "bench_cifar", "epoch_cifar", "summary"]
    have_cifar = bool(os.environ.get("MAELAB_CIFAR10"))
    assert rows["gpu_tests"]["rc"] == 0
    assert rows["gpu_tests"]["tests"] == ({"passed": 6} if have_cifar else {"passed": 5, "skipped": 1})

    for name, experiment, size in [
        ("vitb", "mae_vitb", 224),
        ("vitl", "mae_vitl", 224),
        ("cifar", "mae_vitt_cifar10", 32),
    ]:
        bench = rows[f"bench_{name}"]
        assert bench["rc"] == 0 and bench["experiment"] == experiment and bench["img_size"] == size
        assert bench["compiled"] is True and bench["hf"]["eager"]["img_per_s"] > 0
        assert bench["hf"]["compiled"]["img_per_s"] > 0  # HF traced by the same torch.compile
        assert bench["speedup_vs_hf"] == round(bench["img_per_s"] / bench["hf"]["compiled"]["img_per_s"], 2)
        assert bench["target_met"] is False  # a CPU is far from a GPU's target: the profile is written
    profiles = (out / "profiles.txt").read_text()
    assert profiles.count("== maelab bench +experiment=") == 3 and "Self CPU" in profiles and "aten::mm" in profiles

    summary = rows["summary"]
    assert summary["targets"]["bench_vitb"]["target"] == 5900 and summary["targets"]["vitb_vs_hf"]["target"] == 1.3
    if have_cifar:
        epoch = rows["epoch_cifar"]
        assert epoch["rc"] == 0 and epoch["epochs"] == 2 and epoch["train/img_per_s"] > 0
        assert summary["failed_parts"] == []
        assert (out / "reconstructions.png").stat().st_size > 1000
        assert "train/loss" in (out / "epoch_metrics.csv").read_text().splitlines()[0]
    else:
        assert summary["failed_parts"] == ["epoch_cifar"] and "no CIFAR-10" in rows["epoch_cifar"]["error"]
    assert len(list(out.iterdir())) <= 8  # what the device tool brings back
