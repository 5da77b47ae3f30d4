"""``maelab bench``: the training step's speed on this device, as one JSON object.

A full pretraining step on synthetic uint8 images of the experiment's shape: augmentation and
masking on the device, forward, backward, fused AdamW step, in the run's precision (bf16 autocast
on a GPU, no grad scaler). Steady state: the first ``--warmup`` steps (compilation, allocator,
cuDNN autotuning) are not timed; the device is synchronised only around the timed window.

FLOPs are the MAE count, from the shapes (``mae_flops``): a matmul of (m, k) by (k, n) is 2mkn.
The encoder runs on the visible patches plus the cls token, the decoder (and its prediction head)
on all L + 1 tokens; attention adds QK^T and AV (2 x 2 T^2 D per block); norms, softmax, GELU and
the loss are left out (well under 1%). Training counts 3x the forward (the backward is twice the
forward). A test checks the count against torch's FlopCounterMode.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from hydra.errors import HydraException

from maelab.errors import UserError


def block_flops(tokens: int, block) -> float:
    """Forward FLOPs of one ViT block on ``tokens`` tokens: qkv and proj (4 D^2 per token), the
    MLP (2 D H per token, H its hidden width), attention scores and weighted sum (2 T^2 D)."""
    width, hidden = block.attn.qkv.in_features, block.mlp.fc1.out_features
    linear = tokens * (4 * width * width + 2 * width * hidden)
    attention = 2 * tokens * tokens * width
    return 2 * (linear + attention)


def mae_flops(model, mask_ratio: float) -> dict[str, float]:
    """Forward FLOPs per image of a ``MaskedAutoencoder`` at a mask ratio, and 3x for training."""
    L = model.patch_embed.num_patches
    proj = model.patch_embed.proj
    visible = model.num_visible(mask_ratio) + 1  # + cls
    encoder = 2 * L * proj.in_channels * model.patch_size**2 * proj.out_channels
    encoder += sum(block_flops(visible, b) for b in model.blocks)
    decoder = 2 * visible * model.decoder_embed.in_features * model.decoder_embed.out_features
    decoder += sum(block_flops(L + 1, b) for b in model.decoder_blocks)
    decoder += 2 * (L + 1) * model.decoder_pred.in_features * model.decoder_pred.out_features  # cls dropped after
    return {"encoder": encoder, "decoder": decoder, "forward": encoder + decoder, "train": 3 * (encoder + decoder)}


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 10) -> float:
    """The device's measured matmul throughput (TFLOP/s) on an n x n x n product in ``dtype``."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, device: torch.device, steps: int, warmup: int) -> float:
    """Seconds per step in the steady state."""
    for _ in range(warmup):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return (time.perf_counter() - start) / steps


def build_module(overrides: list[str]):
    """The experiment's PretrainModule (as ``maelab train`` builds it), its per-device batch and
    its image size, without a datamodule: the bench feeds synthetic images."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import get_class, instantiate

    from maelab.cli import config_dir
    from maelab.resolvers import register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    if get_class(cfg.task._target_).__name__ != "PretrainModule":
        raise UserError(
            f"maelab bench times pretraining steps, and task {cfg.task._target_} is not pretraining; "
            "choose a pretraining experiment (+experiment=mae_vitb|mae_vitl|mae_vith|mae_vitt_cifar10|quickstart)"
        )
    module = instantiate(
        cfg.task,
        model=cfg.model,
        target=cfg.target,
        masking=cfg.masking,
        augment=cfg.get("augment"),
        img_size=cfg.data.img_size,
        mean=cfg.data.mean,
        std=cfg.data.std,
        _recursive_=False,
        _convert_="all",
    )
    return module, int(cfg.data.batch_size), int(cfg.data.img_size), cfg


def compile_or_explain(model, backend: str):
    """(``torch.compile(model)``, None), or (model, why) where this platform cannot compile."""
    try:
        return torch.compile(model, backend=backend), None
    except Exception as e:  # noqa: BLE001  (no compiler on this platform: time eager)
        return model, f"{type(e).__name__}: {e}"


def profile_summary(step, device: torch.device, steps: int = 5, rows: int = 25) -> str:
    """torch.profiler over ``steps`` training steps: the operators and kernels that take the most
    device time (CPU time on a CPU), as a table. Where a throughput target is missed, this says
    where the time goes."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=90)


