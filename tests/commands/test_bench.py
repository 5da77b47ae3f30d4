"""``maelab bench`` on the CPU: its FLOP count, its JSON, its compile fallback, the HF reference."""

import json

import pytest
import torch

from maelab.commands.bench import bench, build_module, training_flops
from maelab.models.mae import MaskedAutoencoder
from tests.conftest import maelab

SMALL = ["+experiment=quickstart", "data.batch_size=8", "model.depth=2", "task.decoder_depth=1"]


def mae_forward_flops(model: MaskedAutoencoder, mask_ratio: float) -> float:
    """The MAE's arithmetic by hand: a (m, k) x (k, n) matmul is 2mkn. The encoder runs on the
    visible patches plus cls, the decoder and its prediction on all L + 1 tokens; each block's
    qkv and proj (4 D^2 per token), MLP (2 D H per token) and attention (2 T^2 D, twice)."""

    def block(tokens: int, b) -> float:
        width, hidden = b.attn.qkv.in_features, b.mlp.fc1.out_features
        return 2 * (tokens * (4 * width * width + 2 * width * hidden) + 2 * tokens * tokens * width)

    L, proj = model.patch_embed.num_patches, model.patch_embed.proj
    visible = model.num_visible(mask_ratio) + 1
    encoder = 2 * L * proj.in_channels * model.patch_size**2 * proj.out_channels
    encoder += sum(block(visible, b) for b in model.blocks)
    decoder = 2 * visible * model.decoder_embed.in_features * model.decoder_embed.out_features
    decoder += sum(block(L + 1, b) for b in model.decoder_blocks)
    decoder += 2 * (L + 1) * model.decoder_pred.in_features * model.decoder_pred.out_features
    return encoder + decoder


@pytest.mark.parametrize("mask_ratio", [0.75, 0.5])
def test_the_flop_count_is_the_mae_arithmetic_with_the_encoder_on_visible_patches_only(mask_ratio):
    from tests.conftest import tiny_pretrain_module

    module = tiny_pretrain_module(
        model=dict(patch_size=8, embed_dim=96, depth=3, num_heads=3), img_size=64, mask_ratio=mask_ratio,
        decoder_width=64, decoder_depth=2, decoder_heads=2,
    )  # fmt: skip
    flops = training_flops(module, 64)  # Lightning's measure_flops, on a meta-device twin
    # norms, softmax, GELU and the loss are not matmuls: under 1%
    assert flops["forward"] == pytest.approx(mae_forward_flops(module.model, mask_ratio), rel=0.01)
    assert 2.9 * flops["forward"] < flops["train"] < 3 * flops["forward"]  # the backward: twice, less the input grad


@pytest.mark.slow
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
    assert result["gflops_per_img_train"] == round(training_flops(module, 32)["train"] / 1e9, 3)
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


@pytest.mark.slow
def test_the_hf_reference_has_the_same_sizes_and_is_timed_alongside(tmp_path):
    pytest.importorskip("transformers", reason="--compare hf needs transformers (a dev dependency)")
    from transformers import ViTMAEForPreTraining

    from maelab.commands.bench_hf import hf_config

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


@pytest.mark.slow
def test_a_mistyped_override_ends_with_one_line_naming_the_key_meant(tmp_path):
    done = maelab("bench", "+experiment=quickstart", "task.mask_ratioo=0.5", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith("error: task.mask_ratioo=0.5: no such key; did you mean task.mask_ratio?")
    assert "Traceback" not in done.stderr
    done = maelab("bench", "+experiment=finetune_vitb", cwd=tmp_path)
    assert (
        done.returncode == 2 and "ClassifierModule is not pretraining; choose a pretraining experiment" in done.stderr
    )


def _weights(results) -> dict:
    return torch.load(results["last_checkpoint"], map_location="cpu", weights_only=False)["state_dict"]


@pytest.mark.slow
@pytest.mark.parametrize("task", ["pretrain", "finetune"])
def test_a_compiled_training_run_matches_the_eager_one(task, tmp_path, monkeypatch, caplog):
    import torch._inductor.config

    from maelab.run.fit import run
    from tests.conftest import TINY, TINY_CLASSIFIER, compose_config

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
    from maelab.run.fit import run
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


@pytest.mark.parametrize("target", ["hog", "pca", "pixel"])
def test_the_flop_count_takes_any_target(target):
    # PCA must be fitted and HOG does not run on the meta device: the count leaves the target out
    module, _, img_size, _ = build_module([*SMALL, f"target={target}"])
    flops = training_flops(module, img_size)
    assert 2.9 * flops["forward"] < flops["train"] < 3 * flops["forward"] and flops["forward"] > 1e6
