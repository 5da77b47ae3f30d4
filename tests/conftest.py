import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import DictConfig

from maelab.config import compose, register_resolvers

register_resolvers()

REPO = Path(__file__).resolve().parents[1]


def maelab(*args: str, cwd: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the CLI the way users do, in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "maelab", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def compose_config(overrides: list[str], output_dir: Path) -> DictConfig:
    """The config `maelab train OVERRIDES` would run, with its output directory fixed."""
    return compose(overrides, output_dir)


# A seconds-scale pretraining run on synthetic data, for in-process and CLI tests.
TINY = [
    "+experiment=quickstart",
    "data.num_train=128",
    "data.num_test=32",
    "data.batch_size=32",
    "data.img_size=16",
    "model.embed_dim=32",
    "model.depth=1",
    "model.num_heads=2",
    "task.decoder_width=16",
    "task.decoder_depth=1",
    "task.decoder_heads=2",
    "trainer.accelerator=cpu",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
]


def tiny_pretrain_module(**overrides):
    """A PretrainModule of a few thousand parameters on 16 px images."""
    from maelab.modules.pretrain import PretrainModule

    args = dict(
        model=dict(patch_size=4, embed_dim=32, depth=1, num_heads=2),
        target={"_target_": "maelab.models.targets.NormPixelTarget"},
        masking={"_target_": "maelab.models.masking.RandomMasking"},
        augment=None,
        img_size=16,
        mean=[0.5] * 3,
        std=[0.25] * 3,
        decoder_width=16,
        decoder_depth=1,
        decoder_heads=2,
    )
    return PretrainModule(**{**args, **overrides})


@pytest.fixture
def cifar10_root() -> Path:
    """The extracted cifar10-jpeg copy that .ci/run points MAELAB_CIFAR10 at."""
    root = os.environ.get("MAELAB_CIFAR10")
    if not root or not (Path(root) / "train").is_dir():
        pytest.skip("MAELAB_CIFAR10 does not point at an extracted cifar10-jpeg folder (.ci/run sets it)")
    return Path(root)


@pytest.fixture
def gpu():
    """The device of a test marked ``gpu``: CUDA. ``benchmarks/gpu_check.sh --cpu`` rehearses those
    tests on the CPU (MAELAB_GPU_REHEARSAL=1), so the GPU run cannot fail on a mistake the CPU shows."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda")
    if os.environ.get("MAELAB_GPU_REHEARSAL") == "1":
        return torch.device("cpu")
    pytest.skip("needs a CUDA GPU: benchmarks/gpu_check.sh runs these there (its --cpu form rehearses them here)")
