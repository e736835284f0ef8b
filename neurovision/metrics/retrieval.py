"""Retrieval and identification between predicted and true embeddings (MindEye / Shen et al. protocol)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from neurovision.metrics.images import two_way_identification  # one definition, re-exported
from neurovision.metrics.items import ItemMetric


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.normalize(a.float().flatten(1), dim=1) @ F.normalize(b.float().flatten(1), dim=1).T


def retrieval_top1(
    pred: torch.Tensor,
    target: torch.Tensor,
    candidates: int = 300,
    draws: int = 30,
    seed: int = 0,
) -> dict[str, float]:
    """Top-1 retrieval among ``candidates`` items, averaged over ``draws`` random candidate sets.

    ``pred[i]`` and ``target[i]`` belong to the same image (N, D). fMRI→image: for each prediction in the set,
    is its own target the most cosine-similar of the set's targets? image→fMRI: the converse. With
    ``candidates >= N`` there is one draw over all items. Chance is 1 / min(candidates, N).
    """
    n = len(pred)
    if n != len(target) or n < 2:
        raise ValueError(f"retrieval needs >= 2 paired items, got pred {tuple(pred.shape)} target {tuple(target.shape)}")
    k = min(candidates, n)
    g = torch.Generator().manual_seed(seed)
    sets = [torch.arange(n)] if k == n else [torch.randperm(n, generator=g)[:k] for _ in range(draws)]
    sim = _cos(pred, target)  # (N, N): pred i vs target j
    f2i = i2f = 0.0
    for idx in sets:
        s = sim[idx][:, idx]
        eye = torch.arange(len(idx))
        f2i += (s.argmax(1) == eye).float().mean().item()
        i2f += (s.argmax(0) == eye).float().mean().item()
    return {"fmri2img": f2i / len(sets), "img2fmri": i2f / len(sets), "candidates": float(k)}




class RetrievalTop1(ItemMetric):
    """:func:`retrieval_top1` as a torchmetrics ``Metric``: ``update(pred, target, subject, stimulus)``,
    ``compute()`` -> ``{"fmri2img", "img2fmri", "candidates"}`` over the de-padded items of every rank (or
    ``{subject: ...}`` with ``by_subject``). Items are scored in (subject, stimulus) order when keyed."""

    fields = ("pred", "target")

    def __init__(self, candidates: int = 300, draws: int = 30, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.candidates, self.draws, self.seed = int(candidates), int(draws), int(seed)

    def update(self, pred: torch.Tensor, target: torch.Tensor, subject: torch.Tensor | None = None,
               stimulus: torch.Tensor | None = None) -> None:
        self._append(subject, stimulus, pred=pred.float(), target=target.float())

    def score(self, items: dict[str, torch.Tensor]) -> dict[str, float]:
        return retrieval_top1(items["pred"].cpu(), items["target"].cpu(), self.candidates, self.draws, self.seed)


class TwoWayIdentification(ItemMetric):
    """:func:`two_way_identification` as a torchmetrics ``Metric`` (``update(pred, target, subject, stimulus)``;
    ``compute()`` -> a float, or ``{subject: float}`` with ``by_subject``)."""

    fields = ("pred", "target")

    def update(self, pred: torch.Tensor, target: torch.Tensor, subject: torch.Tensor | None = None,
               stimulus: torch.Tensor | None = None) -> None:
        self._append(subject, stimulus, pred=pred.float(), target=target.float())

    def score(self, items: dict[str, torch.Tensor]) -> float:
        return two_way_identification(items["pred"].cpu(), items["target"].cpu())


__all__ = ["RetrievalTop1", "TwoWayIdentification", "retrieval_top1", "two_way_identification"]
