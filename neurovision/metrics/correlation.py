"""Pearson correlation: the one implementation the package's scores call (numpy or torch, vectorised).

Callers: encoding (``encoding.ridge.pearson_r``: column-wise r of (events, targets) arrays), localisation
(``interpretation.pearson``: r of two maps in a mask), image metrics (pixcorr, two-way identification,
correlation distance) and the linear baseline (per-image pixel r and its in-batch identification).

Not routed through here, on purpose: r computed from accumulated moment sums (``encoding.ridge`` streams its
folds, ``encoding.stats`` weights bootstrap resamples by event multiplicities), where no pair of arrays exists.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, TypeVar

import numpy as np
import torch

Constant = Literal["zero", "nan", "raise"]
ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)

#: bytes of float64 temporaries per column chunk of the numpy path (two float32 (events x targets) inputs then
#: need no float64 copy of either whole)
CHUNK_BUDGET = 64 << 20


def _constant_error(names: Sequence[str], k: int, idx: list[int]) -> ValueError:
    return ValueError(f"{names[k]}: item(s) {idx[:10]} are constant, so Pearson r is undefined")


def _unit(x: torch.Tensor, dim: int, constant: Constant, names: Sequence[str], k: int, offset: int) -> torch.Tensor:
    """``x`` centred and scaled to unit norm along ``dim``; a constant slice per ``constant``."""
    x = x - x.mean(dim, keepdim=True)
    norm = x.norm(dim=dim, keepdim=True)
    zero = norm == 0
    if bool(zero.any()):
        if constant == "raise":
            idx = (zero.flatten().nonzero().flatten() + offset).tolist()
            raise _constant_error(names, k, idx)
        fill = 0.0 if constant == "zero" else float("nan")
        return torch.where(zero, torch.full_like(x, fill), x / torch.where(zero, torch.ones_like(norm), norm))
    return x / norm


def _pearson_torch(x: torch.Tensor, y: torch.Tensor, dim: int, constant: Constant, pairwise: bool,
                   names: Sequence[str], offset: int) -> torch.Tensor:
    dtype = torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)
    x, y = x.to(dtype), y.to(x.device, dtype)
    if pairwise:
        if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
            raise ValueError(f"pearson_r(pairwise=True) needs (N, D) and (M, D), got {tuple(x.shape)} and "
                             f"{tuple(y.shape)}")
        return _unit(x, 1, constant, names, 0, offset) @ _unit(y, 1, constant, names, 1, offset).T
    return (_unit(x, dim, constant, names, 0, offset) * _unit(y, dim, constant, names, 1, offset)).sum(dim)


def _pearson_numpy(x: np.ndarray, y: np.ndarray, dim: int, constant: Constant, names: Sequence[str],
                   offset: int, budget: int) -> np.ndarray:
    if x.shape != y.shape:
        raise ValueError(f"pearson_r: shapes differ: {x.shape} vs {y.shape}")
    x, y = np.moveaxis(x, dim, 0), np.moveaxis(y, dim, 0)
    n = x.shape[0]
    rest = x.shape[1:]
    x2, y2 = x.reshape(n, -1), y.reshape(n, -1)
    t = x2.shape[1]
    out = np.empty(t)
    chunk = int(max(1, min(t, budget // (8 * 3 * max(n, 1)))))
    for c0 in range(0, t, chunk):
        xs = np.array(x2[:, c0:c0 + chunk], dtype=np.float64)
        xs -= xs.mean(axis=0)
        ys = np.array(y2[:, c0:c0 + chunk], dtype=np.float64)
        ys -= ys.mean(axis=0)
        num = (xs * ys).sum(axis=0)
        sxx, syy = (xs * xs).sum(axis=0), (ys * ys).sum(axis=0)
        den = np.sqrt(sxx * syy)
        ok = den > 0
        if constant == "raise" and not ok.all():
            k = 0 if (sxx == 0).any() else 1
            bad = np.flatnonzero((sxx if k == 0 else syy) == 0) + c0 + offset
            raise _constant_error(names, k, bad.tolist())
        fill = 0.0 if constant == "zero" else np.nan
        out[c0:c0 + chunk] = np.where(ok, num / np.where(ok, den, 1.0), fill)
    return out.reshape(rest)


def pearson_r(x: ArrayT, y: ArrayT, dim: int = 0, *, constant: Constant = "zero", pairwise: bool = False,
              names: Sequence[str] = ("x", "y"), offset: int = 0, budget: int = CHUNK_BUDGET) -> ArrayT:
    """Pearson r between ``x`` and ``y`` along ``dim`` (the observations), for every other index at once.

    numpy arrays: same shapes, float64 arithmetic by column chunks (bounded temporaries), returns a float64
    array of the shape without ``dim`` (0-d for vectors); ``budget`` bounds the bytes of float64 temporaries
    per column chunk. torch tensors: broadcasting shapes, in the promoted
    dtype (at least float32, float64 stays float64) on ``x``'s device, as ``(x̂ * ŷ).sum(dim)`` of the centred
    unit vectors; ``pairwise=True`` (torch, (N, D) and (M, D), ``dim`` ignored) gives the (N, M) matrix
    ``r[i, j] = r(x_i, y_j)``.

    ``constant``: the r of a constant slice (zero variance) is ``0`` (``"zero"``), NaN (``"nan"``), or a
    ``ValueError`` naming ``names[0]`` or ``names[1]`` and the slice indices (+ ``offset``) (``"raise"``).
    """
    if constant not in ("zero", "nan", "raise"):
        raise ValueError(f"constant must be 'zero', 'nan' or 'raise', got {constant!r}")
    if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
        return _pearson_torch(torch.as_tensor(x), torch.as_tensor(y), dim, constant, pairwise, names, offset)
    if pairwise:
        raise ValueError("pearson_r(pairwise=True) takes torch tensors")
    return _pearson_numpy(np.asarray(x), np.asarray(y), dim, constant, names, offset, budget)


__all__ = ["pearson_r"]
