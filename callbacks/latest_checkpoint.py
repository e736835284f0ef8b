"""``LatestCheckpoint``: the state at the end of the latest finished training epoch, in one file.

Installed by :class:`~neurovision.runs.lightning.NeuroVisionCLI` for every ``fit`` (and by a sweep for each run):
what ``--ckpt_path=last`` and a sweep's resume start from. Not Lightning's ``last.ckpt``: since Lightning 2.6 a
monitored ``ModelCheckpoint`` writes ``last.ckpt`` only when a top-k checkpoint is saved, plus once at the end of
a process that saved none, so its ``last.ckpt`` holds other weights after an interrupted and resumed fit than
after an uninterrupted one.
"""

from __future__ import annotations

import os
import shutil
from typing import Any
from weakref import proxy

from lightning.pytorch.callbacks import ModelCheckpoint

LATEST = "latest"  # <checkpoint dir>/latest.ckpt


class LatestCheckpoint(ModelCheckpoint):
    """The state at the end of the latest finished training epoch, in one file (``<dirpath>/latest.ckpt``,
    overwritten; ``dirpath`` None: the run's checkpoint folder, beside the config's own checkpoints), whatever the
    config's own ``ModelCheckpoint`` monitors."""

    def __init__(self, dirpath: str | None = None, filename: str = LATEST) -> None:
        super().__init__(dirpath=dirpath, filename=filename, monitor=None, save_top_k=1, save_last=False,
                         enable_version_counter=False, save_on_train_epoch_end=True)

    @property
    def state_key(self) -> str:  # never clashes with a plain ModelCheckpoint of the config
        return self._generate_state_key(run=LATEST)

    def _save_checkpoint(self, trainer: Any, filepath: str) -> None:
        """Write a hidden ``.latest.ckpt.partial`` (the same name on every rank: a sharded strategy writes into it
        from all of them), then rename it over ``latest.ckpt``: a process killed mid-write leaves the previous
        epoch's file (or sharded folder) whole instead of a truncated one (Lightning writes the target in place)."""
        partial = os.path.join(os.path.dirname(filepath), f".{os.path.basename(filepath)}.partial")
        trainer.save_checkpoint(partial, self.save_weights_only)
        if trainer.is_global_zero and os.path.exists(partial):
            if os.path.isdir(partial) and os.path.isdir(filepath):  # a sharded checkpoint is a folder
                shutil.rmtree(filepath)
            os.replace(partial, filepath)
        trainer.strategy.barrier("LatestCheckpoint._save_checkpoint")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:  # as ModelCheckpoint._save_checkpoint does, with the final path
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))
