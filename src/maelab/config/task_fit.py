"""Whether a run's task fits the rest of its config (``checks.validate`` asks, first of all where
the task was switched away from the experiment's).

An experiment is written for one task: its ``task`` settings are arguments of that task's class,
and its callbacks watch what that task logs. ``task=linprobe`` on a pretraining experiment keeps
the experiment's decoder settings and reconstruction callbacks, which a classifier cannot take,
and instantiating it would end in a TypeError. Where the task was switched away from the
experiment's own, the run stops with one line naming the experiments written for the task asked
for, found by composing conf/experiment/ (a few seconds, on this error path only). Otherwise
each setting that does not fit is one problem in the usual list.

The task option a composed ``task`` came from (``pretrain``, ``finetune``, ``linprobe``,
``scratch``) is not recorded in it: of the options of its class, it is the one whose own settings
it differs from least (an experiment changes a few; the options differ in many).
"""

import inspect
from functools import cache

from omegaconf import DictConfig, OmegaConf

from maelab.errors import ConfigError

# what a missing value of a suggested experiment stands for, when this run has none to pass on
PLACEHOLDERS = {"pretrained": "<run>/checkpoints/last.ckpt"}


def task_fit_problems(cfg: DictConfig) -> list[str]:
    """Raise ConfigError if the task was switched away from the experiment's own and does not fit;
    else each task setting or callback that does not fit the task, as a problem."""
    from hydra.utils import get_class

    target = OmegaConf.select(cfg, "task._target_")
    if not isinstance(target, str):
        return []
    try:
        task_class = get_class(target)
    except (ImportError, ValueError) as e:  # Hydra's: no such module, or not a class
        return [f"task._target_={target}: expected an importable class ({str(e).strip().splitlines()[-1]})"]
    keys, callbacks = foreign_keys(cfg.task, task_class), misfit_callbacks(cfg, task_class)
    if not keys and not callbacks:
        return []
    own = experiment(cfg.get("name"))
    if own is not None and own.task.get("_target_") != target:
        raise ConfigError(switch_message(cfg, own, keys, callbacks))
    return [f"task.{key}: not a setting of {task_class.__name__}; drop it with ~task.{key}" for key in keys] + [
        f"callbacks.{name}: {role}, {conflict}; {fix}" for name, role, conflict, fix in callbacks
    ]


def foreign_keys(task: DictConfig, task_class: type) -> list[str]:
    """The keys of ``task`` its class's constructor does not take (Hydra's ``_target_`` & co aside)."""
    parameters = inspect.signature(task_class).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return []
    return [key for key in task if not key.startswith("_") and key not in parameters]


def misfit_callbacks(cfg: DictConfig, task_class: type) -> list[tuple[str, str, str, str]]:
    """(name, what it does, why that does not fit, the fix) of each callback written for another
    task: those that watch MAE pretraining under a classifier, and a best-epoch checkpoint by a
    metric other than the one the task's best epoch is chosen by."""
    from maelab.modules.pretrain import PretrainModule

    def present(name: str) -> bool:
        return OmegaConf.select(cfg, f"callbacks.{name}") is not None

    found = []
    for name, role in (("reconstructions", "draws MAE reconstructions"), ("knn_monitor", "monitors MAE pretraining")):
        if present(name) and not issubclass(task_class, PretrainModule):
            fix = f"choose callbacks=classifier (the classifier experiments do) or drop it with ~callbacks.{name}"
            found.append((name, role, "and this task classifies", fix))
    monitored = OmegaConf.select(cfg, "callbacks.best_checkpoint.monitor")
    chosen_by = getattr(task_class, "monitor", ("val/loss", "min"))[0]  # results.json's best epoch (run/fit.py)
    if present("best_checkpoint") and monitored != chosen_by:
        conflict = f"and {task_class.__name__} chooses its best epoch by {chosen_by}"
        fix = "drop it with ~callbacks.best_checkpoint (callbacks=default has none)"
        found.append(("best_checkpoint", f"keeps the epoch of best {monitored}", conflict, fix))
    return found


def switch_message(cfg: DictConfig, own: DictConfig, keys: list[str], callbacks: list[tuple]) -> str:
    """One line: what of the experiment does not fit the task asked for, and what to run instead."""
    asked, own_option = task_option(raw(cfg.task)), task_option(raw(own.task))
    from_recipe = [f"task.{key}" for key in keys if key in own.task]
    typed = [f"task.{key}" for key in keys if key not in own.task]
    reasons = []
    if from_recipe:
        are = "are settings" if len(from_recipe) > 1 else "is a setting"
        reasons.append(f"{', '.join(from_recipe)} {are} of task={own_option}, not of task={asked}")
    if typed:
        reasons.append(f"{', '.join(typed)} (from the command line) cannot go with task={asked}")
    reasons += [f"callbacks.{name} {role}" for name, role, _, _ in callbacks]
    return (
        f"task={asked} does not fit +experiment={cfg.name}, a task={own_option} recipe ({'; '.join(reasons)}); "
        f"{suggestion(cfg, asked)}"
    )


