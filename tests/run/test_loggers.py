"""W&B (offline) and TensorBoard alongside the CSV logger: what a run leaves in its directory."""

import pytest

from tests.conftest import REPO, TINY, compose_config, maelab

WANDB = ["logger.wandb.offline=true", "logger.wandb.project=maelab-tests"]
ENV = {"PYTHONPATH": str(REPO), "WANDB_SILENT": "true", "WANDB_MODE": "offline"}


def wandb_record(run_dir) -> tuple[bytes, list]:
    """The offline run's record file (protobuf: metric keys, config and names are stored as
    plain strings in it) and the images it logged."""
    [record] = list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    return record.read_bytes(), list(record.parent.glob("files/media/images/*.png"))


@pytest.mark.slow
def test_each_sweep_job_is_its_own_wandb_run_with_metrics_config_and_images(tmp_path):
    sweep = tmp_path / "sweep"
    done = maelab(
        "train", "-m", "+experiment=quickstart", *TINY[1:], "trainer.max_epochs=2", "callbacks.knn_monitor=null",
        "callbacks.reconstructions.every_n_epochs=1", "logger=[csv,wandb,tensorboard]", *WANDB,
        "task.mask_ratio=0.6,0.75", f"hydra.sweep.dir={sweep}",
        cwd=tmp_path, env=ENV,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    ids = set()
    for job, ratio in (("0", "0.6"), ("1", "0.75")):
        data, images = wandb_record(sweep / job)
        for key in (b"train/loss", b"val/loss", b"train/lr", b"train/img_per_s", b"reconstructions"):
            assert key in data, (job, key)
        assert b"decoder_width" in data and b"num_train" in data  # the resolved config, data included
        assert f"quickstart[task.mask_ratio={ratio}]".encode() in data  # named by what the sweep varies
        assert str(sweep).encode() in data  # grouped by sweep
        assert len(images) == 2  # the reconstruction grid of each epoch
        ids.add((sweep / job / "wandb_run_id").read_text().strip())
        [events] = list((sweep / job / "tensorboard").glob("events.out.tfevents.*"))
        assert b"train/loss" in events.read_bytes() and b"reconstructions" in events.read_bytes()
    assert len(ids) == 2


def test_a_failed_run_closes_its_wandb_run_and_its_resume_continues_it(tmp_path, monkeypatch):
    import wandb

    from maelab.run.fit import run

    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    common = TINY + ["trainer.max_epochs=2", "logger=[csv,wandb]", *WANDB]
    crash = ["+callbacks.crash._target_=tests.conftest.CrashAt", "+callbacks.crash.step=6"]
    with pytest.raises(RuntimeError, match="node lost"):
        run(compose_config(common + crash, tmp_path))
    assert wandb.run is None  # finished, not left open for the next job of this process
    run(compose_config(common + ["ckpt_path=last"], tmp_path))
    assert wandb.run is None
    runs = sorted(tmp_path.glob("wandb/offline-run-*"))
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    # one W&B run, resumed (a part started in the same second as the first gets a "-1" suffix)
    assert len(runs) == 2 and all(r.name.split("-")[3] == run_id for r in runs)
    # wandb.finish can return before W&B's service has written the record file out (CI once read
    # only its 7-byte header on a loaded 2-core machine); teardown waits for the service, as the
    # end of a process does.
    wandb.teardown()
    for part in runs:
        [record] = list(part.glob("run-*.wandb"))
        assert b"train/loss" in record.read_bytes(), part.name  # both parts logged their steps
