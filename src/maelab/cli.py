"""``maelab <command> [args]``: a thin dispatcher to ``maelab.commands.<command>.main(args)``.
A user's mistake (``UserError``) ends any command with its message alone and exit status 2.

The command word stays in ``sys.argv``: Lightning re-launches DDP workers with ``sys.argv``, and
they arrive here again and run the same command.
"""

import argparse
import importlib
import sys

from maelab import __version__
from maelab.errors import UserError, report

COMMANDS = {  # command -> (module under maelab.commands, what it does)
    "train": ("train", "pretrain, fine-tune or probe: a Hydra app (its --help lists the config groups)"),
    "export": ("export", "a checkpoint for timm (state dict + create_model arguments) or Hugging Face (--format hf)"),
    "sweep-report": ("sweep_report", "tabulate and plot a sweep's results: markdown, CSV and PNG"),
    "bench": ("bench", "time full training steps on this device: img/s, memory, FLOPs, utilisation"),
    "visualize": ("visualize", "draw masked | reconstruction | original, or --attention: cls attention per head"),
    "embed": ("embed", "features of every image from a checkpoint's encoder (cls or mean), with names and labels"),
    "prepare-data": ("prepare_data", "pack an image folder into LitData shards for data=shards: streamed on clusters"),
    "bench-data": ("bench_data", "input pipeline img/s: each data.decode beside the official MAE loader"),
}

EXAMPLES = """
examples:
  maelab train +experiment=quickstart
  maelab train +experiment=mae_vitt_cifar10 task.mask_ratio=0.9
  maelab train -m +experiment=mae_vitt_cifar10 task.mask_ratio=0.5,0.75,0.9
  maelab train +experiment=finetune_vitt_cifar10 task.pretrained=<pretraining run>/checkpoints/last.ckpt
  maelab export outputs/finetune_vitt_cifar10/<run>/checkpoints/last.ckpt vit_t2_cifar10.pth
  maelab sweep-report multirun/mae_vitt_cifar10/<date>
  maelab visualize outputs/pre/checkpoints/last.ckpt --images cifar10 --mask-ratio 0.75 0.85 0.95
  maelab embed outputs/pre/checkpoints/last.ckpt --images cifar10 --out cifar10_test.pt --knn"""


def _parser() -> argparse.ArgumentParser:
    listing = "\n".join(f"  {name:<13} {text}" for name, (_, text) in COMMANDS.items())
    listing += "\n  (maelab <command> --help explains each)"
    parser = argparse.ArgumentParser(
        prog="maelab",
        description="Masked Autoencoder research with PyTorch Lightning and Hydra.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n" + listing + "\n" + EXAMPLES,
    )
    parser.add_argument("--version", action="version", version=f"maelab {__version__}")
    parser.add_argument("command", metavar="command", choices=sorted(COMMANDS), help="one of: " + ", ".join(COMMANDS))
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the command's own arguments")
    return parser


def main(argv: list[str] | None = None) -> int:
    from maelab.run.slurm import ignore_signal_for_parent

    ignore_signal_for_parent()  # a pipeline's stage: first, before a slow import leaves the signal deadly
    parsed = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    command = importlib.import_module(f"maelab.commands.{COMMANDS[parsed.command][0]}")
    try:
        return command.main(parsed.args)
    except UserError as e:
        return report(e)


if __name__ == "__main__":
    sys.exit(main())
