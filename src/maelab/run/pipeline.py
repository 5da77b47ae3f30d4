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
import re
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
# command-line overrides that belong to the pipeline itself, not to its stages (+sweep: the
# pipeline is what a sweep runs, each stage once per point)
OWN_KEYS = {"experiment", "stages", "ckpt_path", "name", "hydra", "paths", "sweep"}


def experiments() -> list[str]:
    """The experiments a stage may name (``_*.yaml`` are the bases they share)."""
    from maelab.config import config_dir

    return sorted(p.stem for p in (config_dir() / "experiment").glob("*.yaml") if not p.stem.startswith("_"))


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


def forwarded(overrides: list[str]) -> list[str]:
    """Of the pipeline's command-line overrides, those that every stage takes."""
    from maelab.config.overrides import parse_overrides, root_key

    return [o.input_line for o in parse_overrides(overrides) if root_key(o) not in OWN_KEYS]


def forwarded_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return forwarded(list(HydraConfig.get().overrides.task))


def quoted(path: Path) -> str:
    """A path as a quoted Hydra override value: commas, spaces and brackets stay literal. Hydra
    reads a backslash as an escape only in a run before a quote (the closing one included): such
    runs are doubled and the quote escaped; any other backslash is literal."""
    return '"' + re.sub(r'(\\*)("|$)', lambda m: 2 * m[1] + ("\\" + m[2] if m[2] else ""), str(path)) + '"'


def stage_overrides(stage: DictConfig, forwarded: list[str], pretrained: Path | None) -> list[str]:
    # the recipe's stage overrides, then the command line's, which has the last word as in Hydra
    overrides = [f"+experiment={stage.experiment}", *(stage.get("overrides") or []), *forwarded]
    if pretrained is not None:
        overrides.append(f"task.pretrained={quoted(pretrained)}")
    return overrides


def check_composes(stages: DictConfig, forwarded: list[str]) -> None:
    """Compose every stage's config before any runs, so that an override one stage cannot take
    fails now, not after the stages before it have trained."""
    from maelab.config import compose
    from maelab.config.overrides import override_error_message

    def error(overrides: list[str], hint: bool = False) -> str | None:
        try:
            compose(overrides)
        except Exception as e:  # noqa: BLE001  (Hydra's override and config errors)
            return (hint and override_error_message(e, overrides)) or str(e).splitlines()[0]
        return None

    for name, stage in stages.items():
        pretrained = Path("pretrained.ckpt") if stage.get("pretrained") else None
        message = error(stage_overrides(stage, forwarded, pretrained))
        if message is None:
            continue
        what = f"stage {name} (+experiment={stage.experiment})"
        # its own list, before the command line's (a key the command line gave the pipeline exists
        # in the pipeline's config: "did you mean" is for the list's typos, not for those keys)
        own = error(stage_overrides(stage, [], pretrained), hint=True)
        if own is not None:
            raise UserError(
                f"{what}: its list stages.{name}.overrides={list(stage.get('overrides') or [])} fails: {own}"
            )
        raise UserError(
            f"{what} cannot take the command line's overrides: {message} Command-line overrides reach "
            f"every stage; a key only one stage has goes in its list, 'stages.{name}.overrides=[...]'"
        )


def child_environment() -> dict[str, str]:
    """The stage runs as a plain process: the pipeline, not the stage, deals with submitit (a
    stage that believed itself a submitit job would hand a preemption to a handler it lacks).
    SLURM sends submitit's signal to the stage too: the stage ignores it, and the pipeline passes
    it on as the SIGTERM on which a plain run saves and stops."""
    from maelab.run.slurm import IGNORE_SIGNAL_VARIABLE, submitit_signal, under_submitit

    env = {k: v for k, v in os.environ.items() if not k.startswith("SUBMITIT_")}
    if under_submitit():
        env[IGNORE_SIGNAL_VARIABLE] = submitit_signal().name.removeprefix("SIG")
    return env


def run_child(command: list[str]) -> int:
    """Run a stage. A SIGTERM or submitit's signal (``kill``, ``timeout``, SLURM) is passed on as
    SIGTERM, on which the stage saves last.ckpt at its next step and stops. Then, under submitit,
    this process hands over to submitit's handler, which requeues the pipeline (its requeue
    resumes, see ``resuming``); otherwise it stops with 128 + the signal, as the stage did."""
    from maelab.run.slurm import hand_over_to_submitit, submitit_signal, under_submitit

    received: list[int] = []
    child: subprocess.Popen | None = None

    def forward(signum, frame):
        received.append(signum)
        if child is not None:
            child.send_signal(signal.SIGTERM)

    # listening before the stage starts: a signal in between still reaches it
    previous = {s: signal.signal(s, forward) for s in {signal.SIGTERM, submitit_signal()}}
    try:
        child = subprocess.Popen(command, env=child_environment())
        if received:
            child.send_signal(signal.SIGTERM)
        rc = child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if not received:
        return rc
    if under_submitit():
        hand_over_to_submitit(previous[submitit_signal()])  # submitit's: requeue, then exit
    raise SystemExit(128 + received[0])


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


def pipeline_owner_file(output_dir: Path) -> Path:
    return output_dir / "submitit_job"


