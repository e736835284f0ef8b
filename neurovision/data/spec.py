"""``DataSpec``: what the data decides, built by the datamodule and handed to the task (``link_arguments``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class DataSpec:
    """What the data decides, passed from the datamodule to the task by ``link_arguments``: a task reads the
    data through this and never through ``trainer.datamodule``.

    The sizes (compared fields) fix the network's shapes; a checkpoint stores them (:meth:`sizes`) and a run on
    another grid is refused. The run fields (``compare=False``) describe this run's data and may change between
    runs of one checkpoint:

    * ``subject_names``: the store's subject names, by subject index (``batch["subject"]``);
    * ``eval_conditions``: the name of each validation/test dataloader, in dataloader order;
    * ``store``: the store file's path (a task that needs the store's images or teacher targets opens it);
    * ``train_subjects``: the subject indices trained on (the training trials are the store's ``train`` split
      of these subjects; empty: every subject);
    * ``seed``: the data seed (training order, MixUp; the randomised read-out fit of stage 1);
    * ``num_workers``: DataLoader worker processes for the reads a task makes itself (stage 1's read-out fit).
    """

    num_active_patches: int
    patch_size: int
    grid_shape: tuple[int, int, int]
    patch_coords: tuple[tuple[int, int, int], ...]
    num_subjects: int
    image_shape: tuple[int, int, int]
    subject_names: tuple[str, ...] = field(default=(), compare=False)
    eval_conditions: tuple[str, ...] = field(default=(), compare=False)
    store: str = field(default="", compare=False)
    train_subjects: tuple[int, ...] = field(default=(), compare=False)
    seed: int = field(default=0, compare=False)
    num_workers: int = field(default=0, compare=False)

    @property
    def patch_dim(self) -> int:
        return self.patch_size**3

    def sizes(self) -> dict[str, Any]:
        """The compared fields as plain data (what a checkpoint's ``hyper_parameters/data_spec`` holds)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.compare}

    def subject_name(self, index: int) -> str:
        """The name of subject ``index`` (its index as text when the spec has no names)."""
        return self.subject_names[index] if 0 <= index < len(self.subject_names) else str(index)

    def condition(self, dataloader_idx: int, default: tuple[str, ...] | list[str] = ()) -> str:
        """The name of evaluation dataloader ``dataloader_idx``: ``eval_conditions``' entry (else ``default``'s,
        else the index)."""
        conds = list(self.eval_conditions or default)
        return str(conds[dataloader_idx]) if 0 <= dataloader_idx < len(conds) else str(dataloader_idx)


__all__ = ["DataSpec"]