def bench(
    module,
    batch: int,
    img_size: int,
    steps: int,
    warmup: int,
    compile_model: bool,
    device,
    backend: str = "inductor",
    profile: bool = False,
) -> dict:
    """Times maelab's pretraining step; with ``profile`` the result also holds the profiler table."""
    from maelab.modules.optim import param_groups_weight_decay

    module = module.to(device).train()
    model = module.model
    if hasattr(model.target, "fit") and not model.target.ready:  # PCA: components from random patches
        model.target.fit(torch.randn(64, 3, img_size, img_size, device=device))
    bf16 = device.type == "cuda"
    optimizer = torch.optim.AdamW(
        param_groups_weight_decay(model, 0.05), lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda"
    )
    images = torch.randint(0, 256, (batch, 3, img_size, img_size), dtype=torch.uint8, device=device)
    forward, why = compile_or_explain(model, backend) if compile_model else (model, None)
    compiled = forward is not model

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, _, _ = forward(module.preprocess(images, train=True), module.mask_ratio)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if compiled:
        try:
            step()  # compiles here; a failure falls back to eager
        except Exception as e:  # noqa: BLE001
            forward, compiled, why = model, False, f"{type(e).__name__}: {str(e).splitlines()[0]}"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = time_steps(step, device, steps, warmup)
    flops = mae_flops(model, module.mask_ratio)
    result = {
        "img_per_s": round(batch / seconds, 1),
        "step_ms": round(seconds * 1e3, 2),
        "batch": batch,
        "img_size": img_size,
        "precision": "bf16-mixed" if bf16 else "32-true",
        "compiled": compiled,
        **({"compile_backend": backend} if compiled else {}),
        "gflops_per_img_train": round(flops["train"] / 1e9, 3),
        "tflops_achieved": round(flops["train"] * batch / seconds / 1e12, 3),
    }
    if why:
        result["compile_fallback"] = why
    if device.type == "cuda":
        result["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    else:
        import resource

        result["peak_host_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    if profile:
        result["profile"] = profile_summary(step, device)
    return result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="maelab bench",
        description="Time full pretraining steps on synthetic images of an experiment's shape on this device and "
        "print one JSON object: img/s, step time, peak memory, MAE FLOPs per image, TFLOP/s and utilisation "
        "of the measured matmul peak.",
        epilog="example: maelab bench +experiment=mae_vitb data.batch_size=256 --compare hf --target 5900 "
        "--profile outputs/profiles.txt",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for maelab train (+experiment=NAME ...)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation, autotuning)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="default: on a GPU")
    parser.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile's backend (default inductor); 'eager' traces the model without generating kernels, "
        "a quick check that it compiles",
    )
    parser.add_argument(
        "--compare",
        choices=["hf"],
        help="also time HuggingFace's ViTMAEForPreTraining, eager and (when compiling) compiled",
    )
    parser.add_argument("--target", type=float, metavar="IMG_PER_S", help="the img/s to reach; the JSON says if it did")
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="FILE",
        help="append a torch.profiler table of the operators and kernels taking the most time to FILE "
        "(with --target: only when the target is missed)",
    )
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    compile_model = device.type == "cuda" if args.compile is None else args.compile
    try:
        module, batch, img_size, cfg = build_module(args.overrides)
        parts = {
            k: (cfg.get(k) or {}).get("_target_", "none").rsplit(".", 1)[-1] for k in ("augment", "target", "masking")
        }
        result = {"experiment": cfg.name, "device": device_name(device), **parts}
        timing = (batch, img_size, args.steps, args.warmup, compile_model, device, args.compile_backend)
        result |= bench(module, *timing, profile=args.profile is not None)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        peak = matmul_peak(device, dtype, 8192 if device.type == "cuda" else 1024)
        result["matmul_peak_tflops"] = round(peak, 2)
        result["utilization"] = round(result["tflops_achieved"] / peak, 3)
        if args.compare == "hf":
            from maelab.bench_hf import bench_hf, speedup

            result["hf"] = bench_hf(module, *timing)
            result |= speedup(result)
    except (UserError, HydraException) as e:  # a bad override or experiment name: Hydra's message, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    profile = result.pop("profile", None)
    if args.target is not None:
        result["target_img_per_s"] = args.target
        result["target_met"] = result["img_per_s"] >= args.target
    if profile is not None and not result.get("target_met", False):
        write_profile(args.profile, result, " ".join(args.overrides), profile)
        result["profile"] = str(args.profile)
    print(json.dumps(result))
    return 0


def write_profile(path: Path, result: dict, overrides: str, table: str) -> None:
    """Appends one workload's profiler table to ``path``, under a heading that names it."""
    target = f", target {result['target_img_per_s']:g}" if "target_img_per_s" in result else ""
    heading = f"== maelab bench {overrides}: {result['img_per_s']:g} img/s{target} on {result['device']}"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(f"{heading}\n{table}\n\n")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
