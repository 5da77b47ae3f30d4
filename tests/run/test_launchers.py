"""Sweeps through Hydra's launchers (basic, submitit_local, the SLURM config), the paper's sweep
configs, the sweep report, and a submitit job that is preempted, requeued and resumed."""

import csv
import json
import re

import pytest
import torch
import yaml
from PIL import Image

from tests.conftest import REPO, TINY, maelab

QUIET = [*TINY[1:], "callbacks.knn_monitor=null", "trainer.max_epochs=2"]


def _job_configs(sweep):
    return {
        int(d.name): yaml.safe_load((d / ".hydra" / "config.yaml").read_text())
        for d in sweep.iterdir()
        if d.name.isdigit()
    }


@pytest.mark.slow
def test_a_two_point_sweep_with_the_basic_launcher_then_its_report(tmp_path):
    sweep = tmp_path / "sweep"
    done = maelab(
        "train",
        "-m",
        "+experiment=quickstart",
        *QUIET,
        "task.mask_ratio=0.5,0.75",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    configs = _job_configs(sweep)
    assert {n: c["task"]["mask_ratio"] for n, c in configs.items()} == {0: 0.5, 1: 0.75}
    for job in (0, 1):
        assert json.loads((sweep / str(job) / "results.json").read_text())["global_step"] == 8
        assert (sweep / str(job) / "csv" / "metrics.csv").is_file()  # each job its own logger run

    report = maelab("sweep-report", str(sweep), cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    rows = list(csv.DictReader((sweep / "sweep_report.csv").read_text().splitlines()))
    assert [r["task.mask_ratio"] for r in rows] == ["0.5", "0.75"]
    assert all(0 < float(r["val/loss"]) < 5 and r["status"] == "done" for r in rows)
    assert "| job | task.mask_ratio |" in (sweep / "sweep_report.md").read_text()
    with Image.open(sweep / "sweep_report.png") as im:
        assert im.size[0] > 300 and len(set(im.convert("L").getdata())) > 10  # a drawn plot, not a blank

    bad = maelab("sweep-report", str(sweep), "--metric", "val/acc1", cwd=tmp_path)
    assert bad.returncode == 2 and "--metric val/acc1: the jobs have val/loss, train/loss" in bad.stderr


@pytest.mark.slow
def test_a_two_point_sweep_with_submitit_local(tmp_path):
    sweep = tmp_path / "sweep"
    done = maelab(
        "train", "-m", "hydra/launcher=submitit_local", "+experiment=quickstart", *QUIET,
        "target=pixel,norm_pixel", f"hydra.sweep.dir={sweep}", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    targets = {n: c["target"]["_target_"].rsplit(".", 1)[1] for n, c in _job_configs(sweep).items()}
    assert targets == {0: "PixelTarget", 1: "NormPixelTarget"}
    for job in (0, 1):
        assert json.loads((sweep / str(job) / "results.json").read_text())["global_step"] == 8
    assert list((sweep / ".submitit").iterdir())  # submitted through submitit


@pytest.mark.slow
def test_a_preempted_submitit_job_is_requeued_and_resumes_bit_identical(tmp_path):
    """SLURM's warning signal mid-epoch: the job saves last.ckpt, submitit requeues it, and the
    requeued job resumes in the same directory and ends exactly as an uninterrupted run."""
    probe = ["+callbacks.signal._target_=tests.conftest.SignalAt"]
    env = {"PYTHONPATH": str(REPO)}
    straight = maelab(
        "train", "+experiment=quickstart", *QUIET, *probe, "+callbacks.signal.step=-1",
        f"hydra.run.dir={tmp_path / 'straight'}", cwd=tmp_path, env=env,
    )  # fmt: skip
    assert straight.returncode == 0, straight.stderr[-3000:]
    sweep = tmp_path / "sweep"
    done = maelab(
        "train", "-m", "hydra/launcher=submitit_local", "+experiment=quickstart", *QUIET, *probe,
        "+callbacks.signal.step=6", f"hydra.sweep.dir={sweep}", cwd=tmp_path, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    log = (sweep / "0" / "train.log").read_text()
    assert "received SIGUSR2" in log and "saved" in log
    assert re.search(r"requeued job \d+: resuming from", log)  # its own checkpoint, by its submitit job id
    results = json.loads((sweep / "0" / "results.json").read_text())
    assert results["global_step"] == 8

    def weights(run_dir):
        return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]

    a, b = weights(tmp_path / "straight"), weights(sweep / "0")
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_the_slurm_launcher_follows_the_trainer_and_takes_cluster_keys(tmp_path):
    done = maelab(
        "train", "+experiment=mae_vitl", "trainer=multinode", "trainer.num_nodes=4", "hydra/launcher=slurm",
        "hydra.launcher.partition=gpu", "hydra.launcher.account=vision", "hydra.launcher.timeout_min=2880",
        "hydra.launcher.constraint=h100", "--cfg", "all", "--resolve", "-p", "hydra.launcher", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    launcher = yaml.safe_load(done.stdout)
    assert launcher["_target_"].endswith("submitit_launcher.SlurmLauncher")
    expected = {"nodes": 4, "gpus_per_node": 8, "tasks_per_node": 8, "partition": "gpu", "account": "vision"}
    assert {k: launcher[k] for k in expected} == expected
    assert (launcher["timeout_min"], launcher["constraint"], launcher["signal_delay_s"]) == (2880, "h100", 120)
    assert launcher["max_num_timeout"] > 0  # requeued at the time limit


def test_the_slurm_launcher_refuses_all_visible_gpus_and_a_swept_allocation(tmp_path, monkeypatch):
    import pytest
    from omegaconf import OmegaConf

    from maelab.errors import UserError
    from maelab.run.slurm import check_slurm_allocation

    done = maelab("train", "-m", "+experiment=mae_vitb", "trainer=ddp", "hydra/launcher=slurm", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: hydra.launcher: trainer.devices=-1: SLURM must be asked for a number of nodes and GPUs per node; set "
        "trainer.devices to a positive integer, e.g. trainer=multinode trainer.num_nodes=1 trainer.devices=8"
    ]
    # at job start: the allocation submitit asked for once must be the trainer's of this sweep point
    monkeypatch.setenv("SLURM_NNODES", "2")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "8(x2)")
    check_slurm_allocation(OmegaConf.create({"num_nodes": 2, "devices": 8}))
    with pytest.raises(UserError, match="trainer.num_nodes=4, but this SLURM job has 2 node"):
        check_slurm_allocation(OmegaConf.create({"num_nodes": 4, "devices": 8}))
    with pytest.raises(UserError, match="trainer.devices=4, but this SLURM job runs 8 task"):
        check_slurm_allocation(OmegaConf.create({"num_nodes": 2, "devices": 4}))


@pytest.mark.slow
def test_the_paper_sweeps_select_their_grids(tmp_path):
    grids = {
        "mask_ratio": ("task.mask_ratio", "0.4,0.5,0.6,0.7,0.75,0.8,0.9"),
        "decoder_depth": ("task.decoder_depth", "1,2,4,8,12"),
        "decoder_width": ("task.decoder_width", "128,256,512,768,1024"),
        "target": ("target", "pixel,norm_pixel,pca,hog"),
        "masking": ("masking", "random,block,grid"),
    }
    for sweep, (key, values) in grids.items():
        done = maelab("train", "+experiment=mae_vitt_cifar10", f"+sweep={sweep}", "--cfg", "hydra", cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        hydra = yaml.safe_load(done.stdout)["hydra"]
        assert hydra["mode"] == "MULTIRUN" and hydra["sweeper"]["params"] == {key: values}, sweep
    job = maelab(
        "train", "+experiment=mae_vitt_cifar10", "+sweep=decoder_width", "task.decoder_width=768",
        "--cfg", "job", "--resolve", cwd=tmp_path,
    )  # fmt: skip
    assert yaml.safe_load(job.stdout)["task"]["decoder_heads"] == 24  # 32-wide heads at every width
    bad = maelab(
        "train", "+experiment=quickstart", "+sweep=decoder_width", "hydra.sweeper.params={task.decoder_width:100}",
        f"hydra.sweep.dir={tmp_path / 'bad'}", cwd=tmp_path,
    )  # fmt: skip
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "error: task.decoder_heads: ${heads:100,32}: a width of 100 is not a whole number" in bad.stderr
