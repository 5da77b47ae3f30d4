"""maelab from a non-editable wheel in a fresh virtual environment, run outside the checkout."""

import json
import site
import subprocess
import sys
import sysconfig

import pytest

from tests.conftest import REPO


def sh(*args, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, **kwargs)
    assert done.returncode == 0, f"{args}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.mark.slow
def test_wheel_installs_and_runs_from_a_fresh_environment(tmp_path):
    sh(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(tmp_path / "dist"),
        str(REPO),
    )
    wheel = next((tmp_path / "dist").glob("maelab-*.whl"))

    venv = tmp_path / "venv"
    sh(sys.executable, "-m", "venv", "--without-pip", str(venv))
    python = venv / "bin" / "python"
    sh(sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel))
    # the dependencies (torch and the rest) come from this environment instead of a second copy;
    # a path line in a .pth does not run this environment's own .pth files, so its editable
    # maelab stays out of sight
    new_site = sh(str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
    deps = [sysconfig.get_paths()["purelib"], *site.getsitepackages()]
    (tmp_path / "venv" / new_site.split(str(venv) + "/")[1] / "deps.pth").write_text("\n".join(deps) + "\n")

    where = sh(
        str(python),
        "-c",
        "import maelab, maelab.config; print(maelab.__file__); print(maelab.config.config_dir())",
        cwd=tmp_path,
    ).stdout.split()
    assert all(path.startswith(str(venv)) for path in where), where  # code and configs from the wheel

    cli = venv / "bin" / "maelab"
    composed = sh(str(cli), "train", "+experiment=quickstart", "--cfg", "job", cwd=tmp_path)
    assert "name: quickstart" in composed.stdout
    run_dir = tmp_path / "run"
    sh(
        str(cli),
        "train",
        "+experiment=quickstart",
        "trainer.max_steps=2",
        "data.num_train=128",
        "trainer.enable_progress_bar=false",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert json.loads((run_dir / "results.json").read_text())["global_step"] == 2