def resuming(cfg: DictConfig, output_dir: Path, stages: DictConfig, rank: int = 0) -> bool:
    """ckpt_path=last resumes; so does a requeue of the submitit job that started this pipeline
    (its command is the first one, without ckpt_path=last). Otherwise a directory that already
    holds stages is refused rather than trained over."""
    from maelab.run.slurm import submitit_job_id

    if cfg.get("ckpt_path") not in (None, "last"):
        raise UserError(f"ckpt_path={cfg.ckpt_path}: a pipeline resumes its own stages; pass null or last")
    job, owner = submitit_job_id(), pipeline_owner_file(output_dir)
    if job is not None and owner.is_file() and owner.read_text().strip() == job:
        log.info("requeued job %s: resuming the pipeline in %s", job, output_dir)
        return True
    started = any((output_dir / name).exists() for name in stages)
    if cfg.get("ckpt_path") == "last":
        if not started:  # as for a single run: a mistyped directory is not a fresh start
            raise UserError(
                f"ckpt_path=last: {output_dir} holds none of the stages {list(stages)}. To resume a "
                "pipeline, name its directory: hydra.run.dir=<the pipeline's output directory> ckpt_path=last"
            )
        return True
    if started and rank == 0:  # under srun a later rank may find what rank 0's stage just made: rank 0 decides
        raise UserError(
            f"{output_dir} already holds this pipeline's stages; resume it with ckpt_path=last, "
            "or choose another directory (hydra.run.dir)"
        )
    if job is not None:
        output_dir.mkdir(parents=True, exist_ok=True)
        owner.write_text(job + "\n")
    return False


def wait_for(path: Path, seconds: float) -> bool:
    """Under srun every task runs the pipeline and rank 0's stage writes its results: the other
    tasks wait for the file (a shared filesystem) instead of racing it."""
    deadline = time.monotonic() + seconds
    while not path.is_file() and time.monotonic() < deadline:
        time.sleep(1)
    return path.is_file()


def run_pipeline(cfg: DictConfig) -> dict:
    """Run the stages in order (each a ``maelab train`` process), then write the pipeline's
    results.json: the last stage's test top-1 and the wall-clock."""
    from maelab.atomic import write_text_atomically
    from maelab.run.fit import json_text

    stages = cfg.stages
    check_stages(stages)
    output_dir = Path(cfg.paths.output_dir).absolute()
    forwarded = forwarded_overrides()
    start = maelab.job_start()
    check_composes(stages, forwarded)
    rank = int(os.environ.get("SLURM_PROCID", "0"))
    resume = resuming(cfg, output_dir, stages, rank)
    results, ran_all = run_stages(stages, forwarded, output_dir, resume, rank)
    summary = pipeline_results(cfg, output_dir, stages, forwarded, results, start if ran_all else None)
    if rank == 0:
        write_text_atomically(output_dir / "results.json", json_text(summary))
    accuracy = summary["acc1"]
    log.info(
        "%s: %s in %.0f s (%s)",
        cfg.name,
        "no accuracy" if accuracy is None else f"top-1 {100 * accuracy:.2f}%",
        summary["wall_clock_s"],
        ", ".join(f"{n} {r['elapsed_s']:.0f} s" for n, r in results.items()),
    )
    return summary


def run_stages(
    stages: DictConfig, forwarded: list[str], output_dir: Path, resume: bool, rank: int
) -> tuple[dict[str, dict], bool]:
    """Each stage's results.json, running those not finished; and whether this command ran every
    stage whole (its wall-clock is then the pipeline's)."""
    results: dict[str, dict] = {}
    ran_all = True
    previous: dict[str, Path] = {}
    for name, stage in stages.items():
        stage_dir = output_dir / name
        done = stage_dir / "results.json"
        if done.is_file() and resume:
            log.info("stage %s: finished earlier (%s)", name, done)
            ran_all = False
        else:
            started = (stage_dir / "checkpoints" / "last.ckpt").is_file()
            ran_all &= not started
            pretrained = previous[stage.pretrained] if stage.get("pretrained") else None
            run_stage(name, stage_overrides(stage, forwarded, pretrained), stage_dir, started, output_dir, rank)
        results[name] = json.loads(done.read_text())
        previous[name] = Path(results[name]["last_checkpoint"])
    return results, ran_all


def run_stage(name: str, overrides: list[str], stage_dir: Path, started: bool, output_dir: Path, rank: int) -> None:
    """One stage as its own process, continuing its last.ckpt if it has one."""
    command = [sys.executable, "-m", "maelab", "train", *overrides]
    command += [f"hydra.run.dir={quoted(stage_dir)}", f"ckpt_path={'last' if started else 'null'}"]
    log.info("stage %s: %s", name, " ".join(command[1:]))
    rc = run_child(command)
    done = stage_dir / "results.json"
    if rc != 0 or not (done.is_file() or (rank > 0 and wait_for(done, 600))):
        where = f"; its log: {stage_dir / 'train.log'}" if (stage_dir / "train.log").is_file() else ""
        raise UserError(
            f"stage {name} stopped (exit {rc}) without results{where}. Once the cause is fixed, "
            f"resume the pipeline with hydra.run.dir={output_dir} ckpt_path=last"
        )


def pipeline_results(
    cfg: DictConfig, output_dir: Path, stages: DictConfig, forwarded: list[str], results: dict, start: float | None
) -> dict:
    """The pipeline's results.json. ``start``: this command's start when it ran every stage whole;
    after a resume the wall-clock is the stages' own elapsed_s summed (each job's time up to its
    last checkpoint)."""
    accuracy, measured = final_accuracy(results[list(stages)[-1]])
    stage_time = sum(r["elapsed_s"] for r in results.values())
    return {
        "name": cfg.name,
        "output_dir": str(output_dir),
        "acc1": accuracy,
        "acc1_measured": measured,
        "wall_clock_s": round(time.monotonic() - start, 2) if start is not None else round(stage_time, 2),
        "wall_clock_measured": "this command" if start is not None else "sum of the stages' elapsed_s (resumed)",
        "stages_elapsed_s": round(stage_time, 2),
        "stages": {name: stage_summary(r) for name, r in results.items()},
        "stage_config": {"stages": OmegaConf.to_container(stages), "overrides": forwarded},
    }
