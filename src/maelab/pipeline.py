"""Experiments of several stages, such as pretraining then fine-tuning (``cifar10_fast``).

An experiment with a ``stages`` mapping runs each stage as its own ``maelab train`` process, in
order, in ``<run dir>/<stage name>``: each stage is an ordinary run (its own config, logs,
checkpoints and results.json) that can also be started alone. A stage with ``pretrained: NAME``
fine-tunes from that earlier stage's ``checkpoints/last.ckpt``.

The pipeline's own command-line overrides (``trainer=gpu``, ``data.root=...``, ``seed=1``) go to
every stage, after the stage's own list (``stages.NAME.overrides``, part of the recipe): the
command line has the last word, as anywhere in Hydra. ``ckpt_path=last`` resumes: finished stages
(those with a results.json) are kept, the interrupted one continues from its ``last.ckpt``.

A process per stage keeps the stages apart (Hydra's global state, compiled graphs, DDP process
groups, CUDA memory) at the cost of a few seconds of start-up each, which the wall-clock counts.
"""

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

import maelab
from maelab.errors import UserError

log = logging.getLogger(__name__)

STAGE_KEYS = {"experiment", "overrides", "pretrained"}
# command-line overrides that belong to the pipeline itself, not to its stages
OWN_KEYS = ("+experiment", "experiment", "++experiment", "stages", "+stages", "ckpt_path", "name", "hydra")


def experiments() -> list[str]:
    from maelab.cli import config_dir

    return sorted(p.stem for p in (config_dir() / "experiment").glob("*.yaml"))


def check_stages(stages: DictConfig) -> None:
    """Each stage names an experiment that exists and only earlier stages; one clear error if not."""
    known = experiments()
    seen: list[str] = []
    for name, stage in stages.items():
        key = f"stages.{name}"
        if not isinstance(stage, DictConfig):
            raise UserError(f"{key}: expected a mapping with keys {sorted(STAGE_KEYS)}, got {stage!r}")
        unknown = set(stage) - STAGE_KEYS
        if unknown:
            raise UserError(f"{key}: unknown key(s) {sorted(unknown)}; a stage takes {sorted(STAGE_KEYS)}")
        if stage.get("experiment") not in known:
            raise UserError(f"{key}.experiment={stage.get('experiment')!r}: not an experiment; one of {known}")
        pretrained = stage.get("pretrained")
        if pretrained is not None and pretrained not in seen:
            raise UserError(f"{key}.pretrained={pretrained}: name an earlier stage, one of {seen or 'none'}")
        seen.append(name)


def forwarded_overrides() -> list[str]:
    """The pipeline's command-line overrides that every stage takes."""
    from hydra.core.hydra_config import HydraConfig

    overrides = list(HydraConfig.get().overrides.task)
    return [o for o in overrides if o.split("=", 1)[0].split(".", 1)[0].split("/", 1)[0] not in OWN_KEYS]


def stage_command(name: str, stage: DictConfig, stage_dir: Path, resume: bool, pretrained: Path | None) -> list[str]:
    # the recipe's stage overrides, then the command line's, which has the last word as in Hydra
    command = [sys.executable, "-m", "maelab", "train", f"+experiment={stage.experiment}"]
    command += [*(stage.get("overrides") or []), *forwarded_overrides()]
    if pretrained is not None:
        command.append(f"task.pretrained={pretrained}")
    command += [f"hydra.run.dir={stage_dir}", f"ckpt_path={'last' if resume else 'null'}"]
    return command


def run_child(command: list[str]) -> int:
    """Run a stage, passing on the signals a scheduler or ``kill`` sends (the stage saves its
    last.ckpt at the next step), then acting on them here as this process would have."""
    child = subprocess.Popen(command)
    received: list[int] = []

    def forward(signum, frame):
        received.append(signum)
        child.send_signal(signum)

    watched = [signal.SIGTERM, signal.SIGUSR2]
    previous = {s: signal.signal(s, forward) for s in watched}
    try:
        rc = child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    for signum in received:
        handler = previous[signum]
        if callable(handler):
            handler(signum, None)  # e.g. submitit's requeue
        elif handler == signal.SIG_DFL:
            raise SystemExit(128 + signum)
    return rc


