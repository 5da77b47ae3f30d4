"""Where maelab's configs live and how they are composed: the config directory, the resolvers
the YAML uses, one ``compose()`` for everything that needs the config ``maelab train`` would run
(the bench, a pipeline's stage check, the tests), and the checks of user values (``checks.py``)."""

from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from maelab.config.resolvers import register_resolvers

__all__ = ["apply_debug", "compose", "config_dir", "register_resolvers"]


def config_dir() -> Path:
    """Wheels carry conf/ inside the package; an editable install reads the checkout's conf/."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package / "conf", package.parents[1] / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise RuntimeError(f"maelab's configs are missing: no conf/train.yaml in {package} or {package.parents[1]}")


def compose(overrides: list[str], output_dir: str | Path | None = None) -> DictConfig:
    """The config ``maelab train OVERRIDES`` runs. Inside a running ``maelab train`` (a pipeline
    checking its stages) Hydra is already set up on the same directory; elsewhere it is set up
    for the call. ``output_dir`` fixes ``paths.output_dir``, which otherwise names Hydra's run."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_resolvers()
    if GlobalHydra.instance().is_initialized():
        cfg = hydra_compose("train", overrides=overrides)
    else:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = hydra_compose("train", overrides=overrides)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
    return cfg


def apply_debug(cfg: DictConfig) -> DictConfig:
    """The config with ``+debug=NAME``'s values (``conf/debug/``, under ``debug``) merged over it.
    A debug setting must win over any experiment's, and Hydra merges ``+group=option`` in
    command-line order, so it is applied here, after composition."""
    debug = cfg.get("debug")
    if not debug:
        return cfg
    merged = OmegaConf.merge(cfg, debug)
    with open_dict(merged):
        merged.debug = None
    return merged
