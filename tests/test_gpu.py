"""The GPU paths: bf16 autocast, torch.compile, fused AdamW, CIFAR-10 held on the device, fine-tuning
with mixup, reconstructions drawn from device tensors, peak memory.

Marked ``gpu``: they run where CUDA is, and skip with a reason elsewhere. ``benchmarks/gpu_check.sh``
runs them first on a GPU machine; its ``--cpu`` form (a CI test) rehearses them on the CPU with
``MAELAB_GPU_REHEARSAL=1``, so the one GPU run cannot fail on a mistake a CPU would have shown.
"""

import copy

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from maelab.callbacks.reconstructions import reconstruction_grid
from tests.conftest import TINY, TINY_CLASSIFIER, compose_config, tiny_pretrain_module

pytestmark = pytest.mark.gpu

# ViT-T's width on 32 px images in 4 px patches: big enough for bf16 rounding to show
MODEL = dict(patch_size=4, embed_dim=192, depth=4, num_heads=3)
DECODER = dict(decoder_width=128, decoder_depth=2, decoder_heads=4)


def accelerator(device: torch.device) -> str:
    return "gpu" if device.type == "cuda" else "cpu"


def pretrain_batch(device: torch.device, n: int = 64):
    """A small MAE, a uint8 batch, its model input and one fixed set of masks, on ``device``."""
    torch.manual_seed(0)
    module = tiny_pretrain_module(model=MODEL, img_size=32, **DECODER).to(device)
    g = torch.Generator(device=device).manual_seed(1)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, device=device, generator=g)
    x = module.preprocess(images, train=False)
    noise = module.model.masking.noise(n, module.model.patch_embed.grid_size, 0.75, device, g)
    return module, images, x, noise


def loss_and_grads(module, forward, x, noise, bf16: bool):
    module.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        loss, pred, mask = forward(x, 0.75, noise)
    loss.backward()
    grads = torch.cat([p.grad.flatten().float() for p in module.parameters() if p.grad is not None])
    return loss.detach().float(), pred.dtype, mask, grads


def test_a_bf16_step_is_finite_and_within_2_percent_of_the_fp32_step(gpu):
    module, _, x, noise = pretrain_batch(gpu)
    loss32, dtype32, mask32, grads32 = loss_and_grads(module, module.model, x, noise, bf16=False)
    loss16, dtype16, mask16, grads16 = loss_and_grads(module, module.model, x, noise, bf16=True)
    assert (dtype32, dtype16) == (torch.float32, torch.bfloat16)  # autocast did run the matmuls in bf16
    assert torch.equal(mask16, mask32)
    assert torch.isfinite(loss16) and torch.isfinite(grads16).all()
    assert abs(loss16 - loss32) / loss32 < 0.02, (float(loss16), float(loss32))
    assert torch.nn.functional.cosine_similarity(grads16, grads32, dim=0) > 0.99


def test_a_compiled_step_matches_the_eager_step(gpu):
    module, _, x, noise = pretrain_batch(gpu)
    eager_loss, _, eager_mask, eager_grads = loss_and_grads(module, module.model, x, noise, bf16=False)
    compiled = torch.compile(module.model)
    loss, _, mask, grads = loss_and_grads(module, compiled, x, noise, bf16=False)
    assert torch.equal(mask, eager_mask)
    assert abs(loss - eager_loss) / eager_loss < 1e-4, (float(loss), float(eager_loss))
    assert (grads - eager_grads).norm() / eager_grads.norm() < 1e-3


class RunProbe(L.Callback):
    """Records what the trainer really used, for the assertions below (added through the config,
    as a user adds a callback)."""

    seen: dict = {}

    def on_train_end(self, trainer, pl_module):
        optimizer = trainer.optimizers[0]
        RunProbe.seen = {
            "optimizer": type(optimizer).__name__,
            "fused": optimizer.defaults.get("fused"),
            "precision": trainer.precision,
            "param_device": next(pl_module.parameters()).device.type,
        }


PROBE = "+callbacks.probe._target_=tests.test_gpu.RunProbe"


