"""Write every logged metric to a tidy CSV (one row per epoch x metric) beside the run's logs."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning as L

from neurovision.data.atomic import atomic_path


class MetricsTable(L.Callback):
    """Append ``epoch, step, stage, metric, value`` rows to ``<log_dir>/metrics_table.csv``.

    The file is rewritten atomically (temp + rename) after each validation and test epoch, so a killed run
    never leaves a half-written table.

    Args:
        filename: file name inside the trainer's log directory (or ``default_root_dir``).
    """

    def __init__(self, filename: str = "metrics_table.csv") -> None:
        self.filename = filename
        self.rows: list[dict[str, Any]] = []

    def _path(self, trainer: L.Trainer) -> Path:
        root = trainer.log_dir or trainer.default_root_dir
        return Path(root) / self.filename

    def _collect(self, trainer: L.Trainer, stage: str) -> None:
        if trainer.sanity_checking:
            return
        path = self._path(trainer)  # on every rank: trainer.log_dir is a collective under DDP
        if not trainer.is_global_zero:
            return
        for name, value in sorted(trainer.callback_metrics.items()):
            if name.startswith(("val/", "test/")) and name.split("/")[0] != stage:
                continue
            self.rows.append({"epoch": trainer.current_epoch, "step": trainer.global_step, "stage": stage,
                              "metric": name, "value": float(value)})
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["epoch", "step", "stage", "metric", "value"])
            w.writeheader()
            w.writerows(self.rows)

    # *_end (not *_epoch_end): runs after the module's epoch-end hook has logged its epoch metrics
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._collect(trainer, "val")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._collect(trainer, "test")

    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = list(state_dict.get("rows", []))
