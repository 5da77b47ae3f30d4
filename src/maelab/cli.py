"""``maelab <command> [args]``: a thin dispatcher. ``train`` hands the rest of the line to Hydra.

The command word stays in ``sys.argv``: Lightning re-launches DDP workers with ``sys.argv``, and
they arrive here again and run the same command.
"""

import argparse
import sys

from maelab import __version__

COMMANDS = {
    "train": "pretrain or fine-tune: a Hydra app (maelab train --help lists its config groups)",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maelab",
        description="Masked Autoencoder research with PyTorch Lightning and Hydra.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n" + "\n".join(f"  {name:<8} {text}" for name, text in COMMANDS.items()) + "\n\nexamples:\n"
        "  maelab train +experiment=quickstart\n"
        "  maelab train +experiment=mae_vitt_cifar10 task.mask_ratio=0.9\n"
        "  maelab train -m +experiment=mae_vitt_cifar10 task.mask_ratio=0.5,0.75,0.9",
    )
    parser.add_argument("--version", action="version", version=f"maelab {__version__}")
    parser.add_argument("command", metavar="command", choices=sorted(COMMANDS), help="one of: " + ", ".join(COMMANDS))
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the command's own arguments")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parsed = _parser().parse_args(argv)
    if parsed.command == "train":
        from maelab.train import hydra_main

        hydra_main(parsed.args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
