"""``maelab <command> [args]``: a thin dispatcher. ``train`` hands the rest of the line to Hydra,
whose job is ``maelab.train.run``.

The command word stays in ``sys.argv``: Lightning re-launches DDP workers with ``sys.argv``, and
they arrive here again and run the same command.
"""

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import maelab
from maelab import __version__
from maelab.errors import UserError

if TYPE_CHECKING:
    from omegaconf import DictConfig

log = logging.getLogger(__name__)

COMMANDS = {
    "train": "pretrain, fine-tune or probe: a Hydra app (maelab train --help lists its config groups)",
    "export": "write a checkpoint's encoder as a timm VisionTransformer state dict (maelab export --help)",
    "sweep-report": "tabulate and plot a sweep's results: markdown, CSV and PNG (maelab sweep-report --help)",
    "bench": "time full training steps on this device: img/s, memory, FLOPs, utilisation (maelab bench --help)",
    "visualize": "draw masked | reconstruction | original for a pretraining checkpoint (maelab visualize --help)",
}


def config_dir() -> Path:
    """Wheels carry conf/ inside the package; an editable install reads the checkout's conf/."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parents[1] / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise RuntimeError(f"maelab's configs are missing: no conf/train.yaml in {here} or {here.parents[1]}")


def pin_ddp_relaunch_to_this_job() -> None:
    """Lightning re-launches DDP workers with ``sys.argv`` plus ``hydra.run.dir``. In a multirun
    job those name the whole sweep and the single-run directory, so each worker would run the
    sweep again elsewhere; make them name this job's overrides and directory."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict, read_write

    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return
    sys.argv = [*sys.argv[:2], *hydra_cfg.overrides.task]  # program, "train", this job's overrides
    with read_write(hydra_cfg), open_dict(hydra_cfg):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir


def log_file_per_slurm_task() -> None:
    """Under SLURM every task (one per GPU) runs the job; task r > 0 logs to train_rank<r>.log
    instead of writing over rank 0's train.log."""
    rank = int(os.environ.get("SLURM_PROCID", "0"))
    if rank == 0 or int(os.environ.get("SLURM_NTASKS", "1")) == 1:
        return
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
        path = Path(handler.baseFilename)
        replacement = logging.FileHandler(path.with_name(f"{path.stem}_rank{rank}{path.suffix}"))
        replacement.setFormatter(handler.formatter)
        replacement.setLevel(handler.level)
        root.removeHandler(handler)
        handler.close()
        root.addHandler(replacement)


def task_function(cfg: "DictConfig") -> None:
    """What Hydra runs for each job; a user's mistake ends it with its message alone."""
    from hydra.core.hydra_config import HydraConfig

    maelab.start_job()
    if "experiment" not in HydraConfig.get().runtime.choices:
        log.warning("no +experiment=NAME given: running the root defaults (conf/train.yaml)")
    pin_ddp_relaunch_to_this_job()
    log_file_per_slurm_task()
    from hydra.errors import InstantiationException
    from omegaconf.errors import InterpolationResolutionError

    from maelab.pipeline import run_pipeline
    from maelab.train import run

    try:
        run_pipeline(cfg) if cfg.get("stages") else run(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except InstantiationException as e:  # a constructor refused a value; Hydra wraps its error
        cause = e.__cause__
        while cause is not None and not isinstance(cause, UserError):
            cause = cause.__cause__
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        raise SystemExit(2) from None
    except InterpolationResolutionError as e:  # a maelab resolver refused a value (e.g. ${heads:...})
        prefix = "UserError raised while resolving interpolation: "  # OmegaConf keeps only the message
        if not str(e).startswith(prefix):
            raise
        print(f"error: {e.full_key}: {str(e).splitlines()[0][len(prefix) :]}", file=sys.stderr)
        raise SystemExit(2) from None


def hydra_main(args: list[str]) -> None:
    """Run Hydra on ``args`` (the words after ``maelab train``).

    ``hydra.main`` parses ``sys.argv`` itself, which holds the command word. We parse our own
    argument list and leave ``sys.argv`` whole, because Lightning re-launches DDP workers with
    ``sys.argv`` and they must run ``maelab train ...`` again. ``_run_hydra`` is what
    ``hydra.main`` calls; hydra-core is pinned to 1.3 for it.
    """
    from hydra import version
    from hydra._internal.utils import _run_hydra, get_args_parser

    from maelab.resolvers import register_resolvers

    version.setbase("1.3")
    register_resolvers()
    parser = get_args_parser()
    parser.prog = "maelab train"
    _run_hydra(
        args=parser.parse_args(args),
        args_parser=parser,
        task_function=task_function,
        config_path=str(config_dir()),
        config_name="train",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maelab",
        description="Masked Autoencoder research with PyTorch Lightning and Hydra.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n" + "\n".join(f"  {name:<13} {text}" for name, text in COMMANDS.items()) + "\n\nexamples:\n"
        "  maelab train +experiment=quickstart\n"
        "  maelab train +experiment=mae_vitt_cifar10 task.mask_ratio=0.9\n"
        "  maelab train -m +experiment=mae_vitt_cifar10 task.mask_ratio=0.5,0.75,0.9\n"
        "  maelab train +experiment=finetune_vitt_cifar10 task.pretrained=<pretraining run>/checkpoints/last.ckpt\n"
        "  maelab export outputs/finetune_vitt_cifar10/<run>/checkpoints/last.ckpt vit_t2_cifar10.pth\n"
        "  maelab sweep-report multirun/mae_vitt_cifar10/<date>\n"
        "  maelab visualize outputs/pre/checkpoints/last.ckpt --images cifar10 --mask-ratio 0.75 0.85 0.95",
    )
    parser.add_argument("--version", action="version", version=f"maelab {__version__}")
    parser.add_argument("command", metavar="command", choices=sorted(COMMANDS), help="one of: " + ", ".join(COMMANDS))
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the command's own arguments")
    return parser


def main(argv: list[str] | None = None) -> int:
    from maelab.requeue import ignore_signal_for_parent

    ignore_signal_for_parent()  # a pipeline's stage: first, before a slow import leaves the signal deadly
    argv = sys.argv[1:] if argv is None else argv
    parsed = _parser().parse_args(argv)
    if parsed.command == "train":
        hydra_main(parsed.args)
    elif parsed.command == "export":
        from maelab.export import main as export_main

        return export_main(parsed.args)
    elif parsed.command == "bench":
        from maelab.bench import main as bench_main

        return bench_main(parsed.args)
    elif parsed.command == "visualize":
        from maelab.visualize import main as visualize_main

        return visualize_main(parsed.args)
    elif parsed.command == "sweep-report":
        from maelab.sweep_report import main as report_main

        try:
            return report_main(parsed.args)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
