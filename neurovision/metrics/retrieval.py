"""Retrieval and identification between predicted and true embeddings (MindEye / Shen et al. protocol)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from neurovision.metrics.images import two_way_identification  # noqa: F401  (one definition, re-exported)


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