def test_compiled_bf16_pretraining_uses_fused_adamw_and_reports_peak_memory(gpu, tmp_path, caplog):
    from maelab.run.fit import run

    overrides = [*TINY, f"trainer.accelerator={accelerator(gpu)}", "task.compile=true", "trainer.max_epochs=2", PROBE]
    results = run(compose_config(overrides, tmp_path))
    assert "torch.compile failed" not in caplog.text  # the training forward did run compiled
    on_gpu = gpu.type == "cuda"
    assert RunProbe.seen == {
        "optimizer": "AdamW",
        "fused": on_gpu,  # one kernel for the whole update on a GPU
        "precision": "bf16-mixed" if on_gpu else "32-true",
        "param_device": gpu.type,
    }
    assert np.isfinite(results["last"]["train/loss"]) and results["last"]["train/loss"] < 2.0
    if on_gpu:
        total = torch.cuda.get_device_properties(gpu).total_memory / 2**30
        assert 0 < results["peak_memory_gb"] < total
    else:
        assert results["peak_memory_gb"] is None


def test_fine_tuning_with_mixup_and_cutmix_trains_on_the_device(gpu, tmp_path):
    from maelab.run.fit import run

    overrides = [
        "+experiment=scratch_vitt_cifar10",
        *TINY_CLASSIFIER,
        f"trainer.accelerator={accelerator(gpu)}",
        "augment=crop_flip",  # batched on the device
        "task.mixup=0.8",
        "task.cutmix=1.0",
        "task.label_smoothing=0.1",
        "task.base_lr=1e-2",  # a few dozen steps from random weights
        "task.warmup_epochs=1",
        "trainer.max_epochs=8",
        PROBE,
    ]
    results = run(compose_config(overrides, tmp_path))
    assert RunProbe.seen["param_device"] == gpu.type and RunProbe.seen["fused"] == (gpu.type == "cuda")
    assert np.isfinite(results["last"]["train/loss"])
    # on held-out shapes, below the cross-entropy of a guess (ln 10 = 2.30); the CPU reaches ~1.95
    assert results["test"]["test/loss"] < 2.15 and results["test"]["test/acc5"] > 0.6


def test_one_cifar10_epoch_gathers_its_batches_from_the_device(gpu, cifar10_root, tmp_path):
    from maelab.data.in_memory import IndexBatch
    from maelab.run.build import build

    on_gpu = gpu.type == "cuda"
    overrides = [
        *(o for o in TINY if not o.startswith("data.")),  # the model and trainer settings, not synthetic data's
        "data=cifar10",
        f"data.root={cifar10_root}",
        "data.batch_size=512",
        "data.img_size=32",
        f"trainer.accelerator={accelerator(gpu)}",
        "trainer.max_epochs=1",
        "trainer.num_sanity_val_steps=0",
        "callbacks.knn_monitor.every_n_epochs=1",  # k-NN over all 50,000 features, on the device
        "callbacks.reconstructions.every_n_epochs=1",  # the PNG, drawn from device tensors
        # the CPU rehearsal trains a few batches of the epoch; the GPU trains all of it
        *([] if on_gpu else ["trainer.limit_train_batches=4"]),
    ]
    datamodule, module, trainer = build(compose_config(overrides, tmp_path))
    trainer.fit(module, datamodule=datamodule)
    assert isinstance(next(iter(datamodule.train_dataloader())), IndexBatch)  # the loader yields indices only
    images, labels = datamodule.split_on("train", module.device)
    assert images.device.type == gpu.type and images.dtype == torch.uint8 and len(labels) == 50_000
    assert trainer.global_step == (97 if on_gpu else 4)  # 50,000 // 512 whole batches
    assert np.isfinite(float(trainer.callback_metrics["train/loss"]))
    assert float(trainer.callback_metrics["val/knn_acc"]) > 0.15  # chance is 0.10
    assert (tmp_path / "reconstructions" / "epoch_0000.png").is_file()


def test_a_reconstruction_grid_from_device_tensors_draws_what_the_cpu_draws(gpu, tmp_path):
    module, images, _, _ = pretrain_batch(gpu, n=8)
    on_cpu = copy.deepcopy(module).cpu()
    grid = reconstruction_grid(module, images)
    reference = reconstruction_grid(on_cpu, images.cpu())
    assert grid.device.type == gpu.type and grid.shape == reference.shape == (3, 8 * 34 + 2, 3 * 34 + 2)
    assert (grid.cpu() - reference).abs().max() < 2 / 255

    from torchvision.utils import save_image

    save_image(grid, tmp_path / "grid.png")
    drawn = np.asarray(Image.open(tmp_path / "grid.png").convert("RGB")).astype(int)
    expected = (reference.permute(1, 2, 0).numpy() * 255 + 0.5).clip(0, 255).astype(int)
    assert np.abs(drawn - expected).max() <= 2
