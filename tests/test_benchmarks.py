"""The GPU scripts in benchmarks/, rehearsed on the CPU with tiny sizes (their ``--cpu`` forms), so
the one run a GPU machine gives cannot fail on a typo."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


@pytest.mark.slow
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


@pytest.mark.slow
def test_the_time_to_accuracy_script_runs_cifar10_fast_whole_on_the_cpu(cifar10_root, tmp_path):
    # the GPU command of issue 15, rehearsed with tiny sizes: real JPEGs, both stages compiled, the
    # figures, loss curve and reconstructions collected where the device tool brings them back
    out, run_dir = tmp_path / "out", tmp_path / "run"
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "RUN_DIR": str(run_dir),
        "MAELAB_CIFAR10": str(cifar10_root),
    }
    done = subprocess.run(
        ["bash", "benchmarks/time_to_accuracy.sh", "--cpu", "cifar10_fast", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["experiment"] == "cifar10_fast" and 0 <= summary["acc1"] <= 1
    assert summary["wall_clock_s"] >= summary["pipeline_wall_clock_s"] > 0  # the script's clock starts first
    pre, fine = summary["stages"]["pretrain"], summary["stages"]["finetune"]
    assert pre["epochs"] == fine["epochs"] == 2 and pre["global_step"] == fine["global_step"] == 6
    assert pre["last"]["val/knn_acc"] > 0.15  # the monitor ran over the 50,000 JPEGs; chance is 0.10
    stage_configs = [json.loads((run_dir / s / "results.json").read_text())["config"] for s in ("pretrain", "finetune")]
    assert [c["task"]["compile"] for c in stage_configs] == [True, True]  # the recipe as the GPU runs it
    assert stage_configs[1]["task"]["pretrained"] == str(run_dir / "pretrain" / "checkpoints" / "last.ckpt")
    assert "torch.compile failed" not in (out / "run.log").read_text()
    for name in ("pretrain_loss.png", "reconstructions.png", "pretrain_metrics.csv", "finetune_metrics.csv"):
        assert (out / name).stat().st_size > 100, name
    assert len(list(out.iterdir())) <= 8  # what the device tool brings back
