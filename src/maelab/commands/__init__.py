"""One module per ``maelab <command>``, each with ``main(argv) -> exit status`` (``train`` hands
its arguments to Hydra)."""

TRUST_FLAG = "--trust-checkpoint-code"


def add_trust_flag(parser) -> None:
    """The flag that loads a weights file with full pickle, on purpose (``weights/loading.py``)."""
    parser.add_argument(
        TRUST_FLAG,
        action="store_true",
        help="load CKPT with full pickle, which can run code it holds: only for a file from a source you trust",
    )
