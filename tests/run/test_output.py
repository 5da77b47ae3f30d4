"""A disk that refuses a write (full, read-only) ends the run in one line naming the file, the
reason and the size; the last good checkpoint stays, no temporary file is left behind, and a
folder that cannot hold a checkpoint is refused before training starts."""

import errno
import os
import shlex
import subprocess
import sys

import pytest
import torch

from maelab import atomic
from maelab.atomic import OutputError, write_text_atomically
from tests.conftest import REPO, TINY


def maelab_on_tmpfs(folder, options: str, *args: str) -> subprocess.CompletedProcess:
    """``maelab ARGS`` with a tmpfs mounted at ``folder`` (``options``: size=..., ro): as root, or
    in a user namespace where the kernel allows one; skipped where neither is possible."""
    folder.mkdir(parents=True, exist_ok=True)
    command = shlex.join([sys.executable, "-m", "maelab", *args])
    mount = f"mount -t tmpfs -o {options} tmpfs {shlex.quote(str(folder))}"
    script = f"{mount} || exit 99; {command}; rc=$?; umount {shlex.quote(str(folder))}; exit $rc"
    prefix = [] if os.geteuid() == 0 else ["unshare", "--user", "--map-root-user", "--mount"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([*prefix, "sh", "-c", script], capture_output=True, text=True, env=env, timeout=600)
    if done.returncode == 99:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()[:200]}")
    return done


def error_line(done) -> str:
    [line] = [x for x in done.stderr.splitlines() if x.startswith("error:")] or [
        done.stderr[-2000:] + done.stdout[-2000:]
    ]
    return line


@pytest.mark.slow
def test_a_full_disk_mid_run_names_the_file_and_the_size_and_keeps_the_last_checkpoint(tmp_path):
    """checkpoints/ on a tmpfs with room for one last.ckpt and a half: the first epoch's save
    fits, the second needs room for the old and the new file at once and meets ENOSPC."""
    run_dir = tmp_path / "run"
    args = [*TINY, "trainer.max_epochs=3", "callbacks.reconstructions=null", f"hydra.run.dir={run_dir}"]
    done = maelab_on_tmpfs(run_dir / "checkpoints", "size=440k", "train", *args)
    line = error_line(done)
    last = run_dir / "checkpoints" / "last.ckpt"
    assert done.returncode == 2 and line.startswith(f"error: cannot write {last}: no space left on the device (ENOSPC)")
    needed = float(line.split("it needs about ")[1].split(" KB")[0])
    assert 200 < needed < 350 and "free there; the previous file is intact" in line  # a TINY checkpoint: ~290 KB
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_a_checkpoint_folder_too_small_or_read_only_is_refused_before_training(tmp_path):
    run_dir = tmp_path / "small"
    done = maelab_on_tmpfs(run_dir / "checkpoints", "size=100k", "train", *TINY, f"hydra.run.dir={run_dir}")
    line = error_line(done)
    assert done.returncode == 2 and line.startswith(f"error: {run_dir / 'checkpoints'}: a checkpoint of this model")
    assert "and only 102.4 KB is free there (ENOSPC before training)" in line
    assert "epoch 0" not in done.stdout  # nothing trained

    run_dir = tmp_path / "read_only"
    done = maelab_on_tmpfs(run_dir / "checkpoints", "ro,size=1m", "train", *TINY, f"hydra.run.dir={run_dir}")
    line = error_line(done)
    assert done.returncode == 2 and line.startswith("error: the output folder is not writable: cannot write ")
    assert "the file system is read-only (EROFS)" in line


def full_disk_after(limit: int):
    """``open`` for maelab.atomic whose files take ``limit`` bytes, then raise ENOSPC as a full disk does."""

    def opener(path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        real_write, written = f.write, [0]

        def write(data):
            written[0] += len(data)
            if written[0] > limit:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_write(data)

        f.write = write
        return f

    return opener


def test_a_refused_write_leaves_the_old_file_and_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    write_text_atomically(path, "old")
    monkeypatch.setattr(atomic, "open", full_disk_after(1000), raising=False)
    with pytest.raises(OutputError) as e:
        write_text_atomically(path, "x" * 5000)
    assert str(e.value).startswith(f"cannot write {path}: no space left on the device (ENOSPC); it needs about 5.0 KB")
    assert str(e.value).endswith("; the previous file is intact")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_a_checkpoint_write_that_torch_reports_as_a_runtime_error_is_named_as_the_disk_s(tmp_path, monkeypatch):
    """torch.save's C++ writer turns the disk's OSError into "unexpected pos ..."; the error
    found behind it is what the user reads."""
    from maelab.weights.checkpoints import AtomicCheckpointIO

    monkeypatch.setattr(atomic, "open", full_disk_after(100_000), raising=False)
    refused = r"cannot write .*last.ckpt: no space left on the device \(ENOSPC\); it needs about 400.0 KB"
    with pytest.raises(OutputError, match=refused):
        AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.zeros(100_000)}}, tmp_path / "last.ckpt")
    assert list(tmp_path.iterdir()) == []


def test_a_write_refused_outside_maelab_s_writers_is_one_line_too(tmp_path):
    """A logger's CSV on a full disk: the CLI's message names the file and the reason."""
    from maelab.commands.train import user_message

    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "csv" / "metrics.csv"))
    assert user_message(full).startswith(f"cannot write {tmp_path / 'csv' / 'metrics.csv'}: no space left on the")
    read_only = OSError(errno.EROFS, os.strerror(errno.EROFS), "/runs/x/results.json")
    assert user_message(read_only) == "cannot write /runs/x/results.json: the file system is read-only (EROFS)"
    assert user_message(OSError(errno.ENOENT, "No such file or directory", "/x")) is None  # not the disk's refusal
