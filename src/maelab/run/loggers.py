"""Loggers with maelab's guarantees on top of Lightning's."""

import csv
import uuid
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only


class _ContinuingWriter(ExperimentWriter):
    """Lightning's writer deletes an existing metrics.csv. This one keeps it: rows before the
    first step logged now stay, rows from that step on (the ones a resumed run repeats after its
    last checkpoint) are replaced."""

    def _check_log_dir_exists(self) -> None:
        self._continues = self._fs.isfile(self.metrics_file_path)

    def _drop_repeated_rows(self, first_step: int) -> None:
        with self._fs.open(self.metrics_file_path, "r", newline="") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            rows = [r for r in reader if float(r["step"]) < first_step]
        with self._fs.open(self.metrics_file_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=header)
            writer.writeheader()
            writer.writerows(rows)
        self.metrics_keys = sorted(header)

    def save(self) -> None:
        if self._continues and self.metrics:
            self._drop_repeated_rows(min(m["step"] for m in self.metrics))
            self._continues = False
        super().save()


class ContinuingCSVLogger(CSVLogger):
    """``CSVLogger`` whose metrics.csv survives ``ckpt_path=last``: a resumed run appends to it."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(log_dir=self.log_dir)
        return self._experiment


class WandbRunLogger(WandbLogger):
    """W&B with one run per maelab run.

    - name: the experiment and the job's overrides (``mae_vitt_cifar10[masking=block]``);
    - group: in a multirun, the sweep directory, so a sweep's jobs sit together;
    - id: kept in ``<output_dir>/wandb_run_id``, so a run resumed with ``ckpt_path=last`` or
      requeued by submitit continues its own W&B run instead of starting another;
    - the run is finished when the job ends, failed or not (``finish_loggers``), so the next job
      of a multirun in the same process opens its own.
    """

    def __init__(
        self,
        save_dir: str,
        experiment_name: str,
        project: str = "maelab",
        entity: str | None = None,
        name: str | None = None,
        group: str | None = None,
        tags: list[str] | tuple[str, ...] = (),
        offline: bool = False,
        log_model: bool = False,
        **kwargs,
    ):
        overrides = _naming_overrides()
        name = name or (f"{experiment_name}[{','.join(overrides)}]" if overrides else experiment_name)
        super().__init__(
            name=name,
            save_dir=save_dir,
            project=project,
            entity=entity,
            group=group or _sweep_group(),
            tags=list(tags),
            offline=offline,
            log_model=log_model,
            id=_run_id(Path(save_dir)),
            resume="allow",
            **kwargs,
        )


def _naming_overrides() -> list[str]:
    """The job's command-line overrides; in a multirun only those of the swept keys (what tells the
    sweep's runs apart), read from the sweep's ``multirun.yaml`` and ``hydra.sweeper.params``."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from maelab.config.overrides import parse_overrides

    if not HydraConfig.initialized():
        return []
    hydra = HydraConfig.get()
    job = parse_overrides(hydra.overrides.task)
    if hydra.mode != RunMode.MULTIRUN:
        return [o.input_line for o in job]
    swept = set((hydra.sweeper.get("params") or {}).keys())
    multirun = Path(hydra.sweep.dir) / "multirun.yaml"
    if multirun.is_file():
        launched = OmegaConf.load(multirun).hydra.overrides.task
        swept |= {o.key_or_group for o in parse_overrides(launched) if o.is_sweep_override()}
    return [o.input_line for o in job if o.key_or_group in swept]


def _sweep_group() -> str | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return HydraConfig.get().sweep.dir  # e.g. multirun/mae_vitt_cifar10/2026-11-23_17-00-00


def _run_id(output_dir: Path) -> str | None:
    path = output_dir / "wandb_run_id"
    if path.is_file():
        return path.read_text().strip()
    if rank_zero_only.rank != 0:
        return None  # only rank 0 opens the W&B run
    run_id = uuid.uuid4().hex[:8]  # not from the seeded streams: two runs of one seed differ
    output_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id + "\n")
    return run_id


def finish_loggers(trainer, error: BaseException | None) -> None:
    """Closes each logger's run when a job ends, also when it fails: W&B marks the run failed
    (or finished for a preemption's clean exit) instead of leaving it open for the next job."""
    from maelab.run.preemption import Preemption

    requeued = any(isinstance(c, Preemption) and c.handed_over for c in trainer.callbacks) if trainer else False
    # submitit's handler exits with -1 after requeueing: the run continues in the next job
    failed = error is not None and not requeued and not (isinstance(error, SystemExit) and error.code in (0, None))
    for logger in trainer.loggers if trainer is not None else []:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            import wandb

            wandb.finish(exit_code=1 if failed else 0)
        elif isinstance(logger, TensorBoardLogger):
            logger.finalize("failed" if failed else "success")
