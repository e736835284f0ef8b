"""Bootstrap tests, BH-FDR and site calls of the encoding analysis against brute force and scipy."""

from __future__ import annotations

import os

import numpy as np
import pytest
from scipy.stats import false_discovery_control

from neurovision.encoding.ridge import (
    blocked_folds,
    cross_validated_banded_ridge,
    cross_validated_ridge,
    pearson_r,
)
from neurovision.encoding.stats import (
    bootstrap_indices,
    bootstrap_r,
    compare,
    fdr_bh,
    integration_sites,
    pairwise,
    significant_sites,
)


@pytest.fixture(autouse=True)
def _one_blas_thread():
    """Tiny problems: BLAS threads only contend (tens of x slower on a loaded machine)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        yield


# ------------------------------------------------------------------------------------------------ resampling
def test_bootstrap_indices_shape_range_and_seeding() -> None:
    idx = bootstrap_indices(50, n_boot=30, seed=3)
    assert idx.shape == (30, 50) and np.issubdtype(idx.dtype, np.integer)
    assert idx.min() >= 0 and idx.max() < 50
    np.testing.assert_array_equal(idx, bootstrap_indices(50, n_boot=30, seed=3))
    assert not np.array_equal(idx, bootstrap_indices(50, n_boot=30, seed=4))
    np.testing.assert_array_equal(bootstrap_indices(50, n_boot=10, seed=3), idx[:10])  # rows are nested
    assert np.mean([len(np.unique(row)) for row in idx]) < 40  # with replacement (~63 % unique)


def test_block_bootstrap_keeps_contiguous_runs() -> None:
    n, block = 53, 5
    idx = bootstrap_indices(n, n_boot=20, seed=0, block=block)
    assert idx.shape == (20, n)
    for row in idx:
        full = row[: n // block * block].reshape(-1, block)
        assert np.all(np.diff(full, axis=1) % n == 1)  # runs of consecutive events (circular)
    starts = idx[:, : n // block * block : block].ravel()
    assert len(np.unique(starts)) > n // 2  # starts are spread over the events


@pytest.mark.parametrize("suffix", [".npy", ".h5"])
def test_bootstrap_cache_is_reused_not_rewritten(tmp_path, suffix: str) -> None:
    path = tmp_path / "boot" / f"idx{suffix}"
    first = bootstrap_indices(40, n_boot=25, seed=1, block=2, cache=path)
    assert path.is_file() and sorted(os.listdir(path.parent)) == [path.name]  # no temp file left
    stat = path.stat()
    again = bootstrap_indices(40, n_boot=25, seed=1, block=2, cache=path)
    np.testing.assert_array_equal(again, first)
    assert path.stat().st_mtime_ns == stat.st_mtime_ns and path.stat().st_ino == stat.st_ino
    for kwargs in (dict(n_boot=26, seed=1, block=2), dict(n_boot=25, seed=2, block=2),
                   dict(n_boot=25, seed=1, block=3)):
        with pytest.raises(ValueError, match="cache"):
            bootstrap_indices(40, cache=path, **kwargs)
    assert path.stat().st_mtime_ns == stat.st_mtime_ns


def test_bootstrap_indices_reject_bad_input(tmp_path) -> None:
    for kwargs, name in [(dict(n_events=1), "n_events"), (dict(n_events=10, n_boot=0), "n_boot"),
                         (dict(n_events=10, block=11), "block"), (dict(n_events=10, seed=-1), "seed"),
                         (dict(n_events=10, cache=tmp_path / "x.txt"), "cache")]:
        with pytest.raises(ValueError, match=name):
            bootstrap_indices(**kwargs)


def test_bootstrap_r_equals_loop_over_resamples(rng) -> None:
    y = rng.normal(size=(60, 7)) + 10.0
    yhat = y + rng.normal(scale=2.0, size=y.shape)
    yhat[:, 3] = 1.0  # constant prediction: r = 0
    idx = bootstrap_indices(60, n_boot=40, seed=0, block=3)
    got = bootstrap_r(y, yhat, idx, batch=7)
    want = np.stack([pearson_r(y[i], yhat[i]) for i in idx])
    np.testing.assert_allclose(got, want, atol=1e-10)
    assert np.all(got[:, 3] == 0)
    np.testing.assert_allclose(bootstrap_r(y, yhat, idx, batch=16, device="cpu"), got, atol=1e-12)  # torch path


def test_compare_p_value_formula(rng) -> None:
    y = rng.normal(size=(120, 5))
    a = y + rng.normal(scale=0.5, size=y.shape)
    b = y + rng.normal(scale=3.0, size=y.shape)
    idx = bootstrap_indices(120, n_boot=99, seed=0)
    res = compare(y, a, b, idx)
    d = np.stack([pearson_r(y[i], a[i]) - pearson_r(y[i], b[i]) for i in idx])
    np.testing.assert_allclose(res["p"], (1 + (d <= 0).sum(0)) / 100)
    np.testing.assert_allclose(res["dr"], pearson_r(y, a) - pearson_r(y, b))
    assert res["p"].max() <= 0.05  # a is much better: (almost) no resample reverses it
    assert np.all(compare(y, a, a, idx)["p"] == 1.0)  # identical models: never better


# ------------------------------------------------------------------------------------------------ FDR, sites
def test_fdr_bh_equals_scipy(rng) -> None:
    p = np.concatenate([rng.uniform(size=200), rng.uniform(0, 1e-3, size=30), [0.0, 1.0, 0.5, 0.5]])
    p = rng.permutation(p).reshape(13, 18)
    reject, adj = fdr_bh(p, q=0.05)
    assert reject.shape == adj.shape == p.shape
    np.testing.assert_allclose(adj, false_discovery_control(p.ravel(), method="bh").reshape(p.shape), rtol=1e-12)
    np.testing.assert_array_equal(reject, adj <= 0.05)
    # classic step-up definition: reject the k smallest, k = max{i: p_(i) <= i q / m}
    s = np.sort(p.ravel())
    k = np.max(np.flatnonzero(s <= np.arange(1, s.size + 1) * 0.05 / s.size)) + 1
    assert reject.sum() == k >= 30
    for bad, name in [(np.array([0.1, np.nan]), "p"), (np.array([1.2]), "p")]:
        with pytest.raises(ValueError, match=name):
            fdr_bh(bad)
    with pytest.raises(ValueError, match="q"):
        fdr_bh(p, q=0)


def test_significant_sites_min_bins_and_contiguity() -> None:
    reject = np.array([[1, 0, 1, 0], [1, 1, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0], [0, 1, 1, 1]], dtype=bool)
    np.testing.assert_array_equal(significant_sites(reject, 1), [1, 1, 1, 0, 1])
    np.testing.assert_array_equal(significant_sites(reject, 2), [1, 1, 0, 0, 1])
    np.testing.assert_array_equal(significant_sites(reject, 2, contiguous=True), [0, 1, 0, 0, 1])
    np.testing.assert_array_equal(significant_sites(reject, 3, contiguous=True), [0, 0, 0, 0, 1])
    with pytest.raises(ValueError, match="min_bins"):
        significant_sites(reject, 5)
    with pytest.raises(ValueError, match="reject"):
        significant_sites(reject.astype(int), 1)


# ------------------------------------------------------------------------------------------------ calls
def test_pairwise_null_calibration(rng) -> None:
    n, sites, bins = 300, 40, 3
    idx = bootstrap_indices(n, n_boot=200, seed=0)
    signal = rng.normal(size=(n, sites * bins))
    y = signal + rng.normal(scale=2.0, size=signal.shape)
    equally_related = {"a": signal + rng.normal(size=signal.shape), "b": signal + rng.normal(size=signal.shape)}
    unrelated = {"a": rng.normal(size=signal.shape), "b": rng.normal(size=signal.shape)}
    for preds in (equally_related, unrelated):
        for min_bins in (1, 2):
            df = pairwise("a", "b", y, preds, idx, n_bins=bins, min_bins=min_bins)
            assert len(df) == sites and df["significant"].mean() <= 0.05
    p = compare(y, equally_related["a"], equally_related["b"], idx)["p"]
    assert 0.0 < np.mean(p < 0.05) < 0.12  # uncorrected p is roughly uniform under the null
    # a really better model is called at (nearly) every site
    better = {"a": signal, "b": equally_related["b"]}
    df = pairwise("a", "b", y.reshape(n, sites, bins), better, idx, min_bins=2)
    assert df["significant"].mean() > 0.9 and (df["dr"] > 0).all()
    assert list(df.columns) == ["r_a", "r_b", "dr", "dr_peak", "n_sig_bins", "significant"]


def test_integration_sites_planted_interaction(rng) -> None:
    """Only the multimodal features (which include vision x language products) predict the interaction."""
    n, sites, bins = 300, 40, 3
    v, lang = rng.normal(size=(n, 4)), rng.normal(size=(n, 4))
    kinds = np.array(["interaction"] * 10 + ["linear"] * 10 + ["noise"] * 20)
    per_target = np.repeat(kinds, bins)
    linear = 0.5 * (v @ rng.normal(size=(4, sites * bins)) + lang @ rng.normal(size=(4, sites * bins)))
    y = rng.normal(size=(n, sites * bins))
    y[:, per_target != "noise"] += linear[:, per_target != "noise"]
    inter = per_target == "interaction"
    y[:, inter] += 0.7 * (v * lang) @ rng.normal(size=(4, inter.sum()))
    folds = blocked_folds(n, 5)
    feats = {"multimodal": np.hstack([v, lang, v * lang]), "vision": v, "language": lang}
    preds = {k: cross_validated_ridge(x, y, folds=folds, backend="numpy").predictions for k, x in feats.items()}
    preds["linear"] = cross_validated_banded_ridge([v, lang], y, folds=folds, n_iter=5, backend="numpy").predictions
    idx = bootstrap_indices(n, n_boot=200, seed=0)
    df = integration_sites(y.reshape(n, sites, bins), preds, idx, min_bins=2, site_names=[f"e{i}" for i in range(40)])
    assert df.index[0] == "e0" and df["integration"].dtype == bool
    for b in ("vision", "language", "linear"):
        assert {f"dr_multimodal>{b}", f"n_sig_bins_multimodal>{b}", f"sig_multimodal>{b}"} <= set(df.columns)
    called = df["integration"].to_numpy()
    assert called[kinds == "interaction"].all()
    assert not called[kinds != "interaction"].any()
    assert df["sig_multimodal>vision"][kinds == "linear"].all()  # beats one modality, not their combination
    # null: nothing relates to y
    null = {k: rng.normal(size=y.shape) for k in ("multimodal", "vision", "language", "linear")}
    df = integration_sites(rng.normal(size=y.shape), null, idx, n_bins=bins)
    assert df["integration"].mean() <= 0.05


def test_stats_reject_bad_input(rng) -> None:
    y = rng.normal(size=(30, 6))
    idx = bootstrap_indices(30, n_boot=10)
    preds = {"a": y.copy(), "b": y.copy()}
    with pytest.raises(ValueError, match="yhat"):
        bootstrap_r(y, y[:, :5], idx)
    with pytest.raises(ValueError, match="idx"):
        bootstrap_r(y, y, idx[:, :20])
    with pytest.raises(ValueError, match="idx"):
        bootstrap_r(y, y, idx + 30)
    with pytest.raises(ValueError, match="^y"):
        compare(np.where(y > 1, np.nan, y), y, y, idx)
    with pytest.raises(ValueError, match="n_bins"):
        pairwise("a", "b", y, preds, idx, n_bins=4)
    with pytest.raises(ValueError, match="predictions"):
        pairwise("a", "c", y, preds, idx)
    with pytest.raises(ValueError, match="baselines"):
        integration_sites(y, preds, idx, multimodal="a", baselines="b")


def test_integration_sites_memory_grows_with_targets_not_events_x_targets(rng, monkeypatch) -> None:
    """Peak memory of the statistics: no float64 (or bool) copy of the (events x targets) inputs; what remains is
    the bootstrap r (models x n_boot x targets float64) and budget-sized chunks (budgets shrunk to 4 MB here)."""
    import tracemalloc

    import neurovision.encoding.ridge as ridge
    import neurovision.encoding.stats as stats

    budget = 4 << 20
    monkeypatch.setattr(stats, "_TARGET_BUDGET", budget)
    monkeypatch.setattr(ridge, "_PEARSON_BUDGET", budget)
    n, n_sites, n_bins, n_boot = 4000, 50, 20, 20
    y = rng.standard_normal((n, n_sites * n_bins), dtype=np.float32)
    preds = {k: y + rng.standard_normal(y.shape, dtype=np.float32) * s
             for k, s in (("multimodal", 1.0), ("vision", 2.0), ("language", 2.0), ("linear", 2.0))}
    idx = bootstrap_indices(n, n_boot)
    tracemalloc.start()
    try:
        df = integration_sites(y, preds, idx, n_bins=n_bins, batch=10, p_value="normal")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert df["integration"].mean() > 0.9  # it did the work
    boot = 4 * n_boot * y.shape[1] * 8
    print(f"peak {peak / 2**20:.1f} MiB, bootstrap r {boot / 2**20:.1f} MiB")
    assert peak < boot + 3 * budget < y.nbytes * 2 / 2  # a float64 copy of y: 32 MB
