import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import timm
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig
from PIL import Image

from maelab.config import compose, register_resolvers
from maelab.run.fit import run

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


# --- shared by several test modules ---------------------------------------------------------

SMALL = dict(img_size=32, patch_size=4, embed_dim=64, depth=3, num_heads=4)

# A classifier of the same tiny encoder as TINY's pretraining, on synthetic data.
TINY_CLASSIFIER = [
    "data=synthetic",
    "data.num_train=256",
    "data.num_test=64",
    "data.val_size=64",
    "data.batch_size=32",
    "data.img_size=16",
    "data.num_workers=0",
    "model.patch_size=4",
    "model.embed_dim=32",
    "model.depth=1",
    "model.num_heads=2",
    "task.effective_batch_size=null",
    "trainer.accelerator=cpu",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
]

# The same tiny encoder trained from image files (data=folder, data=shards): 16 px, batches of 8,
# read in the main process; the data group and its root are the test's.
FROM_FILES = [
    "data.img_size=16",
    "data.batch_size=8",
    "data.eval_batch_size=16",
    *(o for o in TINY_CLASSIFIER if o.startswith(("model.", "task.", "trainer.", "data.num_workers"))),
]


def official_state_dict(encoder: torch.nn.Module, decoder_width: int = 32, decoder_depth: int = 1) -> dict:
    """An official MAE pretraining state dict, written out key by key from the published layout:
    the encoder's tensors, then mask_token, decoder_pos_embed, decoder_embed, decoder_blocks,
    decoder_norm, decoder_pred (patch**2 * 3 outputs)."""
    g = torch.Generator().manual_seed(0)
    enc = encoder.state_dict()
    width, tokens = enc["cls_token"].shape[-1], enc["pos_embed"].shape[1]
    patch = enc["patch_embed.proj.weight"].shape[-1]
    sd = {k: enc[k].clone() for k in enc if not k.startswith(("head", "fc_norm"))}
    sd["mask_token"] = torch.randn(1, 1, decoder_width, generator=g)
    sd["decoder_pos_embed"] = torch.randn(1, tokens, decoder_width, generator=g)
    sd["decoder_embed.weight"] = torch.randn(decoder_width, width, generator=g)
    sd["decoder_embed.bias"] = torch.randn(decoder_width, generator=g)
    for i in range(decoder_depth):
        p = f"decoder_blocks.{i}."
        d, h = decoder_width, 4 * decoder_width
        for name, shape in [
            ("norm1.weight", (d,)),
            ("norm1.bias", (d,)),
            ("attn.qkv.weight", (3 * d, d)),
            ("attn.qkv.bias", (3 * d,)),
            ("attn.proj.weight", (d, d)),
            ("attn.proj.bias", (d,)),
            ("norm2.weight", (d,)),
            ("norm2.bias", (d,)),
            ("mlp.fc1.weight", (h, d)),
            ("mlp.fc1.bias", (h,)),
            ("mlp.fc2.weight", (d, h)),
            ("mlp.fc2.bias", (d,)),
        ]:
            sd[p + name] = torch.randn(*shape, generator=g) * 0.02
    sd["decoder_norm.weight"] = torch.ones(decoder_width)
    sd["decoder_norm.bias"] = torch.zeros(decoder_width)
    sd["decoder_pred.weight"] = torch.randn(patch * patch * 3, decoder_width, generator=g)
    sd["decoder_pred.bias"] = torch.randn(patch * patch * 3, generator=g)
    return sd


def timm_vit(**kwargs) -> torch.nn.Module:
    """A timm ViT with random (non-default) weights: the 'source' of an official checkpoint."""
    torch.manual_seed(1)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory) -> str:
    """A short TINY pretraining run's last.ckpt (k-NN monitor every epoch)."""
    out = tmp_path_factory.mktemp("pretrain")
    results = run(compose_config(TINY + ["trainer.max_epochs=3", "callbacks.knn_monitor.every_n_epochs=1"], out))
    assert 0.0 <= results["last"]["val/knn_acc"] <= 1.0
    return results["last_checkpoint"]


TREE_CLASSES = ["n01440764", "n01443537", "n01484850"]


def save_image_file(path, image: Image.Image, fmt: str = "JPEG", **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt, **kwargs)


def random_picture(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def make_tree(root, per_class: int = 6, val_per_class: int = 2):
    """train/ and val/ with three classes of JPEGs in varied sizes, plus the oddities ImageNet holds."""
    sizes = [(40, 30), (33, 57), (64, 64), (80, 48), (36, 36), (50, 70)]
    for c, name in enumerate(TREE_CLASSES):
        for i in range(per_class):
            w, h = sizes[i % len(sizes)]
            save_image_file(root / "train" / name / f"{name}_{i}.JPEG", random_picture(w, h, 10 * c + i))
        for i in range(val_per_class):
            save_image_file(
                root / "val" / name / f"ILSVRC2012_val_{c}{i}.JPEG", random_picture(48, 40, 100 + 10 * c + i)
            )
    odd = root / "train" / TREE_CLASSES[0]
    save_image_file(odd / "gray.JPEG", random_picture(40, 40, 1).convert("L"))
    save_image_file(odd / "cmyk.JPEG", random_picture(40, 40, 2).convert("CMYK"))
    save_image_file(odd / "png_inside.JPEG", random_picture(40, 40, 3), fmt="PNG")  # ImageNet's n02105855_2933.JPEG
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to display
    save_image_file(odd / "rotated.JPEG", random_picture(60, 30, 4), exif=exif)
    return root


def corrupt_one_file(tree):
    bad = tree / "train" / TREE_CLASSES[1] / "broken.JPEG"
    data = io.BytesIO()
    random_picture(40, 40, 5).save(data, format="JPEG")
    bad.write_bytes(data.getvalue()[:200])  # a truncated download
    return bad


def weights(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


class CrashAt(L.Callback):
    """Kills a run in the middle of an epoch, the way a node failure would."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("node lost")


class SignalAt(L.Callback):
    """Sends this process submitit's warning signal (USR2) at a step, as SLURM does before a
    preemption or the time limit."""

    def __init__(self, step: int):
        self.step = step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step + 1 == self.step:  # during that step (a resumed job starts past it)
            os.kill(os.getpid(), signal.SIGUSR2)


class SigtermAtSanityCheck(L.Callback):
    """Sends this process a SIGTERM before training starts, as `kill` might during data setup."""

    def on_sanity_check_start(self, trainer, pl_module):
        os.kill(os.getpid(), signal.SIGTERM)


class SignalAfterLastEpochSave(ModelCheckpoint):
    """Sends USR2 at the end of the last epoch, after Preemption's save point (Lightning runs
    ModelCheckpoint subclasses last), as a signal during the final periodic checkpoint would."""

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == trainer.max_epochs - 1:
            os.kill(os.getpid(), signal.SIGUSR2)
