"""Write ``neurovision predict`` outputs (lists of row dicts, e.g. stage-2 generations) as one JSONL file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter

from neurovision.data.atomic import write_jsonl


class JSONLPredictionWriter(BasePredictionWriter):
    """At the end of ``predict``, write every row returned by ``predict_step`` (a list of dicts per batch) to
    ``path`` (default ``<log_dir>/predictions.jsonl``), atomically; rows of all DDP ranks are gathered first.

    Args:
        path: output file; relative paths are taken from the working directory.
    """

    def __init__(self, path: str | None = None) -> None:
        super().__init__(write_interval="epoch")
        self.path = path
        self.written: Path | None = None

    def _target(self, trainer: L.Trainer) -> Path:
        if self.path is not None:
            return Path(self.path)
        return Path(trainer.log_dir or trainer.default_root_dir) / "predictions.jsonl"

    def write_on_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, predictions: Any,
                           batch_indices: Any) -> None:
        batches = predictions
        if batches and isinstance(batches[0], list) and batches[0] and isinstance(batches[0][0], list):
            batches = [b for loader in batches for b in loader]  # several predict dataloaders
        rows = [r for b in batches for r in (b if isinstance(b, list) else [b])]
        if trainer.world_size > 1:
            import torch.distributed as dist

            parts: list[Any] = [None] * trainer.world_size
            dist.all_gather_object(parts, rows)
            rows = [r for p in parts for r in p]
        target = self._target(trainer)  # trainer.log_dir is a collective under DDP: read it on every rank
        if not trainer.is_global_zero:
            return
        write_jsonl(target, rows)
        self.written = target
