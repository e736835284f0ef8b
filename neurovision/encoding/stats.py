"""Bootstrap tests between encoding models, Benjamini–Hochberg FDR and site calls (Subramaniam et al., ICML 2024).

Protocol: one set of bootstrap resamples of the events (:func:`bootstrap_indices`, cached) is shared by every
comparison. For each target (site x time bin), Pearson r of each model's out-of-fold predictions is recomputed
on every resample; "model a beats model b" gets the one-sided p = (1 + #{r_a - r_b <= 0}) / (1 + n_boot).
p-values are BH-corrected over all sites x bins of one comparison, and a site is called when at least
``min_bins`` of its bins survive (optionally contiguous). An integration site is one where the multimodal
model beats each of vision, language and their linear (banded ridge) combination.

Layout: targets are (n_events, n_sites, n_bins), or (n_events, n_sites * n_bins) with ``n_bins`` given and
target = site * n_bins + bin (i.e. ``y.reshape(n_events, n_sites, n_bins)``).
The smallest possible empirical p is 1 / (1 + n_boot): with m tests BH needs p <= q k / m for k discoveries, so
k discoveries need n_boot >= m / (q k) -- with 1000 resamples and 161 bins x 24 sites at q = 0.05, at least 77
bins must reach the floor before any is called. ``p_value="normal"`` (a bootstrap z-test: Φ(-Δr / sd of the
bootstrap Δr)) has no floor.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from neurovision.data.atomic import atomic_path
from neurovision.encoding.ridge import pearson_r

_H5_DATASET = "indices"
_TARGET_BUDGET = 256 << 20  # bytes of float64 moments held per target chunk in bootstrap_r


# ------------------------------------------------------------------------------------------------ resampling
def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _bootstrap_row(n_events: int, seed: int, block: int, row: int) -> np.ndarray:
    """Resample ``row``: its own stream (SeedSequence(seed) child ``row``), so any row can be regenerated."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(row,)))
    if block == 1:
        return rng.integers(0, n_events, n_events)
    starts = rng.integers(0, n_events, -(-n_events // block))
    return ((starts[:, None] + np.arange(block)) % n_events).ravel()[:n_events]


def _generate(n_events: int, n_boot: int, seed: int, block: int) -> np.ndarray:
    dtype = np.int32 if n_events < 2**31 else np.int64
    out = np.empty((n_boot, n_events), dtype=dtype)
    for b in range(n_boot):
        out[b] = _bootstrap_row(n_events, seed, block, b)
    return out


def _read_cache(path: Path, n_events: int, n_boot: int, seed: int, block: int) -> np.ndarray:
    asked = {"n_events": n_events, "n_boot": n_boot, "seed": seed, "block": block}
    hint = "delete it or pass another cache path"
    try:
        if path.suffix == ".npy":
            idx = np.load(path, allow_pickle=False)
            held = None
        else:
            import h5py

            with h5py.File(path, "r") as f:
                idx = f[_H5_DATASET][()]
                held = {k: int(f[_H5_DATASET].attrs[k]) for k in asked}
    except (OSError, KeyError, ValueError) as e:
        raise ValueError(f"cache {path} is not a readable bootstrap-index file ({e}); {hint}") from e
    if held is not None and held != asked:
        raise ValueError(f"cache {path} holds bootstrap indices for {held}, asked for {asked}; {hint}")
    if idx.shape != (n_boot, n_events) or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"cache {path} holds an array {idx.dtype} {idx.shape}, asked for {asked} "
                         f"(shape ({n_boot}, {n_events})); {hint}")
    if not np.array_equal(idx[0], _bootstrap_row(n_events, seed, block, 0)):  # seed / block of a .npy
        raise ValueError(f"cache {path} was drawn with another seed or block than {asked}; {hint}")
    return idx


def _write_cache(path: Path, idx: np.ndarray, n_events: int, n_boot: int, seed: int, block: int) -> None:
    with atomic_path(path) as tmp:
        if path.suffix == ".npy":
            with open(tmp, "wb") as f:  # a file object: np.save(<name>) would append ".npy"
                np.save(f, idx)
        else:
            import h5py

            with h5py.File(tmp, "w") as f:
                d = f.create_dataset(_H5_DATASET, data=idx)
                d.attrs.update({"n_events": n_events, "n_boot": n_boot, "seed": seed, "block": block,
                                "scheme": "numpy SeedSequence(seed) child per row; circular block bootstrap"})


def bootstrap_indices(n_events: int, n_boot: int = 1000, seed: int = 0, block: int = 1,
                      cache: str | os.PathLike[str] | None = None) -> np.ndarray:
    """(n_boot, n_events) event indices resampled with replacement (int32 unless huge).

    ``block == 1``: events drawn independently. ``block > 1``: circular moving-block bootstrap, runs of
    ``block`` consecutive events (wrapping at the end) from uniform starts, truncated to ``n_events``. Row b
    depends only on (n_events, seed, block, b), so the first rows of a larger draw equal a smaller draw.
    ``cache`` (``.npy`` or ``.h5``/``.hdf5``): read when present, else drawn and written atomically. A cache
    drawn with other parameters raises a ValueError naming it (checked from the h5 attributes, or for ``.npy``
    from the shape and a regenerated first row).
    """
    n_events = _check_int(n_events, "n_events", 2)
    n_boot = _check_int(n_boot, "n_boot", 1)
    seed = _check_int(seed, "seed", 0)
    block = _check_int(block, "block", 1)
    if block > n_events:
        raise ValueError(f"block ({block}) exceeds n_events ({n_events})")
    if cache is None:
        return _generate(n_events, n_boot, seed, block)
    path = Path(cache)
    if path.suffix not in (".npy", ".h5", ".hdf5"):
        raise ValueError(f"cache must end in .npy, .h5 or .hdf5, got {path}")
    if path.exists():
        return _read_cache(path, n_events, n_boot, seed, block)
    idx = _generate(n_events, n_boot, seed, block)
    _write_cache(path, idx, n_events, n_boot, seed, block)
    return idx


# ------------------------------------------------------------------------------------------------ bootstrap r
def _n_not_finite(a: np.ndarray) -> int:
    """Number of NaN / inf entries of a 2-D array, over row blocks (no (n_events, n_targets) bool temporary)."""
    if not np.issubdtype(a.dtype, np.floating):
        return 0
    rows = int(max(1, _TARGET_BUDGET // 8 // max(a.shape[1] * a.dtype.itemsize, 1)))
    return sum(int(a.shape[1] * min(rows, len(a) - r0) - np.isfinite(a[r0:r0 + rows]).sum())
               for r0 in range(0, len(a), rows))


def _check_targets(a: Any, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2 or 0 in a.shape:
        raise ValueError(f"{name} must be a non-empty (n_events, n_targets) array, got shape {a.shape}")
    bad = _n_not_finite(a)
    if bad:
        raise ValueError(f"{name} holds NaN or inf ({bad} entries)")
    if shape is not None and a.shape != shape:
        raise ValueError(f"{name} has shape {a.shape}, expected {shape} (as y)")
    return a


def _check_idx(idx: Any, n_events: int) -> np.ndarray:
    idx = np.asarray(idx)
    if idx.ndim != 2 or idx.shape[1] != n_events or idx.shape[0] == 0 or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"idx must be (n_boot, {n_events}) integer indices, got {idx.dtype} {idx.shape}")
    if idx.min() < 0 or idx.max() >= n_events:
        raise ValueError(f"idx holds indices outside [0, {n_events})")
    return idx


def _standardise(a: np.ndarray) -> np.ndarray:
    """Columns centred and scaled (r is invariant; keeps the moment sums well conditioned)."""
    a = np.asarray(a, dtype=np.float64)
    a = a - a.mean(axis=0)
    s = a.std(axis=0)
    return a / np.where(s > 0, s, 1.0)


def _counts(idx: np.ndarray) -> np.ndarray:
    """(b, n) float64 multiplicity of each event in each resample."""
    b, n = idx.shape
    flat = (idx.astype(np.int64) + (np.arange(b, dtype=np.int64) * n)[:, None]).ravel()
    return np.bincount(flat, minlength=b * n).reshape(b, n).astype(np.float64)


def _boot_r_many(y: np.ndarray, yhats: Sequence[np.ndarray], idx: np.ndarray, batch: int,
                 device: str | None) -> list[np.ndarray]:
    """Bootstrap r (n_boot, n_targets) of each prediction in ``yhats`` against ``y``, sharing the y moments.

    r on a resample = weighted Pearson r with the event multiplicities C as weights: the sums Σ c y, Σ c y²,
    Σ c ŷ, Σ c ŷ², Σ c y ŷ are matrix products C @ (...), computed in float64 (numpy, or torch on ``device``).
    """
    n, t = y.shape
    n_boot = len(idx)
    m = len(yhats)
    outs = [np.empty((n_boot, t)) for _ in range(m)]
    chunk = int(max(1, min(t, _TARGET_BUDGET // (8 * n * (2 + 3 * m)))))
    if device is not None:
        import torch

        dev = torch.device(device)
    for t0 in range(0, t, chunk):
        sl = slice(t0, t0 + chunk)
        ys = _standardise(y[:, sl])
        w = ys.shape[1]
        mats = np.empty((n, (2 + 3 * m) * w))  # [y, y², (ŷ, ŷ², y ŷ) per model], filled without copies
        mats[:, :w] = ys
        np.multiply(ys, ys, out=mats[:, w:2 * w])
        for j, p in enumerate(yhats):
            o = 2 * w + 3 * j * w
            ps = _standardise(p[:, sl])
            mats[:, o:o + w] = ps
            np.multiply(ps, ps, out=mats[:, o + w:o + 2 * w])
            np.multiply(ys, ps, out=mats[:, o + 2 * w:o + 3 * w])
            del ps
        if device is not None:
            mats_d = torch.from_numpy(mats).to(dev)
        for b0 in range(0, n_boot, batch):
            c = _counts(idx[b0:b0 + batch])
            if device is not None:
                s = (torch.from_numpy(c).to(dev) @ mats_d).cpu().numpy()
            else:
                s = c @ mats
            sy, syy = s[:, :w], s[:, w:2 * w]
            vy = syy - sy * sy / n
            for j in range(m):
                o = 2 * w + 3 * j * w
                sp, spp, syp = s[:, o:o + w], s[:, o + w:o + 2 * w], s[:, o + 2 * w:o + 3 * w]
                cov = syp - sy * sp / n
                den = vy * (spp - sp * sp / n)
                ok = den > 1e-12 * n * n
                outs[j][b0:b0 + batch, sl] = np.where(ok, cov / np.sqrt(np.where(ok, den, 1.0)), 0.0)
    return outs


def bootstrap_r(y: np.ndarray, yhat: np.ndarray, idx: np.ndarray, batch: int = 100,
                device: str | None = None) -> np.ndarray:
    """Pearson r (n_boot, n_targets) between ``y`` and ``yhat`` (n_events, n_targets) on each resample ``idx``.

    Vectorised as matrix products of the (batch, n_events) resample multiplicities with the moments of y and
    yhat; ``batch`` resamples at a time (and targets in chunks) bound the memory. ``device`` (e.g. ``"cuda"``)
    does the products with torch. 0 where a resample makes y or yhat constant.
    """
    y = _check_targets(y, "y")
    yhat = _check_targets(yhat, "yhat", y.shape)
    idx = _check_idx(idx, len(y))
    batch = _check_int(batch, "batch", 1)
    return _boot_r_many(y, [yhat], idx, batch, device)[0]


P_VALUES = ("empirical", "normal")


def _one_sided(r_a: np.ndarray, r_b: np.ndarray, boot_a: np.ndarray, boot_b: np.ndarray,
               p_value: str = "empirical") -> dict[str, np.ndarray]:
    """One-sided p of r_a > r_b. ``empirical``: (1 + #{boot Δr <= 0}) / (1 + n_boot); ``normal``: the bootstrap
    z-test, Φ(-Δr / sd of the bootstrap Δr), which has no floor at 1 / (1 + n_boot) (see the module docstring)."""
    d = boot_a - boot_b
    dr = r_a - r_b
    if p_value == "empirical":
        p = (1.0 + (d <= 0).sum(axis=0)) / (1.0 + len(d))
    elif p_value == "normal":
        from scipy.stats import norm

        se = d.std(axis=0, ddof=1) if len(d) > 1 else np.zeros_like(dr)
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.where(se > 0, dr / np.where(se > 0, se, 1.0), np.where(dr > 0, np.inf, -np.inf))
        p = norm.sf(z)
    else:
        raise ValueError(f"p_value must be one of {P_VALUES}, got {p_value!r}")
    return {"r_a": r_a, "r_b": r_b, "dr": dr, "p": p}


def compare(y: np.ndarray, yhat_a: np.ndarray, yhat_b: np.ndarray, idx: np.ndarray, batch: int = 100,
            device: str | None = None, p_value: str = "empirical") -> dict[str, np.ndarray]:
    """Per target, does a predict y better than b? One-sided bootstrap test on the same resamples ``idx``.

    Returns ``r_a``, ``r_b`` (observed r over all events), ``dr`` = r_a - r_b and
    ``p`` = (1 + #{boot: r_a - r_b <= 0}) / (1 + n_boot), each (n_targets,).
    """
    y = _check_targets(y, "y")
    yhat_a = _check_targets(yhat_a, "yhat_a", y.shape)
    yhat_b = _check_targets(yhat_b, "yhat_b", y.shape)
    idx = _check_idx(idx, len(y))
    batch = _check_int(batch, "batch", 1)
    boot_a, boot_b = _boot_r_many(y, [yhat_a, yhat_b], idx, batch, device)
    return _one_sided(pearson_r(y, yhat_a), pearson_r(y, yhat_b), boot_a, boot_b, p_value)


# ------------------------------------------------------------------------------------------------ FDR, sites
def fdr_bh(p: Any, q: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Benjamini–Hochberg over all entries of ``p`` (any shape): (reject, p_adjusted), both shaped like p.

    ``p_adjusted`` is ``scipy.stats.false_discovery_control(p, axis=None, method="bh")`` reshaped like ``p``;
    reject = p_adjusted <= q. NaN, Inf or values outside [0, 1] are a ``ValueError`` (never silently dropped).
    """
    from scipy.stats import false_discovery_control

    p = np.asarray(p, dtype=np.float64)
    if not 0 < q <= 1:
        raise ValueError(f"q must be in (0, 1], got {q!r}")
    if p.size and (not np.isfinite(p).all() or p.min() < 0 or p.max() > 1):
        raise ValueError("p must hold finite values in [0, 1]")
    adj = np.asarray(false_discovery_control(p, axis=None, method="bh"), dtype=np.float64).reshape(p.shape)
    return adj <= q, adj


def significant_sites(reject: Any, min_bins: int = 1, contiguous: bool = False) -> np.ndarray:
    """(n_sites,) bool: at least ``min_bins`` of the site's bins in ``reject`` (n_sites, n_bins) are True
    (``contiguous``: in one run of consecutive bins)."""
    reject = np.asarray(reject)
    if reject.ndim != 2 or reject.dtype != bool:
        raise ValueError(f"reject must be a (n_sites, n_bins) bool array, got {reject.dtype} {reject.shape}")
    min_bins = _check_int(min_bins, "min_bins", 1)
    if min_bins > reject.shape[1]:
        raise ValueError(f"min_bins ({min_bins}) exceeds the number of bins ({reject.shape[1]})")
    if not contiguous:
        return reject.sum(axis=1) >= min_bins
    run = np.zeros(len(reject), dtype=np.int64)
    best = np.zeros(len(reject), dtype=np.int64)
    for b in range(reject.shape[1]):
        run = (run + 1) * reject[:, b]
        best = np.maximum(best, run)
    return best >= min_bins


def _layout(y: Any, n_bins: int | None) -> tuple[np.ndarray, int, int]:
    y = np.asarray(y)
    if y.ndim == 3:
        if n_bins is not None and n_bins != y.shape[2]:
            raise ValueError(f"n_bins ({n_bins}) disagrees with y's shape {y.shape}")
        return y.reshape(len(y), -1), y.shape[1], y.shape[2]
    if y.ndim != 2:
        raise ValueError(f"y must be (n_events, n_sites, n_bins) or (n_events, n_targets), got shape {y.shape}")
    n_bins = 1 if n_bins is None else _check_int(n_bins, "n_bins", 1)
    if y.shape[1] % n_bins:
        raise ValueError(f"n_bins ({n_bins}) does not divide y's {y.shape[1]} targets")
    return y, y.shape[1] // n_bins, n_bins


def _models(predictions: Mapping[str, Any], names: Sequence[str], y2: np.ndarray, n_bins: int) -> list[np.ndarray]:
    out = []
    for name in names:
        if name not in predictions:
            raise ValueError(f"predictions has no model {name!r} (has {sorted(predictions)})")
        p = np.asarray(predictions[name])
        p = p.reshape(len(p), -1) if p.ndim == 3 else p
        out.append(_check_targets(p, f"predictions[{name!r}]", y2.shape))
    return out


def _site_table(tests: dict[str, dict[str, np.ndarray]], r: dict[str, np.ndarray], n_sites: int, n_bins: int,
                q: float, min_bins: int, contiguous: bool, site_names: Any, prefix: bool) -> Any:
    import pandas as pd

    index = pd.Index(np.arange(n_sites) if site_names is None else list(site_names), name="site")
    if len(index) != n_sites:
        raise ValueError(f"site_names has {len(index)} names for {n_sites} sites")
    cols: dict[str, np.ndarray] = {f"r_{k}": v.reshape(n_sites, n_bins).mean(axis=1) for k, v in r.items()}
    for label, res in tests.items():
        reject, _ = fdr_bh(res["p"].reshape(n_sites, n_bins), q)
        dr = res["dr"].reshape(n_sites, n_bins)
        s = f"_{label}" if prefix else ""
        cols[f"dr{s}"] = dr.mean(axis=1)
        cols[f"dr_peak{s}"] = dr.max(axis=1)
        cols[f"n_sig_bins{s}"] = reject.sum(axis=1)
        cols[f"sig_{label}" if prefix else "significant"] = significant_sites(reject, min_bins, contiguous)
    return pd.DataFrame(cols, index=index)


def pairwise(name_a: str, name_b: str, y: Any, predictions: Mapping[str, Any], idx: np.ndarray, *,
             n_bins: int | None = None, q: float = 0.05, min_bins: int = 1, contiguous: bool = False,
             batch: int = 100, device: str | None = None, site_names: Any = None,
             p_value: str = "empirical") -> Any:
    """Sites where model ``name_a`` predicts better than ``name_b`` (e.g. trained vs random, SLIP vs SimCLR).

    ``predictions`` maps model names to out-of-fold predictions shaped like ``y`` (see the module docstring
    for the layout). BH-FDR at ``q`` over all sites x bins, then the ``min_bins`` rule. Returns a DataFrame, one
    row per site (index ``site``): ``r_<a>``, ``r_<b>`` (mean r over bins), ``dr`` (mean Δr over bins),
    ``dr_peak`` (max Δr over bins), ``n_sig_bins`` (bins surviving FDR), ``significant``.
    """
    y2, n_sites, n_bins = _layout(y, n_bins)
    y2 = _check_targets(y2, "y")
    pa, pb = _models(predictions, [name_a, name_b], y2, n_bins)
    idx = _check_idx(idx, len(y2))
    batch = _check_int(batch, "batch", 1)
    ba, bb = _boot_r_many(y2, [pa, pb], idx, batch, device)
    r = {name_a: pearson_r(y2, pa), name_b: pearson_r(y2, pb)}
    test = _one_sided(r[name_a], r[name_b], ba, bb, p_value)
    return _site_table({f"{name_a}>{name_b}": test}, r, n_sites, n_bins, q, min_bins, contiguous, site_names,
                       prefix=False)


def integration_sites(y: Any, predictions: Mapping[str, Any], idx: np.ndarray, *, n_bins: int | None = None,
                      multimodal: str = "multimodal", baselines: Sequence[str] = ("vision", "language", "linear"),
                      q: float = 0.05, min_bins: int = 1, contiguous: bool = False, batch: int = 100,
                      device: str | None = None, site_names: Any = None, p_value: str = "empirical") -> Any:
    """Integration sites: the ``multimodal`` model beats EACH of ``baselines`` significantly.

    One bootstrap test per baseline on the shared resamples ``idx``, each BH-corrected at ``q`` over all
    sites x bins, then the ``min_bins`` rule. Returns a DataFrame, one row per site: ``r_<model>`` (mean r over
    bins) for every model, and per baseline b (label ``<multimodal>>b``) ``dr_<label>``, ``dr_peak_<label>``,
    ``n_sig_bins_<label>``, ``sig_<label>``; ``integration`` = all ``sig_`` columns.
    """
    if isinstance(baselines, str) or len(baselines) == 0:
        raise ValueError(f"baselines must be a non-empty list of model names, got {baselines!r}")
    y2, n_sites, n_bins = _layout(y, n_bins)
    y2 = _check_targets(y2, "y")
    names = [multimodal, *baselines]
    preds = _models(predictions, names, y2, n_bins)
    idx = _check_idx(idx, len(y2))
    batch = _check_int(batch, "batch", 1)
    boots = _boot_r_many(y2, preds, idx, batch, device)
    r = {name: pearson_r(y2, p) for name, p in zip(names, preds, strict=True)}
    tests = {f"{multimodal}>{b}": _one_sided(r[multimodal], r[b], boots[0], boots[k], p_value)
             for k, b in enumerate(baselines, 1)}
    df = _site_table(tests, r, n_sites, n_bins, q, min_bins, contiguous, site_names, prefix=True)
    df["integration"] = np.logical_and.reduce([df[f"sig_{label}"].to_numpy() for label in tests])
    return df
