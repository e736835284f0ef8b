"""The stimulus items of an events store for ``Trainer.predict``: the unique frames, sentences or
(frame, sentence) pairs its events use (the input of the encoding stage's feature extraction,
:class:`neurovision.tasks.features.FeatureExtractor`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from neurovision.data.events import EventStore
from neurovision.pretrained.feature_networks import check_modality

__all__ = ["StimulusDataModule", "stimulus_items"]


def stimulus_items(store: EventStore, modality: str) -> tuple[np.ndarray, np.ndarray]:
    """The unique items the events of every subject and event set of ``store`` need, as (frame_index,
    sentence_index) int64 arrays (-1 where the modality does not use it), sorted (pairs lexicographically)."""
    check_modality(modality)
    frames, sentences = [], []
    for subject in store.subject_names:
        for es in store.event_sets(subject):
            ev = store.events(subject, es)
            frames.append(np.asarray(ev.frame, dtype=np.int64))
            sentences.append(np.asarray(ev.sentence, dtype=np.int64))
    f = np.concatenate(frames) if frames else np.zeros(0, np.int64)
    s = np.concatenate(sentences) if sentences else np.zeros(0, np.int64)
    if modality == "vision":
        u = np.unique(f)
        return u, np.full_like(u, -1)
    if modality == "language":
        u = np.unique(s)
        return np.full_like(u, -1), u
    pairs = np.unique(np.stack([f, s], 1), axis=0) if len(f) else np.zeros((0, 2), np.int64)
    return pairs[:, 0].copy(), pairs[:, 1].copy()


class _ItemDataset(Dataset):
    def __init__(self, store: EventStore, modality: str, frame_index: np.ndarray, sentence_index: np.ndarray):
        self.store, self.modality = store, modality
        self.frame_index, self.sentence_index = frame_index, sentence_index

    def __len__(self) -> int:
        return len(self.frame_index)

    def __getitem__(self, i: int) -> dict[str, Any]:
        f, s = int(self.frame_index[i]), int(self.sentence_index[i])
        item: dict[str, Any] = {"frame_index": torch.tensor(f), "sentence_index": torch.tensor(s)}
        if self.modality != "language":
            item["frames"] = torch.from_numpy(np.ascontiguousarray(self.store.h5["stimuli/frames"][f]))
        if self.modality != "vision":
            item["sentences"] = self.store.sentences[s]
        return item


class StimulusDataModule(L.LightningDataModule):
    """The unique stimulus items of an events store, for ``Trainer.predict``.

    Its predict dataloader yields batches ``{"frames": uint8 (B, H, W, 3)`` (not for language),
    ``"sentences": list[str]`` (not for vision), ``"frame_index"``, ``"sentence_index"`` (long (B,), -1 when
    unused)``}`` over the unique frames (vision), sentences (language) or (frame, sentence) pairs
    (multimodal) that the events of all subjects and event sets use, in sorted order. The store is opened on
    first use, not in ``__init__``.
    """

    def __init__(self, store: str | os.PathLike[str], modality: Literal["vision", "language", "multimodal"],
                 batch_size: int = 32, num_workers: int = 0) -> None:
        super().__init__()
        self.store_path = Path(store)
        if not self.store_path.is_file():
            raise FileNotFoundError(f"{self.store_path}: events store does not exist (run `neurovision prepare`)")
        self.modality = check_modality(modality)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self._store: EventStore | None = None
        self._items: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def store(self) -> EventStore:
        if self._store is None:
            self._store = EventStore(self.store_path)
        return self._store

    @property
    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """(frame_index, sentence_index) of the items, in the order the dataloader yields them."""
        if self._items is None:
            self._items = stimulus_items(self.store, self.modality)
        return self._items

    def setup(self, stage: str | None = None) -> None:
        self.items  # noqa: B018  (opens the store and lists the items)

    def predict_dataloader(self) -> DataLoader:
        f, s = self.items
        return DataLoader(_ItemDataset(self.store, self.modality, f, s), batch_size=self.batch_size,
                          shuffle=False, num_workers=self.num_workers,
                          persistent_workers=False, pin_memory=False)
