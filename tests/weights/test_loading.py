"""Weights are data, not code: every file a user hands maelab is read without running what a
pickle could hold; a truncated checkpoint names the newest readable one and how to resume from it."""

import argparse
import json
import shlex
from pathlib import Path

import pytest
import torch

from maelab.cli import main as cli
from maelab.errors import UserError
from maelab.run.fit import run
from maelab.weights.checkpoints import AtomicCheckpointIO
from maelab.weights.loading import RefusedCheckpoint, load_weights_file
from maelab.weights.pretrained import read_state_dict
from tests.conftest import TINY, compose_config, maelab

# a fine-tuning run the size of TINY, on synthetic images
FINETUNE_TINY = [
    "+experiment=finetune_vitt_cifar10", "data=synthetic", "data.num_train=128", "data.num_test=32",
    "data.val_size=32", "data.batch_size=32", "data.img_size=16", "model.patch_size=4", "model.embed_dim=32",
    "model.depth=1", "model.num_heads=2", "task.effective_batch_size=null", "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
]  # fmt: skip


class CreatesAFile:
    """What an attacker's checkpoint holds: unpickling it calls open(path, "w")."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def malicious_checkpoint(path: Path, marker: Path, like: Path) -> Path:
    """A real maelab checkpoint (``like``) with one extra entry that creates ``marker`` when loaded."""
    checkpoint = torch.load(like, weights_only=True)
    checkpoint["optimizer_states"].append(CreatesAFile(marker))
    torch.save(checkpoint, path)
    return path


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pretrain")
    return Path(run(compose_config(TINY + ["trainer.max_epochs=1"], out))["last_checkpoint"])


@pytest.mark.slow
def test_no_path_of_maelab_runs_the_code_a_checkpoint_holds(tmp_path, pretrained):
    marker = tmp_path / "pwned"
    evil = malicious_checkpoint(tmp_path / "evil.ckpt", marker, like=pretrained)
    opener = f"{open.__module__}.{open.__name__}"  # io.open, as the pickle names it
    refused = rf"refused: loading it would import {opener}, which weights do not need"

    # the CLI, as a user meets it: fine-tuning from it, exporting and drawing it
    done = maelab("train", *FINETUNE_TINY, f"task.pretrained={evil}", f"hydra.run.dir={tmp_path / 'ft'}", cwd=tmp_path)
    [line] = [x for x in done.stderr.splitlines() if x.strip()]
    assert done.returncode == 2 and "error: " in line and opener in line
    assert "trust_checkpoint_code=true" in line
    for command in (["export", str(evil), str(tmp_path / "out.pth")], ["visualize", str(evil)]):
        with pytest.raises(RefusedCheckpoint, match=refused + r".*--trust-checkpoint-code"):
            _command(command)
    # in-process: init_from, a resume (maelab's check, then Lightning's own reader), every reader
    with pytest.raises(RefusedCheckpoint, match=refused):
        run(compose_config(TINY + [f"task.init_from={evil}"], tmp_path / "init"))
    (tmp_path / "resume" / "checkpoints").mkdir(parents=True)
    (tmp_path / "resume" / "checkpoints" / "last.ckpt").write_bytes(evil.read_bytes())
    with pytest.raises(RefusedCheckpoint, match=refused):
        run(compose_config(TINY + ["ckpt_path=last"], tmp_path / "resume"))
    with pytest.raises(RefusedCheckpoint, match=refused):
        AtomicCheckpointIO().load_checkpoint(evil)
    with pytest.raises(RefusedCheckpoint, match=refused):
        read_state_dict(evil)
    assert not marker.exists()

    # trusting it on purpose is a setting, off by default: then the file runs its code
    assert cli(["export", str(evil), str(tmp_path / "out.pth"), "--trust-checkpoint-code"]) == 0
    assert marker.exists()


def _command(words: list[str]) -> None:
    """A command's main() with its UserError left to the test (the CLI prints it as one line)."""
    import importlib

    importlib.import_module(f"maelab.commands.{words[0]}").main(words[1:])


def test_official_files_with_their_arguments_load_as_weights_only(tmp_path):
    path = tmp_path / "mae_finetuned_vit_base.pth"
    torch.save(
        {"model": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=1e-3, model="vit_base"), "epoch": 99}, path
    )
    loaded = load_weights_file(path)
    assert loaded["args"].model == "vit_base" and torch.equal(loaded["model"]["w"], torch.ones(2))


@pytest.mark.slow
def test_a_truncated_last_checkpoint_names_the_newest_readable_one_and_the_command_that_resumes(tmp_path):
    run_dir = tmp_path / "run"
    common = [*TINY, "callbacks.periodic_checkpoint.every_n_epochs=1", f"hydra.run.dir={run_dir}"]
    assert maelab("train", *common, "trainer.max_epochs=2", cwd=tmp_path).returncode == 0
    last = run_dir / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a copy cut short, a crashed disk

    done = maelab("train", *common, "trainer.max_epochs=3", "ckpt_path=last", cwd=tmp_path)
    [line] = [x for x in done.stderr.splitlines() if x.strip()]
    assert done.returncode == 2 and line.startswith(f"error: ckpt_path: {last} is unreadable, truncated or corrupt")
    assert "the newest readable checkpoint beside it is epoch0001.ckpt (epoch 1, step 8)" in line
    command = shlex.split(line.split("resume from it with ")[1])
    assert command[:2] == ["maelab", "train"] and f"ckpt_path={run_dir / 'checkpoints' / 'epoch0001.ckpt'}" in command

    resumed = maelab(*command[1:], cwd=tmp_path)  # the command it names, as given
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert (results["status"], results["global_step"]) == ("completed", 12)
    assert torch.load(last, weights_only=True)["global_step"] == 12  # last.ckpt is whole again


def test_a_truncated_pretrained_file_names_the_newest_readable_checkpoint_beside_it(tmp_path, pretrained):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "epoch0000.ckpt").write_bytes(pretrained.read_bytes())
    bad = folder / "last.ckpt"
    bad.write_bytes(pretrained.read_bytes()[:1000])
    with pytest.raises(UserError) as e:
        read_state_dict(bad)
    assert str(e.value) == (
        f"{bad} is unreadable, truncated or corrupt (1000 bytes that are not the zip archive torch.save writes); "
        f"the newest readable checkpoint in {folder} is epoch0000.ckpt (epoch 1, step 4)"
    )
