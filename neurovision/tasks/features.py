"""The encoding stage's Lightning predict task: a feature network run over the stimulus items of a store."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from neurovision.data.events import EventStore
from neurovision.pretrained.feature_networks import FeatureNetwork

__all__ = ["FeatureExtractor"]


class FeatureExtractor(L.LightningModule):
    """Runs a feature network in ``Trainer.predict``; each step returns ``{"frame_index", "sentence_index",
    "features": {layer: float32 (B, D) on the CPU}}``. A network with ``setup_store`` gets ``store`` (the events
    store its datamodule reads, handed in by the caller: the task does not reach into ``trainer.datamodule``) at
    setup."""

    def __init__(self, network: FeatureNetwork, store: EventStore | None = None) -> None:
        super().__init__()
        self.network = network
        self.store = store

    def setup(self, stage: str) -> None:
        if self.store is not None and hasattr(self.network, "setup_store"):
            self.network.setup_store(self.store)

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        feats = self.network.extract(batch)
        n = len(batch["frame_index"])
        out: dict[str, torch.Tensor] = {}
        for name in self.network.layers:
            if name not in feats:
                raise RuntimeError(f"{type(self.network).__name__}.extract returned no layer {name!r}")
            v = feats[name]
            if v.ndim != 2 or v.shape[0] != n:
                raise RuntimeError(f"{type(self.network).__name__}: layer {name!r} has shape {tuple(v.shape)}, "
                                   f"expected ({n}, D)")
            out[name] = v.detach().float().cpu()
        return {"frame_index": batch["frame_index"].detach().cpu(),
                "sentence_index": batch["sentence_index"].detach().cpu(), "features": out}
