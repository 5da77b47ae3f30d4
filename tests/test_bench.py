"""``maelab bench`` on the CPU: its FLOP count, its JSON, its compile fallback, the HF reference."""

import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from maelab.bench import bench, build_module, mae_flops
from maelab.models.mae import MaskedAutoencoder
from tests.conftest import maelab

SMALL = ["+experiment=quickstart", "data.batch_size=8", "model.depth=2", "task.decoder_depth=1"]


@pytest.mark.parametrize("mask_ratio", [0.75, 0.5])
def test_the_mae_flop_count_is_what_the_forward_multiplies(mask_ratio):
    model = MaskedAutoencoder(
        img_size=64, patch_size=8, embed_dim=96, depth=3, num_heads=3,
        decoder_width=64, decoder_depth=2, decoder_heads=2,
    )  # fmt: skip
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):  # attention as plain matmuls, which the counter sees on a CPU
        model(torch.randn(2, 3, 64, 64), mask_ratio)
    assert mae_flops(model, mask_ratio)["forward"] * 2 == counter.get_total_flops()  # 2 images, exactly


def test_bench_prints_one_json_object_with_consistent_figures(tmp_path):
    done = maelab("bench", *SMALL, "--steps", "3", "--warmup", "1", "--no-compile", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    [line] = done.stdout.strip().splitlines()
    result = json.loads(line)
    assert result["experiment"] == "quickstart" and result["device"].startswith("cpu")
    assert (result["augment"], result["target"], result["masking"]) == (
        "RandomResizedCropFlip",
        "NormPixelTarget",
        "RandomMasking",
    )
    assert result["batch"] == 8 and result["compiled"] is False and result["precision"] == "32-true"
    assert result["img_per_s"] == pytest.approx(8 / (result["step_ms"] / 1e3), rel=0.02)
    module, _, _, _ = build_module(SMALL)
    assert result["gflops_per_img_train"] == round(mae_flops(module.model, 0.75)["train"] / 1e9, 3)
    expected_tflops = result["gflops_per_img_train"] * result["img_per_s"] / 1e3
    assert result["tflops_achieved"] == pytest.approx(expected_tflops, rel=0.05, abs=2e-3)
    assert result["matmul_peak_tflops"] > 0 and 0 < result["utilization"]
    assert result["peak_host_rss_gb"] > 0


def test_without_a_compiler_the_bench_times_eager_and_says_why(monkeypatch):
    def no_compiler(model, **kwargs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(torch, "compile", no_compiler)
    module, batch, size, _ = build_module(SMALL)
    result = bench(module, batch, size, steps=1, warmup=1, compile_model=True, device=torch.device("cpu"))
    assert result["compiled"] is False and "no C++ compiler found" in result["compile_fallback"]
    assert result["img_per_s"] > 0


def test_the_hf_reference_has_the_same_sizes_and_is_timed_alongside(tmp_path):
    pytest.importorskip("transformers", reason="--compare hf needs transformers (a dev dependency)")
    from transformers import ViTMAEForPreTraining

    from maelab.bench_hf import hf_config

    module, _, _, _ = build_module(SMALL)
    hf = ViTMAEForPreTraining(hf_config(module.model, 0.75, norm_pix=True))
    trainable = sum(p.numel() for p in module.model.parameters() if p.requires_grad)
    assert sum(p.numel() for p in hf.parameters() if p.requires_grad) == pytest.approx(trainable, rel=0.01)
    done = maelab("bench", *SMALL, "--steps", "2", "--warmup", "1", "--no-compile", "--compare", "hf", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert list(result["hf"]) == ["eager"]  # not compiled, so HF is timed eagerly only
    assert result["hf"]["eager"]["img_per_s"] > 0
    assert result["speedup_vs_hf"] == pytest.approx(result["img_per_s"] / result["hf"]["eager"]["img_per_s"], rel=0.02)


def test_a_mistyped_override_ends_with_hydra_s_message_alone(tmp_path):
    done = maelab("bench", "+experiment=quickstart", "task.mask_ratioo=0.5", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith("error: Could not override 'task.mask_ratioo'") and "Traceback" not in done.stderr
    done = maelab("bench", "+experiment=finetune_vitb", cwd=tmp_path)
    assert (
        done.returncode == 2 and "ClassifierModule is not pretraining; choose a pretraining experiment" in done.stderr
    )


def _weights(results) -> dict:
    return torch.load(results["last_checkpoint"], map_location="cpu", weights_only=False)["state_dict"]


@pytest.mark.parametrize("task", ["pretrain", "finetune"])
def test_a_compiled_training_run_matches_the_eager_one(task, tmp_path, monkeypatch, caplog):
    import torch._inductor.config

    from maelab.train import run
    from tests.conftest import TINY, compose_config
    from tests.test_classifier import TINY_CLASSIFIER

    # inductor draws its own random numbers (masks, drop path) unless told to call torch's: with
    # the same draws, a compiled run must follow the eager one up to float rounding
    if task == "pretrain":
        common = TINY + ["trainer.max_epochs=1", "callbacks.knn_monitor=null"]
    else:  # the fine-tuning module from random weights, with mixup/cutmix and drop path on
        common = ["+experiment=scratch_vitt_cifar10", *TINY_CLASSIFIER, "augment=none", "trainer.max_epochs=1"]
    compiled_models = []
    real_compile = torch.compile
    monkeypatch.setattr(
        torch, "compile", lambda model, **kw: compiled_models.append(model) or real_compile(model, **kw)
    )
    eager = run(compose_config(common, tmp_path / "eager"))
    assert compiled_models == []
    with torch._inductor.config.patch(fallback_random=True):
        compiled = run(compose_config(common + ["task.compile=true"], tmp_path / "compiled"))
    a, b = _weights(eager), _weights(compiled)
    assert a.keys() == b.keys()  # the compiled wrapper leaves the checkpoint's names alone
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-4), key
    assert compiled["last"]["train/loss"] == pytest.approx(eager["last"]["train/loss"], abs=1e-4)
    assert len(compiled_models) == 1 and "torch.compile failed" not in caplog.text  # it did run compiled


def test_where_compilation_fails_training_goes_on_eagerly_and_says_why(tmp_path, monkeypatch, caplog):
    from maelab.train import run
    from tests.conftest import TINY, compose_config

    def broken_compile(model, **kwargs):
        def fails(*args, **kw):
            raise RuntimeError("inductor: no working C++ compiler")

        return fails

    common = TINY + ["trainer.max_epochs=1", "callbacks.knn_monitor=null"]
    eager = run(compose_config(common, tmp_path / "eager"))
    monkeypatch.setattr(torch, "compile", broken_compile)
    fallback = run(compose_config(common + ["task.compile=true"], tmp_path / "fallback"))
    assert "torch.compile failed (RuntimeError: inductor: no working C++ compiler); training eagerly" in caplog.text
    a, b = _weights(eager), _weights(fallback)
    for key in a:
        assert torch.equal(a[key], b[key]), key