def stage_summary(results: dict) -> dict:
    keep = (
        "output_dir",
        "last_checkpoint",
        "epochs",
        "global_step",
        "elapsed_s",
        "wall_clock_s",
        "last",
        "best",
        "test",
    )
    return {k: results.get(k) for k in keep}


def final_accuracy(results: dict) -> tuple[float | None, str | None]:
    """The last stage's top-1 on the test split, of its final weights: from its test pass, or
    from its last validation when the test split is its validation split."""
    if results.get("test") and "test/acc1" in results["test"]:
        return results["test"]["test/acc1"], "test/acc1 of the final weights (test pass)"
    if results.get("val_split") == "test" and "val/acc1" in results.get("last", {}):
        return results["last"]["val/acc1"], "val/acc1 of the final weights, validated on the test split"
    return None, None


def run_pipeline(cfg: DictConfig) -> dict:
    from maelab.train import write_json

    stages = cfg.stages
    check_stages(stages)
    output_dir = Path(cfg.paths.output_dir).absolute()
    resume = cfg.get("ckpt_path") == "last"
    if cfg.get("ckpt_path") not in (None, "last"):
        raise UserError(f"ckpt_path={cfg.ckpt_path}: a pipeline resumes its own stages; pass null or last")
    if not resume and any((output_dir / name).exists() for name in stages):
        raise UserError(
            f"{output_dir} already holds this pipeline's stages; resume it with ckpt_path=last, "
            "or choose another directory (hydra.run.dir)"
        )

    results: dict[str, dict] = {}
    ran_all = True  # every stage ran whole in this command
    previous: dict[str, Path] = {}
    for name, stage in stages.items():
        stage_dir = output_dir / name
        done = stage_dir / "results.json"
        pretrained = previous[stage.pretrained] if stage.get("pretrained") else None
        if done.is_file():
            log.info("stage %s: finished earlier (%s)", name, done)
            ran_all = False
        else:
            started = (stage_dir / "checkpoints" / "last.ckpt").is_file()
            ran_all &= not started
            command = stage_command(name, stage, stage_dir, started, pretrained)
            log.info("stage %s: %s", name, " ".join(command[1:]))
            rc = run_child(command)
            if rc != 0 or not done.is_file():
                raise UserError(
                    f"stage {name} stopped (exit {rc}); its output is above and in {stage_dir}/train.log. "
                    f"Resume the pipeline with hydra.run.dir={output_dir} ckpt_path=last"
                )
        results[name] = json.loads(done.read_text())
        previous[name] = Path(results[name]["last_checkpoint"])

    last = results[list(stages)[-1]]
    accuracy, measured = final_accuracy(last)
    stage_time = sum(r["elapsed_s"] for r in results.values())
    summary = {
        "name": cfg.name,
        "output_dir": str(output_dir),
        "acc1": accuracy,
        "acc1_measured": measured,
        # this command, start to end, when it ran every stage itself; after a resume, the stages'
        # own elapsed_s summed (each job's time up to its last checkpoint)
        "wall_clock_s": round(time.monotonic() - maelab.PROCESS_START, 2) if ran_all else round(stage_time, 2),
        "wall_clock_measured": "this command" if ran_all else "sum of the stages' elapsed_s (resumed)",
        "stages_elapsed_s": round(stage_time, 2),
        "stages": {name: stage_summary(r) for name, r in results.items()},
        "stage_config": {"stages": OmegaConf.to_container(stages), "overrides": forwarded_overrides()},
    }
    if int(os.environ.get("SLURM_PROCID", "0")) == 0:
        write_json(output_dir / "results.json", summary)
    log.info(
        "%s: %s in %.0f s (%s)",
        cfg.name,
        "no accuracy" if accuracy is None else f"top-1 {100 * accuracy:.2f}%",
        summary["wall_clock_s"],
        ", ".join(f"{n} {r['elapsed_s']:.0f} s" for n, r in results.items()),
    )
    return summary
