"""Cross-validated ridge from network features (events x features) to neural targets (events x sites).

Conventions (Subramaniam et al., ICML 2024, encoding analysis):

- Outer folds are contiguous blocks of events (never shuffled: neighbouring events are autocorrelated) or
  whole groups (movies / trials), from :func:`blocked_folds`; the folds' test sets partition the events.
- In every outer fold, X is z-scored and Y centred (optionally z-scored) with the training fold's statistics
  only; no intercept is fitted beyond that. Predictions are mapped back to Y's units (``+ mean``, ``* std``),
  which makes them equal to an intercept-fitting ridge on the z-scored features.
- α (penalty on ``||w||²`` of ``||Xw - y||²``, scikit-learn's convention) is chosen per target by an inner
  blocked CV on the training fold (score: mean squared error over the inner folds; each inner fold re-centres
  X and Y with its own training part, i.e. an unpenalised intercept; ties go to the larger α), then refit on
  the whole training fold. Default ``inner_cv="downdate"``: the exact leave-one-block-out errors from the
  training Gram downdated per block (:func:`_ridge_cv_downdate`); ``"refit"``: himalaya ``RidgeCV``, which
  refits every inner fold, the reference it equals up to rounding.
- ``r`` is Pearson's r between the out-of-fold predictions and Y over all events; 0 where either is constant.
  For an unpredictable target it sits near -sqrt((n_folds - 1) / n_events), not 0: the training-fold means
  added back anticorrelate with the test-fold means. ``r_folds`` (within each test fold) has no such offset.

himalaya does the linear algebra: backend ``numpy`` on CPU, ``torch`` / ``torch_cuda``; ``auto`` picks
``torch_cuda`` when CUDA is available. Its backend is a global: it is set for the duration of a call and
restored after (not thread-safe).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import numpy as np

from neurovision.metrics.correlation import pearson_r as _pearson_r

DEFAULT_ALPHAS = np.logspace(-1, 5, 7)
BACKENDS = ("auto", "numpy", "torch", "torch_cuda")
_MEMORY_BUDGET = 1 << 30  # bytes: target the solver's largest temporaries at about this size
_PEARSON_BUDGET = 64 << 20  # bytes of float64 temporaries per column chunk of pearson_r

Folds = list[tuple[np.ndarray, np.ndarray]]
InnerCV = Literal["downdate", "refit"]
INNER_CV = ("downdate", "refit")


@dataclass
class EncodingResult:
    """Out-of-fold encoding fit.

    ``predictions`` (n_events, n_targets) float32 in Y's units, or None when not asked for (then never held
    whole: r and r_pooled come from per-fold sums); ``r`` (n_targets,) over all events; ``r_folds``
    (n_folds, n_targets) within each test fold; ``r_pooled`` (n_targets,) the pooled within-fold r (Pearson r of
    Y and predictions each centred within every test fold, = ``pearson_r(center_by_fold(Y), center_by_fold(P))``;
    no offset from the training-fold means); ``alphas_`` (n_folds, n_targets) chosen α; ``folds`` the (train,
    test) indices used. ``coefs`` (per fold, (n_features, n_targets)) are
    weights on the z-scored features predicting the centred (or z-scored) Y, when asked for. Banded ridge only:
    ``deltas_`` (n_folds, n_bands, n_targets), the log band scalings (band weight = exp(delta)).
    """

    predictions: np.ndarray | None
    r: np.ndarray
    r_folds: np.ndarray
    alphas_: np.ndarray
    folds: Folds
    coefs: list[np.ndarray] | None = None
    deltas_: np.ndarray | None = None
    r_pooled: np.ndarray | None = None


# ------------------------------------------------------------------------------------------------ folds
def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def blocked_folds(n_events: int, n_folds: int = 5, groups: Sequence[Any] | np.ndarray | None = None) -> Folds:
    """(train, test) index pairs over ``n_events`` events in their given order, never shuffled.

    Without ``groups``: ``n_folds`` contiguous test blocks (sizes differ by at most one). With ``groups`` (one
    label per event, e.g. movie or trial): leave-groups-out folds, each test set a run of whole groups in order
    of first appearance; one fold per group when there are fewer groups than ``n_folds``. Test sets partition
    the events; indices are sorted.
    """
    n_events = _check_int(n_events, "n_events", 2)
    n_folds = _check_int(n_folds, "n_folds", 2)
    if groups is None:
        if n_folds > n_events:
            raise ValueError(f"n_folds ({n_folds}) exceeds n_events ({n_events})")
        tests = np.array_split(np.arange(n_events), n_folds)
    else:
        g = np.asarray(groups)
        if g.ndim != 1 or len(g) != n_events:
            raise ValueError(f"groups must have one label per event ({n_events}), got shape {g.shape}")
        _, first, inverse = np.unique(g, return_index=True, return_inverse=True)
        order = np.argsort(first)  # group ids in order of first appearance
        if len(order) < 2:
            raise ValueError("groups must hold at least 2 distinct labels to leave groups out")
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        fold_of_group = np.empty(len(order), dtype=np.int64)
        for k, part in enumerate(np.array_split(np.arange(len(order)), min(n_folds, len(order)))):
            fold_of_group[part] = k
        fold = fold_of_group[rank[inverse.ravel()]]
        tests = [np.flatnonzero(fold == k) for k in range(fold.max() + 1)]
    everything = np.arange(n_events)
    return [(np.setdiff1d(everything, t, assume_unique=True), t.astype(np.int64)) for t in tests]


def _check_folds(folds: int | Folds, n_events: int, groups: Any = None) -> Folds:
    """``folds`` as a list of (train, test) int arrays whose test sets partition the events."""
    if isinstance(folds, (int, np.integer)) and not isinstance(folds, bool):
        return blocked_folds(n_events, int(folds), groups)
    try:
        out = [(np.asarray(tr), np.asarray(te)) for tr, te in cast(Folds, folds)]
    except (TypeError, ValueError) as e:
        raise ValueError("folds must be an int or a list of (train, test) index arrays") from e
    if len(out) < 2:
        raise ValueError(f"folds must hold at least 2 (train, test) pairs, got {len(out)}")
    seen = np.zeros(n_events, dtype=np.int64)
    for k, (tr, te) in enumerate(out):
        for what, a in (("train", tr), ("test", te)):
            if a.ndim != 1 or a.size == 0:
                raise ValueError(f"folds[{k}] has an empty or non-1-D {what} set")
            if not np.issubdtype(a.dtype, np.integer) or a.min() < 0 or a.max() >= n_events:
                raise ValueError(f"folds[{k}] {what} indices must be integers in [0, {n_events})")
        if np.intersect1d(tr, te).size:
            raise ValueError(f"folds[{k}] train and test sets overlap")
        seen[te] += 1
    if not np.all(seen == 1):
        raise ValueError(f"folds: test sets must partition the {n_events} events "
                         f"({int((seen == 0).sum())} never tested, {int((seen > 1).sum())} tested twice)")
    return [(tr.astype(np.int64), te.astype(np.int64)) for tr, te in out]


# ------------------------------------------------------------------------------------------------ scaling
def zscore_fit(X_train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column mean and std (ddof 0, float64) of training data; a constant column gets std 1.

    "Constant" is std == 0 or std at rounding level (<= 1e-12 |mean|). Apply as ``(X - mean) / std``.
    """
    x = np.asarray(X_train)
    x2 = x.reshape(len(x), -1)
    mean, std = np.empty(x2.shape[1]), np.empty(x2.shape[1])
    for sl in _column_chunks(x2.shape, 2):  # float64 temporaries of a column chunk, not of the whole array
        c = np.asarray(x2[:, sl], dtype=np.float64)
        mean[sl], std[sl] = c.mean(axis=0), c.std(axis=0)
    std[(std == 0) | (std <= 1e-12 * np.abs(mean))] = 1.0
    return mean.reshape(x.shape[1:]), std.reshape(x.shape[1:])


