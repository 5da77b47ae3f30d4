"""``maelab bench``: the training step's speed on this device, as one JSON object.

A full pretraining step on synthetic uint8 images of the experiment's shape: augmentation and
masking on the device, forward, backward, fused AdamW step, in the run's precision (bf16 autocast
on a GPU, no grad scaler). Steady state: the first ``--warmup`` steps (compilation, allocator,
cuDNN autotuning) are not timed; the device is synchronised only around the timed window.

FLOPs are counted by Lightning's ``measure_flops`` (torch's FlopCounterMode) on a copy of the
model on the meta device: the forward and backward the step really runs, the encoder on the
visible patches only.
"""

import argparse
import json
from pathlib import Path

import torch

from maelab.commands.timing import matmul_peak, profile_summary, time_steps
from maelab.errors import UserError

PRETRAINING_EXPERIMENTS = "+experiment=mae_vitb|mae_vitl|mae_vith|mae_vitt_cifar10|quickstart"


class TargetShape(torch.nn.Module):
    """Stands in for a reconstruction target where only its shape matters."""

    def __init__(self, num_patches: int, out_dim: int):
        super().__init__()
        self.num_patches, self.out_dim = num_patches, out_dim

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return imgs.new_zeros(len(imgs), self.num_patches, self.out_dim)  # (N, L, out_dim)


def training_flops(module, img_size: int) -> dict[str, float]:
    """FLOPs per image of the forward, and of forward + backward, of ``module``'s MAE at its mask
    ratio, counted on a meta-device twin (no memory, no time)."""
    from lightning.fabric.utilities.throughput import measure_flops

    with torch.device("meta"):
        twin = type(module)(**module.hparams).model
        x = torch.empty(2, 3, img_size, img_size)
    # the target's own arithmetic (a few elementwise ops per pixel) is left out: PCA must be
    # fitted first and HOG's kernels do not run on the meta device
    twin.target = TargetShape(twin.patch_embed.num_patches, twin.target.out_dim)

    def forward():
        return twin(x, module.mask_ratio)[0]

    return {
        "forward": measure_flops(twin, forward) / 2,
        "train": measure_flops(twin, forward, lambda loss: loss) / 2,
    }


def build_module(overrides: list[str]):
    """The experiment's PretrainModule (as ``maelab train`` builds it), its per-device batch and
    its image size, without a datamodule: the bench feeds synthetic images."""
    from hydra.utils import get_class

    from maelab.config import compose
    from maelab.modules.pretrain import PretrainModule
    from maelab.run.build import build_task

    cfg = compose(overrides)
    if not issubclass(get_class(cfg.task._target_), PretrainModule):
        raise UserError(
            f"maelab bench times pretraining steps, and task {cfg.task._target_} is not pretraining; "
            f"choose a pretraining experiment ({PRETRAINING_EXPERIMENTS})"
        )
    return build_task(cfg), int(cfg.data.batch_size), int(cfg.data.img_size), cfg


def training_step(module, batch: int, img_size: int, forward, device: torch.device):
    """One full pretraining step on a fixed synthetic batch: augmentation and masking on the device,
    bf16 autocast on a GPU, backward, AdamW (one fused kernel on a GPU)."""
    from maelab.modules.optim import param_groups_weight_decay

    optimizer = torch.optim.AdamW(
        param_groups_weight_decay(module.model, 0.05), lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda"
    )
    images = torch.randint(0, 256, (batch, 3, img_size, img_size), dtype=torch.uint8, device=device)
    bf16 = device.type == "cuda"

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, _, _ = forward(module.preprocess(images, train=True), module.mask_ratio)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def bench(module, batch: int, img_size: int, steps: int, warmup: int, compile_model: bool, device, **options) -> dict:
    """Times maelab's pretraining step. ``options``: ``backend`` (torch.compile's, default
    inductor); ``profile=True`` adds the profiler table."""
    from maelab.modules.compiling import compile_or_explain

    backend = options.get("backend", "inductor")
    module = module.to(device).train()
    model = module.model
    if hasattr(model.target, "fit") and not model.target.ready:  # PCA: components from random patches
        model.target.fit(torch.randn(64, 3, img_size, img_size, device=device))
    forward, why = compile_or_explain(model, backend) if compile_model else (model, None)
    step = training_step(module, batch, img_size, forward, device)
    if forward is not model:
        try:
            step()  # compiles here; a failure falls back to eager
        except Exception as e:  # noqa: BLE001
            forward, why = model, f"{type(e).__name__}: {str(e).splitlines()[0]}"
            step = training_step(module, batch, img_size, forward, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = time_steps(step, device, steps, warmup)
    result = rates(batch, img_size, seconds, training_flops(module, img_size), device)
    result["compiled"] = forward is not model
    result |= {"compile_backend": backend} if forward is not model else {"compile_fallback": why} if why else {}
    result |= memory(device)
    if options.get("profile"):
        result["profile"] = profile_summary(step, device)
    return result


def rates(batch: int, img_size: int, seconds: float, flops: dict, device: torch.device) -> dict:
    return {
        "img_per_s": round(batch / seconds, 1),
        "step_ms": round(seconds * 1e3, 2),
        "batch": batch,
        "img_size": img_size,
        "precision": "bf16-mixed" if device.type == "cuda" else "32-true",
        "gflops_per_img_train": round(flops["train"] / 1e9, 3),
        "tflops_achieved": round(flops["train"] * batch / seconds / 1e12, 3),
    }


def memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"peak_memory_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)}
    import resource

    return {"peak_host_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maelab bench",
        description="Time full pretraining steps on synthetic images of an experiment's shape on this device and "
        "print one JSON object: img/s, step time, peak memory, FLOPs per image, TFLOP/s and utilisation "
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
    return parser


def main(argv: list[str]) -> int:
    from hydra.errors import HydraException

    from maelab.config.overrides import override_error_message

    args = parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    compile_model = device.type == "cuda" if args.compile is None else args.compile
    try:
        module, batch, img_size, cfg = build_module(args.overrides)
    except HydraException as e:  # a bad override or experiment name: one line, the closest keys named
        raise UserError(override_error_message(e, args.overrides) or str(e)) from None
    parts = {k: (cfg.get(k) or {}).get("_target_", "none").rsplit(".", 1)[-1] for k in ("augment", "target", "masking")}
    result = {"experiment": cfg.name, "device": device_name(device), **parts}
    timing = (batch, img_size, args.steps, args.warmup, compile_model, device)
    result |= bench(module, *timing, backend=args.compile_backend, profile=args.profile is not None)
    on_gpu = device.type == "cuda"
    peak = matmul_peak(device, torch.bfloat16 if on_gpu else torch.float32, 8192 if on_gpu else 1024)
    result |= {"matmul_peak_tflops": round(peak, 2), "utilization": round(result["tflops_achieved"] / peak, 3)}
    if args.compare == "hf":
        from maelab.commands.bench_hf import bench_hf, speedup

        result["hf"] = bench_hf(module, *timing, backend=args.compile_backend)
        result |= speedup(result)
    profile = result.pop("profile", None)
    if args.target is not None:
        result |= {"target_img_per_s": args.target, "target_met": result["img_per_s"] >= args.target}
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
