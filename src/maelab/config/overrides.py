"""Command-line overrides, read one way everywhere: Hydra's own parser; and the one-line message
for an override that names a key or a group option that does not exist, with the closest ones."""

from difflib import SequenceMatcher, get_close_matches

MOST_KEYS_SHOWN = 12


def parse_overrides(lines: list[str]) -> list:
    """``key=value``, ``+key=value``, ``~key``, ``group=option``, sweeps: Hydra's ``Override`` objects."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides(list(lines))


def root_key(override) -> str:
    """The top-level config key an override touches: ``task`` for ``task.mask_ratio=0.9``,
    ``hydra`` for ``hydra/launcher=slurm``, ``stages`` for ``~stages.finetune``."""
    return override.key_or_group.split(".", 1)[0].split("/", 1)[0]


def override_error_message(error: BaseException, overrides: list[str]) -> str | None:
    """One line for Hydra's error on a mistyped key (``task.mask_ration=0.5``) or group option
    (``task=linprob``) among ``overrides``, naming the closest that exist; None for any other error."""
    from hydra.errors import ConfigCompositionException, MissingConfigException
    from omegaconf import DictConfig
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    if not isinstance(error, ConfigCompositionException):
        return None
    if isinstance(error, MissingConfigException):
        return None if error.options is None else no_such_option(error, overrides)
    cause = error.__cause__  # "Could not override 'task.mask_ration'" comes from OmegaConf's key error
    if not isinstance(cause, ConfigAttributeError | ConfigKeyError) or not isinstance(cause.parent_node, DictConfig):
        return None
    # an empty parent: a path through an interpolation (task.model.embed_dim, task.model being ${model})
    return no_such_key(cause, overrides) if len(cause.parent_node) > 0 else None


def no_such_key(error, overrides: list[str]) -> str:
    """OmegaConf's ``error`` names the first key of the path that is missing (``tsk`` of
    ``tsk.mask_ratio``) and the node it is missing from; the override is the first whose path
    is that key or goes through it."""
    missing = error.full_key
    touching = [o for o in parse_overrides(overrides) if f"{o.key_or_group}.".startswith(f"{missing}.")]
    override = next((o for o in touching if o.key_or_group == missing), touching[0] if touching else None)
    typed, line = (override.key_or_group, override.input_line) if override else (missing, missing)
    parent = missing.rpartition(".")[0]
    hint = key_hint(error.parent_node, parent, typed.removeprefix(f"{parent}.") if parent else typed)
    return f"{line}: no such key; {hint} (to add a new key: +{line})"


def closest(word: str, candidates: list[str]) -> list[str]:
    """The candidates closest to ``word`` (difflib's ratio of at least 0.6), those tied with the best."""
    matches = get_close_matches(word, candidates, n=5)
    ratios = [SequenceMatcher(None, match, word).ratio() for match in matches]
    return [match for match, ratio in zip(matches, ratios, strict=True) if ratio >= ratios[0] - 1e-9]


def key_hint(node, path: str, missing: str) -> str:
    """``did you mean task.mask_ratio?`` for ``missing`` (``mask_ration``, or a deeper path such as
    ``knn_montor.every_n_epochs``) under the config ``node`` found at ``path`` (``""``: the root):
    the closest keys of as many levels; else the keys ``node`` has."""
    depth = missing.count(".") + 1
    matches = closest(missing, key_paths(node, depth))
    if matches:
        return "did you mean " + " or ".join(f"{path}.{m}" if path else m for m in matches) + "?"
    keys = sorted(str(k) for k in node.keys())
    more = len(keys) - MOST_KEYS_SHOWN
    shown = ", ".join(keys[:MOST_KEYS_SHOWN]) + (f" and {more} more" if more > 0 else "")
    return f"no close match; the keys {f'under {path}' if path else 'at the top level'} are: {shown}"


def key_paths(node, depth: int) -> list[str]:
    """The dotted paths ``depth`` levels down from the config ``node``, the ones an override can
    set: not through an interpolation (``task.model: ${model}`` is a value here, not a mapping)."""
    from omegaconf import DictConfig

    keys = [str(k) for k in node.keys()]
    if depth == 1:
        return keys
    paths = []
    for key in keys:
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not (child._is_interpolation() or child._is_missing() or child._is_none()):
            paths += [f"{key}.{path}" for path in key_paths(child, depth - 1)]
    return paths


def no_such_option(error, overrides: list[str]) -> str:
    """Hydra's ``MissingConfigException`` names the config file it looked for (``task/linprob``)
    and the group's options; the shared bases (``_*.yaml``) are left out of them."""
    group, _, name = error.missing_cfg_file.rpartition("/")
    options = [o for o in error.options if not o.startswith("_")] or list(error.options)
    override = next((o for o in parse_overrides(overrides) if o.key_or_group == group), None)
    added = "" if override is None else "++" if override.is_force_add() else "+" if override.is_add() else ""
    matches = closest(name, options)
    hint = f"; did you mean {' or '.join(matches)}?" if matches else ""
    return f"{added}{group}={name}: no such option{hint} (options: {', '.join(options)})"