def _column_chunks(shape: tuple[int, ...], n_temporaries: int) -> list[slice]:
    """Column slices of an (n, t) array whose ``n_temporaries`` float64 copies fit ``_PEARSON_BUDGET``."""
    n, t = shape[0], int(np.prod(shape[1:]))
    chunk = int(max(1, min(t, _PEARSON_BUDGET // (8 * n_temporaries * max(n, 1)))))
    return [slice(c0, c0 + chunk) for c0 in range(0, t, chunk)]


def _scale(x: np.ndarray, mean: np.ndarray, std: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``(x - mean) / std`` as ``dtype``, computed by column chunks (no float64 copy of the whole x)."""
    x = np.asarray(x)
    if x.ndim != 2:
        return ((x - mean) / std).astype(dtype, copy=False)
    out = np.empty(x.shape, dtype=dtype)
    for sl in _column_chunks(x.shape, 2):
        out[:, sl] = (x[:, sl] - mean[sl]) / std[sl]
    return out


def pearson_r(y: np.ndarray, yhat: np.ndarray) -> np.ndarray:
    """Column-wise Pearson r (float64) of two (n, t) arrays; 0 where either column is constant.

    :func:`neurovision.metrics.correlation.pearson_r` over column chunks (float64 temporaries of about
    ``_PEARSON_BUDGET`` bytes), so two float32 (events x targets) inputs need no float64 copy of either whole.
    """
    return _pearson_r(np.asarray(y), np.asarray(yhat), budget=_PEARSON_BUDGET)


def center_by_fold(a: np.ndarray, folds: Folds, copy: bool = True) -> np.ndarray:
    """``a`` (n_events, ...) with each test fold's own mean removed (float32; ``copy=False`` centres a float32
    ``a`` in place instead of copying it).

    Pearson r of fold-centred Y and fold-centred out-of-fold predictions is the pooled within-fold correlation:
    it has no offset from the training-fold means added back to the predictions (see the module docstring),
    an offset that would otherwise favour, under the null, whichever model's predictions vary more.
    """
    out = np.asarray(a, dtype=np.float32)
    if copy and isinstance(a, np.ndarray) and np.shares_memory(out, a):
        out = out.copy()
    for _, test in folds:
        out[test] -= out[test].mean(axis=0, keepdims=True)
    return out


# ------------------------------------------------------------------------------------------------ inputs
def _check_matrix(a: Any, name: str, n_events: int | None = None, allow_1d: bool = False) -> np.ndarray:
    a = np.asarray(a)
    if allow_1d and a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2 or 0 in a.shape:
        raise ValueError(f"{name} must be a non-empty 2-D array (events x columns), got shape {a.shape}")
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise ValueError(f"{name} must be numeric, got dtype {a.dtype}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} holds NaN or inf ({int((~np.isfinite(a)).sum())} entries)")
    if n_events is not None and len(a) != n_events:
        raise ValueError(f"{name} has {len(a)} events, expected {n_events} (as Y)")
    return a


def _check_alphas(alphas: Any) -> np.ndarray:
    a = np.atleast_1d(np.asarray(alphas, dtype=np.float64))
    if a.ndim != 1 or a.size == 0 or not np.isfinite(a).all() or (a <= 0).any():
        raise ValueError(f"alphas must be a non-empty 1-D array of positive finite numbers, got {alphas!r}")
    return np.unique(a)


def _resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        import torch

        return "torch_cuda" if torch.cuda.is_available() else "numpy"
    return backend


@contextlib.contextmanager
def _himalaya_backend(name: str) -> Iterator[Any]:
    from himalaya.backend import get_backend, set_backend

    previous = get_backend().name
    module = set_backend(name, on_error="raise")
    try:
        yield module
    finally:
        set_backend(previous)


def _batches(n_targets: int, n_alphas: int, n_train: int, n_test: int, n_features: int, itemsize: int,
             n_targets_batch: int | None, n_alphas_batch: int | None) -> tuple[int, int]:
    """Batch sizes bounding himalaya's temporaries: (alphas, features|test, train) and (alphas, test, targets)."""
    if n_alphas_batch is None:
        per_alpha = max(n_features, n_test) * n_train * itemsize
        n_alphas_batch = int(np.clip(_MEMORY_BUDGET // max(per_alpha, 1), 1, n_alphas))
    if n_targets_batch is None:
        per_target = n_alphas_batch * (n_test + n_features) * itemsize
        n_targets_batch = int(np.clip(_MEMORY_BUDGET // max(per_target, 1), 1, n_targets))
    return _check_int(n_targets_batch, "n_targets_batch", 1), _check_int(n_alphas_batch, "n_alphas_batch", 1)


def _snap(chosen: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Chosen α (rounded by the solver's dtype) as the nearest value of the (float64) grid."""
    d = np.abs(np.log(np.asarray(chosen, dtype=np.float64))[:, None] - np.log(grid)[None, :])
    return grid[d.argmin(axis=1)]


def _inner_cv(n_train: int, inner_folds: int, groups_train: np.ndarray | None) -> Folds:
    """Contiguous (or leave-groups-out) inner folds over the positions of a training fold."""
    if groups_train is not None and len(np.unique(groups_train)) < 2:
        groups_train = None  # one group in the training fold: fall back to contiguous blocks
    if groups_train is None and inner_folds > n_train:
        raise ValueError(f"inner_folds ({inner_folds}) exceeds the training fold's {n_train} events")
    return blocked_folds(n_train, inner_folds, groups_train)


# ------------------------------------------------------------------------------------------------ fast inner CV
@contextlib.contextmanager
def _one_thread(active: bool = True) -> Iterator[None]:
    """torch on one CPU thread for the duration (when ``active``). A p x p eigendecomposition (level-2 BLAS
    bound) on 2 threads of a loaded 2-core machine took 10x its 1-thread time (1.0 s vs 0.1 s at p = 1,024);
    on an idle one, 1 thread costs ~1.3x."""
    if not active:
        yield
        return
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _downdate_targets_batch(n_train: int, rank: int, n_blocks: int, max_block: int, n_alphas: int,
                            itemsize: int, n_targets: int) -> int:
    """Targets per batch of :func:`_ridge_cv_downdate`: its per-target temporaries (the rows of Y, Xᵀy of
    every block, projections, block residuals, the scaled projections and predictions of every α) near
    ``_MEMORY_BUDGET``."""
    per_target = (n_train + (n_blocks + 3) * rank + 2 * max_block
                  + n_alphas * (rank + min(max_block, rank))) * itemsize
    return int(np.clip(_MEMORY_BUDGET // max(per_target, 1), 1, n_targets))


def _ridge_cv_downdate(bk: Any, x_tr: np.ndarray, y_tr: np.ndarray, inner: Folds, alphas: np.ndarray,
                       n_targets_batch: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact leave-one-block-out inner CV and refit of ridge with an intercept, from Gram downdates.

    Returns the index into ``alphas`` of the α chosen per target, the refit weights (n_features, n_targets)
    and the intercepts (n_targets,), equal up to rounding to himalaya ``RidgeCV(alphas, cv=inner,
    fit_intercept=True)`` (``inner_cv="refit"``): for every inner block b, ridge with an unpenalised intercept
    on the other rows (X and Y centred on those rows' means μ₋b, ν₋b); score: the mean over blocks of minus
    the mean squared error on block b; ties to the larger α (himalaya's 1e-10 log α slope); the refit on all
    rows, centred on their means.

    himalaya computes one SVD per inner training set and (n_alphas, n_block, n_train) resolution matrices
    applied to every target. Here the centred Gram of the rows outside block b is the full one downdated,
    G₋b = XᵀX - X_bᵀX_b - n₋b μ₋b μ₋bᵀ (and X₋bᵀY₋b = XᵀY - X_bᵀY_b - n₋b μ₋b ν₋bᵀ =: C_b), diagonalised once
    per block as Q_b Λ_b Q_bᵀ (p x p); per α the held-out prediction of block b is
    (X_b - μ₋b) Q_b diag(1 / (λ + α)) Q_bᵀ C_b + ν₋b: about n_train·p operations per α and target, as
    scikit-learn's leave-one-out. When p > n_train, X is first replaced by U S of its thin SVD (X = U S Vᵀ;
    ridge weights lie in the row space of X, so this is exact) and the weights mapped back by V. The
    null directions of a Gram (rank <= n₋b - 1 < p: C_b has no component there in exact arithmetic) and
    negative (rounding) eigenvalues are dropped. When n_block > p, A_b = (X_b - μ₋b) Q_b = L (S Rᵀ) (thin
    SVD): the error off L's span does not depend on α, so per α only ||Lᵀr - S Rᵀ d||² is computed, p² per
    target instead of n_block·p. (The hat-matrix form, (I - H_bb)⁻¹ (y_b - ŷ_b) from one SVD of X, is exact
    too but costs n_block² + n_block·p per α, block and target: at Brain Treebank sizes, n_block ≈ 5,000 >>
    p = 768, ~50x more than p².)
    Written with himalaya's backend ops (``bk``): runs on ``torch_cuda`` as on numpy.
    """
    n, p = x_tr.shape
    t = y_tr.shape[1]
    dtype = np.dtype(x_tr.dtype)
    dt = dtype.name
    # inner blocks made contiguous: ridge and centring do not depend on the order of the rows
    perm = np.concatenate([te for _, te in inner])
    bounds = [int(v) for v in np.concatenate([[0], np.cumsum([len(te) for _, te in inner])])]
    spans = [slice(bounds[b], bounds[b + 1]) for b in range(len(inner))]
    X = bk.asarray(x_tr[perm], dtype=dt)
    vt = None
    if p > n:  # the row space: X V = U S (n x n), weights V w
        u, s, vt = bk.svd(X, full_matrices=False)
        X = u * s[None, :]
        del u, s
    rank = X.shape[1]

    def eig(g: Any, n_rows: int) -> tuple[Any, Any, Any]:
        """Eigenvalues (dropped ones 0), eigenvectors and the 0/1 mask of kept eigenvalues of the centred Gram
        ``g`` of ``n_rows`` rows: rank <= n_rows - 1, so the smallest rank - (n_rows - 1) are null directions
        (dropped: rounding only); negative ones are rounding too (dropped)."""
        g = (g + g.T) / 2
        if bk.name == "numpy":  # LAPACK's divide and conquer: 2-3x faster than scipy's default driver
            import scipy.linalg
            from threadpoolctl import threadpool_limits

            with threadpool_limits(1, user_api="blas"):  # see _one_thread
                lam, q = scipy.linalg.eigh(g, driver="evd", overwrite_a=True, check_finite=False)
        else:
            with _one_thread(bk.name == "torch"):
                lam, q = bk.eigh(g)  # ascending, as LAPACK's
        structural = np.zeros(rank, dtype=dt)
        structural[max(0, rank - (n_rows - 1)):] = 1.0
        keep = bk.asarray(structural, dtype=dt) * bk.asarray(lam > 0, dtype=dt)
        return lam * keep, q, keep

    gram = bk.matmul(X.T, X)
    x_sum = X.sum(0)
    blocks = []
    for sl in spans:
        xb = X[sl]
        n_out = n - xb.shape[0]
        mu = (x_sum - xb.sum(0)) / n_out
        lam, q, keep = eig(gram - bk.matmul(xb.T, xb) - n_out * (mu[:, None] * mu[None, :]), n_out)
        a_b, proj = bk.matmul(xb - mu[None, :], q), None
        if a_b.shape[0] > rank:  # A_b = L (S Rᵀ): the error off L's span does not depend on α
            proj, s, rt = bk.svd(a_b, full_matrices=False)
            a_b = s[:, None] * rt
        blocks.append((n_out, mu, lam, keep, q, a_b, proj))
    m = x_sum / n
    lam_all, q_all, keep_all = eig(gram - n * (m[:, None] * m[None, :]), n)
    del gram
    if n_targets_batch is None:
        n_targets_batch = _downdate_targets_batch(n, rank, len(inner), max(len(te) for _, te in inner),
                                                  len(alphas), dtype.itemsize, t)
    log_slope = np.log(alphas)[:, None] * 1e-10
    alphas_bk = bk.asarray(alphas, dtype=dt)
    best = np.empty(t, dtype=np.int64)
    coef = np.empty((p, t), dtype=dtype)
    intercept = np.empty(t, dtype=dtype)
    for c0 in range(0, t, n_targets_batch):
        c1 = min(t, c0 + n_targets_batch)
        Y = bk.asarray(y_tr[perm, c0:c1], dtype=dt)
        y_sum = Y.sum(0)
        xty_blocks = [bk.matmul(X[sl].T, Y[sl]) for sl in spans]
        xty = xty_blocks[0]
        for xb_ty in xty_blocks[1:]:
            xty = xty + xb_ty
        scores = np.zeros((len(alphas), c1 - c0))
        for b, (sl, (n_out, mu, lam, keep, q, a_b, proj)) in enumerate(zip(spans, blocks, strict=True)):
            yb = Y[sl]
            n_b = yb.shape[0]
            nu = (y_sum - yb.sum(0)) / n_out
            z = bk.matmul(q.T, xty - xty_blocks[b] - n_out * (mu[:, None] * nu[None, :]))
            xty_blocks[b] = None  # freed as we go
            resid0 = yb - nu[None, :]
            off_span: float | np.ndarray = 0.0
            if proj is not None:  # n_b > rank: ||r - L S Rᵀ d||² = ||r||² - ||Lᵀr||² + ||Lᵀr - S Rᵀ d||²
                total = (resid0 * resid0).sum(0)
                resid0 = bk.matmul(proj.T, resid0)
                off_span = np.asarray(bk.to_numpy(total - (resid0 * resid0).sum(0)), dtype=np.float64)
            # every α in one product: (k x r) @ (r x n_alphas·t), k = min(n_b, r)
            d = keep[None, :] / (lam[None, :] + alphas_bk[:, None])  # (n_alphas, r)
            pred = bk.matmul(a_b, (z[:, None, :] * d.T[:, :, None]).reshape(rank, -1))
            pred = pred.reshape(a_b.shape[0], len(alphas), c1 - c0)
            pred -= resid0[:, None, :]
            sq = bk.einsum("iaj,iaj->aj", pred, pred)
            scores -= (np.asarray(bk.to_numpy(sq), dtype=np.float64) + off_span) / n_b
            del z, resid0, pred, sq
        choice = (scores / len(inner) + log_slope).argmax(axis=0)
        best[c0:c1] = choice
        nu = y_sum / n  # the refit on all rows, each target with its α
        z = bk.matmul(q_all.T, xty - n * (m[:, None] * nu[None, :]))
        a_chosen = bk.asarray(alphas[choice], dtype=dt)
        w = bk.matmul(q_all, z * keep_all[:, None] / (lam_all[:, None] + a_chosen[None, :]))
        intercept[c0:c1] = bk.to_numpy(nu - bk.matmul(m, w))
        if vt is not None:
            w = bk.matmul(vt.T, w)
        coef[:, c0:c1] = bk.to_numpy(w)
        del Y, xty, xty_blocks, z, w
    return best, coef, intercept


# ------------------------------------------------------------------------------------------------ fits
def _prepare(Y: Any, folds: Any, groups: Any, inner_folds: int, dtype: str, backend: str,
             n_events: int) -> tuple[np.ndarray, Folds, np.ndarray | None, str, np.dtype]:
    Y = _check_matrix(Y, "Y", allow_1d=True)
    if len(Y) != n_events:
        raise ValueError(f"Y has {len(Y)} events, X has {n_events}")
    if groups is not None:
        groups = np.asarray(groups)
        if groups.ndim != 1 or len(groups) != n_events:
            raise ValueError(f"groups must have one label per event ({n_events}), got shape {groups.shape}")
    folds = _check_folds(folds, n_events, groups)
    _check_int(inner_folds, "inner_folds", 2)
    name = _resolve_backend(backend)
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    return Y, folds, groups, name, np.dtype(dtype)


def _add_moments(sums: np.ndarray, y_test: np.ndarray, pred: np.ndarray, shift: np.ndarray) -> None:
    """Add one test fold to ``sums`` (8, n_targets): Σy, Σy², Σp, Σp², Σyp of y and p shifted by ``shift``
    (r over all events) and Σy², Σp², Σyp of y and p centred on the fold's own means (the pooled within-fold
    r); in column chunks of float64 temporaries."""
    n, t = pred.shape
    chunk = int(max(1, min(t, _PEARSON_BUDGET // (8 * 2 * max(n, 1)))))
    for c0 in range(0, t, chunk):
        sl = slice(c0, c0 + chunk)
        y = np.array(y_test[:, sl], dtype=np.float64)
        y -= shift[sl]
        p = np.array(pred[:, sl], dtype=np.float64)
        p -= shift[sl]
        sy, sp = y.sum(axis=0), p.sum(axis=0)
        sums[0, sl] += sy
        sums[1, sl] += (y * y).sum(axis=0)
        sums[2, sl] += sp
        sums[3, sl] += (p * p).sum(axis=0)
        sums[4, sl] += (y * p).sum(axis=0)
        y -= sy / n
        p -= sp / n
        sums[5, sl] += (y * y).sum(axis=0)
        sums[6, sl] += (p * p).sum(axis=0)
        sums[7, sl] += (y * p).sum(axis=0)


def _r_from_sums(sy: Any, syy: np.ndarray, sp: Any, spp: np.ndarray, syp: np.ndarray, n: int) -> np.ndarray:
    """Pearson r from moment sums; 0 where either variance is 0 or at rounding level of its second moment."""
    vy = syy - np.multiply(sy, sy) / n
    vp = spp - np.multiply(sp, sp) / n
    ok = (vy > 1e-10 * syy) & (vp > 1e-10 * spp) & (vy > 0) & (vp > 0)
    cov = syp - np.multiply(sy, sp) / n
    return np.where(ok, cov / np.sqrt(np.where(ok, vy * vp, 1.0)), 0.0)


def _fit_folds(Xs: list[np.ndarray], Y: np.ndarray, folds: Folds, groups: np.ndarray | None, alphas: np.ndarray,
               inner_folds: int, backend: str, dtype: np.dtype, n_targets_batch: int | None,
               n_alphas_batch: int | None, zscore_y: bool, return_predictions: bool, return_coefs: bool,
               banded: dict[str, Any] | None, inner_cv: str = "refit") -> EncodingResult:
    from himalaya.ridge import GroupRidgeCV, Ridge, RidgeCV

    n_events, n_targets = Y.shape
    n_features = sum(x.shape[1] for x in Xs)
    predictions = np.empty((n_events, n_targets), dtype=np.float32) if return_predictions else None
    shift = np.asarray(Y.mean(axis=0, dtype=np.float64))  # keeps the moment sums of r well conditioned
    sums = np.zeros((8, n_targets))  # moments for r (without predictions held) and the pooled within-fold r
    r_folds = np.empty((len(folds), n_targets))
    alphas_ = np.empty((len(folds), n_targets))
    deltas = np.empty((len(folds), len(Xs), n_targets)) if banded is not None else None
    coefs: list[np.ndarray] = []
    with _himalaya_backend(backend) as bk:
        for k, (train, test) in enumerate(folds):
            xs_tr, xs_te = [], []
            for x in Xs:
                mean, std = zscore_fit(x[train])
                xs_tr.append(_scale(x[train], mean, std, dtype))
                xs_te.append(_scale(x[test], mean, std, dtype))
            y_train = Y[train]
            y_mean, y_std = zscore_fit(y_train)
            if not zscore_y:
                y_std = np.ones_like(y_std)
            y_tr = _scale(y_train, y_mean, y_std, dtype)
            del y_train
            inner = _inner_cv(len(train), inner_folds, None if groups is None else groups[train])
            n_test_inner = max(len(te) for _, te in inner)
            tb, ab = _batches(n_targets, len(alphas), len(train), n_test_inner, n_features, dtype.itemsize,
                              n_targets_batch, n_alphas_batch)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Solving (banded )?ridge is slower")
                if banded is not None:
                    model = GroupRidgeCV(groups="input", solver="random_search", cv=inner, fit_intercept=True,
                                         random_state=banded["seed"],
                                         solver_params=dict(n_iter=banded["n_iter"], alphas=alphas.astype(dtype),
                                                            concentration=banded["concentration"],
                                                            n_targets_batch=tb, n_alphas_batch=ab,
                                                            progress_bar=False))
                    model.fit(xs_tr, y_tr)
                    assert deltas is not None  # allocated when banded
                    deltas[k] = bk.to_numpy(model.deltas_)
                    alphas_[k] = _snap(bk.to_numpy(model.best_alphas_), alphas)
                elif len(alphas) == 1:  # fixed α: no inner CV (data already centred)
                    model = Ridge(alpha=float(alphas[0]), fit_intercept=False,
                                  solver_params=dict(n_targets_batch=tb))
                    model.fit(xs_tr[0], y_tr)
                    alphas_[k] = alphas[0]
                elif inner_cv == "downdate":
                    chosen, coef, intercept = _ridge_cv_downdate(bk, xs_tr[0], y_tr, inner, alphas,
                                                                 n_targets_batch)
                    alphas_[k] = alphas[chosen]
                    model = None
                else:
                    model = RidgeCV(alphas=alphas, cv=inner, fit_intercept=True,
                                    solver_params=dict(n_targets_batch=tb, n_alphas_batch=ab))
                    model.fit(xs_tr[0], y_tr)
                    alphas_[k] = _snap(bk.to_numpy(model.best_alphas_), alphas)
            if model is not None:
                coef = np.asarray(bk.to_numpy(model.coef_), dtype=dtype)
                intercept = np.zeros(n_targets, dtype=dtype)
                if getattr(model, "fit_intercept", False):  # ~0: X and Y already centred on the training fold
                    intercept = np.asarray(bk.to_numpy(model.intercept_), dtype=dtype)
            x_te = xs_te[0] if len(xs_te) == 1 else np.concatenate(xs_te, axis=1)
            pred = (x_te @ coef + intercept).astype(np.float64) * y_std + y_mean
            if predictions is not None:
                predictions[test] = pred
            r_folds[k] = pearson_r(Y[test], pred)
            _add_moments(sums, Y[test], pred, shift)
            if return_coefs:
                coefs.append(coef)
            del model, xs_tr, xs_te, y_tr
    r = pearson_r(Y, predictions) if predictions is not None else _r_from_sums(sums[0], sums[1], sums[2], sums[3], sums[4], n_events)
    return EncodingResult(predictions=predictions, r=r, r_folds=r_folds, alphas_=alphas_, folds=folds,
                          coefs=coefs if return_coefs else None, deltas_=deltas,
                          r_pooled=_r_from_sums(0.0, sums[5], 0.0, sums[6], sums[7], n_events))


def cross_validated_ridge(X: np.ndarray, Y: np.ndarray, *, folds: int | Folds, alphas: Any = DEFAULT_ALPHAS,
                          inner_folds: int = 5, groups: Any = None, backend: str = "auto",
                          dtype: str = "float32", n_targets_batch: int | None = None,
                          n_alphas_batch: int | None = None, zscore_y: bool = False,
                          return_predictions: bool = True, return_coefs: bool = False,
                          inner_cv: InnerCV = "downdate") -> EncodingResult:
    """Out-of-fold ridge predictions of Y (events x targets) from X (events x features), α per target.

    ``folds``: (train, test) pairs whose test sets partition the events (e.g. :func:`blocked_folds`), or an
    int for ``blocked_folds(n_events, folds, groups)``. ``groups`` (one label per event) makes the inner folds
    leave groups out too (contiguous blocks otherwise). A single α skips the inner CV. ``dtype``: the solver's
    precision (``"float32"`` or ``"float64"``). ``n_targets_batch``: targets per batch (both inner CVs);
    ``n_alphas_batch``: himalaya's (``"refit"`` only); None: sized to keep temporaries near 1 GiB. Y may be
    1-D (one target). ``inner_cv``: ``"downdate"`` (default) the exact leave-one-block-out scores of every α
    from one eigendecomposition of the p x p Gram per inner block (see :func:`_ridge_cv_downdate`: ~n·p per
    α and target, as scikit-learn's leave-one-out); ``"refit"`` himalaya ``RidgeCV`` refitting every inner
    fold (the reference: same α and r up to rounding, several times slower). See the module docstring for
    the conventions.
    """
    X = _check_matrix(X, "X")
    Y, folds, groups, name, dt = _prepare(Y, folds, groups, inner_folds, dtype, backend, len(X))
    if inner_cv not in INNER_CV:
        raise ValueError(f"inner_cv must be one of {INNER_CV}, got {inner_cv!r}")
    return _fit_folds([X], Y, folds, groups, _check_alphas(alphas), inner_folds, name, dt, n_targets_batch,
                      n_alphas_batch, zscore_y, return_predictions, return_coefs, banded=None, inner_cv=inner_cv)


def cross_validated_banded_ridge(Xs: Sequence[np.ndarray], Y: np.ndarray, *, folds: int | Folds,
                                 alphas: Any = DEFAULT_ALPHAS, n_iter: int = 20,
                                 concentration: Sequence[float] = (0.1, 1.0), seed: int = 0,
                                 inner_folds: int = 5, groups: Any = None, backend: str = "auto",
                                 dtype: str = "float32", n_targets_batch: int | None = None,
                                 n_alphas_batch: int | None = None, zscore_y: bool = False,
                                 return_predictions: bool = True, return_coefs: bool = False) -> EncodingResult:
    """Banded ridge on feature bands ``Xs`` (e.g. [vision, language]): one regularisation per band and target.

    himalaya ``BandedRidgeCV`` (= ``GroupRidgeCV``), solver ``random_search``: ``n_iter`` band weightings
    drawn from a Dirichlet (``concentration``, seeded by ``seed``; the first is equal weights, i.e. plain ridge
    on the concatenation with α x n_bands), each crossed with the ``alphas`` grid, scored by the same inner
    blocked CV. Each band is z-scored separately with training statistics. ``alphas_`` is the overall α
    (1 / sum exp(deltas)), ``deltas_`` the per-band log scalings. Cost ~ ``n_iter`` plain ridge fits.
    """
    if isinstance(Xs, np.ndarray) or not isinstance(Xs, Sequence) or len(Xs) < 2:
        raise ValueError("Xs must be a list of at least 2 feature arrays (events x features), one per band")
    Xs = [_check_matrix(x, f"Xs[{i}]") for i, x in enumerate(Xs)]
    for i, x in enumerate(Xs[1:], 1):
        if len(x) != len(Xs[0]):
            raise ValueError(f"Xs[{i}] has {len(x)} events, Xs[0] has {len(Xs[0])}")
    n_iter = _check_int(n_iter, "n_iter", 1)
    Y, folds, groups, name, dt = _prepare(Y, folds, groups, inner_folds, dtype, backend, len(Xs[0]))
    conc = list(np.atleast_1d(np.asarray(concentration, dtype=np.float64)))
    if not conc or min(conc) <= 0:
        raise ValueError(f"concentration must be positive, got {concentration!r}")
    return _fit_folds(Xs, Y, folds, groups, _check_alphas(alphas), inner_folds, name, dt, n_targets_batch,
                      n_alphas_batch, zscore_y, return_predictions, return_coefs,
                      banded={"n_iter": n_iter, "concentration": conc, "seed": int(seed)})
