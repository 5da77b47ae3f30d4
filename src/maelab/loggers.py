"""Loggers with maelab's guarantees on top of Lightning's."""

import csv

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment


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
