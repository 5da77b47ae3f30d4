"""One module per ``maelab <command>``, each with ``main(argv) -> exit status`` (``train`` hands
its arguments to Hydra)."""