def suggestion(cfg: DictConfig, asked: str) -> str:
    """``use +experiment=NAME ...``: of the experiments for a task of the class asked for, those on
    this run's model and data first, then this run's data, then the rest; within each, those
    closest to the option asked for first (the ones written for it)."""
    target, model, data = cfg.task._target_, raw(cfg.model), OmegaConf.select(cfg, "data._target_")
    wanted = task_options().get(asked, {})

    def rank(name: str) -> tuple:
        recipe = recipes()[name]
        same_data = recipe.data.get("_target_") == data
        return (not (same_data and raw(recipe.model) == model), not same_data, differences(raw(recipe.task), wanted))

    fitting = sorted((n for n, r in recipes().items() if r.task.get("_target_") == target), key=lambda n: (rank(n), n))
    if not fitting:
        return f"no experiment in conf/experiment/ runs task={asked}; start from the root config (no +experiment)"
    best = fitting[0]
    alike = [n for n in fitting[1:] if rank(n)[:2] == rank(best)[:2] and task_option(raw(recipes()[n].task)) == asked]
    return f"use {command(cfg, best, asked)}" + (f" (or +experiment={', '.join(alike[:3])})" if alike else "")


def command(cfg: DictConfig, name: str, asked: str) -> str:
    """The overrides that run experiment ``name`` with the task asked for, required values filled
    in from this run where it has them."""
    from maelab.config import compose

    words = [f"+experiment={name}"]
    if task_option(raw(recipes()[name].task)) != asked:
        words.append(f"task={asked}")
    task = compose(words).task
    for key in (k for k in task if OmegaConf.is_missing(task, k)):
        value = cfg.task.get(key) if key in cfg.task and not OmegaConf.is_missing(cfg.task, key) else None
        words.append(f"task.{key}={value if value is not None else PLACEHOLDERS.get(key, '<value>')}")
    return " ".join(words)


def task_switched(cfg: DictConfig) -> bool:
    """Whether the task's class is another than the one of the experiment the run is named after
    (``name``): one composition, without importing the task."""
    own = experiment(cfg.get("name"))
    return own is not None and own.task.get("_target_") != OmegaConf.select(cfg, "task._target_")


@cache
def experiment(name: str | None) -> DictConfig | None:
    """Experiment ``name`` of conf/experiment/, composed alone; None for a name that is none, a
    ``_*.yaml`` base, or a pipeline (``stages``), whose runs are its stages' experiments."""
    from maelab.config import compose, config_dir

    if (
        not isinstance(name, str)
        or name.startswith("_")
        or not (config_dir() / "experiment" / f"{name}.yaml").is_file()
    ):
        return None
    cfg = compose([f"+experiment={name}"])
    return None if cfg.get("stages") else cfg


@cache
def recipes() -> dict[str, DictConfig]:
    """Every experiment that ``experiment()`` composes (a few seconds: on the error path only)."""
    from maelab.config import config_dir

    names = sorted(p.stem for p in (config_dir() / "experiment").glob("*.yaml"))
    return {name: cfg for name in names if (cfg := experiment(name)) is not None}


@cache
def task_options() -> dict[str, dict]:
    """conf/task/'s options, each as it composes alone (interpolations unresolved)."""
    from maelab.config import compose, config_dir

    return {p.stem: raw(compose([f"task={p.stem}"]).task) for p in sorted((config_dir() / "task").glob("*.yaml"))}


def task_option(task: dict) -> str:
    """The option of conf/task/ a composed task came from (see the module's docstring), or its
    class's name where no option has that class."""
    options = {name: option for name, option in task_options().items() if option["_target_"] == task["_target_"]}
    if not options:
        return task["_target_"].rsplit(".", 1)[-1]
    return min(options, key=lambda name: (differences(task, options[name]), name))


def differences(task: dict, option: dict) -> int:
    """How many of the option's settings ``task`` holds other values for."""
    return sum(task.get(key, object()) != value for key, value in option.items())


def raw(node) -> dict:
    """A config node as plain values, interpolations as written, a required value as ``???``."""
    return OmegaConf.to_container(node, resolve=False)
