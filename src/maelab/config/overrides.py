"""Command-line overrides, read one way everywhere: Hydra's own parser."""


def parse_overrides(lines: list[str]) -> list:
    """``key=value``, ``+key=value``, ``~key``, ``group=option``, sweeps: Hydra's ``Override`` objects."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides(list(lines))


def root_key(override) -> str:
    """The top-level config key an override touches: ``task`` for ``task.mask_ratio=0.9``,
    ``hydra`` for ``hydra/launcher=slurm``, ``stages`` for ``~stages.finetune``."""
    return override.key_or_group.split(".", 1)[0].split("/", 1)[0]
