"""Cross-validated ridge encoding models against scikit-learn and brute-force numpy."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import Ridge

from neurovision.encoding.ridge import (
    blocked_folds,
    cross_validated_banded_ridge,
    cross_validated_ridge,
    pearson_r,
    zscore_fit,
)

GRID = np.logspace(-1, 5, 7)


@pytest.fixture(autouse=True)
def _one_blas_thread():
    """Tiny problems: BLAS threads only contend (tens of x slower on a loaded machine)."""
    import torch
    from threadpoolctl import threadpool_limits

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(n)


def _planted(rng: np.random.Generator, n: int = 300, p: int = 10, t: int = 20, noise: float = 1.0):
    """X (n, p); Y whose first t/2 targets are X @ W + noise (|W column|² = p) and the rest pure noise."""
    x = rng.normal(size=(n, p))
    y = rng.normal(scale=noise, size=(n, t))
    w = rng.normal(size=(p, t // 2))
    y[:, : t // 2] += x @ (w / np.linalg.norm(w, axis=0) * np.sqrt(p))  # signal variance p in every target
    return x, y


def _ridge_np(x: np.ndarray, y: np.ndarray, alpha: float) -> np.ndarray:
    return np.linalg.solve(x.T @ x + alpha * np.eye(x.shape[1]), x.T @ y)


# ------------------------------------------------------------------------------------------------ folds
def test_blocked_folds_contiguous_disjoint_cover() -> None:
    folds = blocked_folds(23, 5)
    assert len(folds) == 5
    tests = [te for _, te in folds]
    np.testing.assert_array_equal(np.concatenate(tests), np.arange(23))  # in order: never shuffled
    for tr, te in folds:
        assert np.all(np.diff(te) == 1)  # one contiguous block
        assert np.intersect1d(tr, te).size == 0
        np.testing.assert_array_equal(np.sort(np.concatenate([tr, te])), np.arange(23))
    assert {len(te) for te in tests} <= {4, 5}


def test_blocked_folds_leave_groups_out() -> None:
    groups = np.repeat(["m3", "m1", "m2", "m5", "m4", "m6"], [4, 3, 5, 2, 4, 3])
    folds = blocked_folds(len(groups), 4, groups=groups)
    assert len(folds) == 4
    seen = []
    for tr, te in folds:
        assert set(groups[te]).isdisjoint(groups[tr])  # whole groups held out
        seen.append(te)
    np.testing.assert_array_equal(np.concatenate(seen), np.arange(len(groups)))  # order of appearance
    # fewer groups than folds: one fold per group
    folds = blocked_folds(10, 5, groups=[0] * 4 + [1] * 6)
    assert [te.tolist() for _, te in folds] == [[0, 1, 2, 3], [4, 5, 6, 7, 8, 9]]


@pytest.mark.parametrize(("kwargs", "name"), [
    (dict(n_events=1), "n_events"), (dict(n_events=10, n_folds=1), "n_folds"),
    (dict(n_events=3, n_folds=5), "n_folds"), (dict(n_events=4, groups=[1, 1, 2]), "groups"),
    (dict(n_events=3, groups=[1, 1, 1]), "groups"),
])
def test_blocked_folds_rejects_bad_input(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        blocked_folds(**kwargs)


def test_zscore_fit_constant_columns_get_std_one(rng) -> None:
    x = np.column_stack([rng.normal(size=50), np.zeros(50), np.full(50, 0.1)])
    mean, std = zscore_fit(x)
    np.testing.assert_allclose(mean, x.mean(0))
    np.testing.assert_allclose(std, [x[:, 0].std(), 1.0, 1.0])


# ------------------------------------------------------------------------------------------------ ridge
def test_fixed_alpha_equals_sklearn_ridge(rng) -> None:
    """Acceptance test: our ridge at one α = scikit-learn Ridge(alpha) on the z-scored training fold."""
    x, y = _planted(rng, n=120, p=7, t=6)
    y += 3.0  # a non-zero mean: the intercept comes from centring Y with training statistics
    folds = blocked_folds(len(x), 4)
    res = cross_validated_ridge(x, y, folds=folds, alphas=[30.0], dtype="float64", backend="numpy",
                                return_coefs=True)
    ref = np.empty_like(y)
    for k, (tr, te) in enumerate(folds):
        mean, std = zscore_fit(x[tr])
        sk = Ridge(alpha=30.0).fit((x[tr] - mean) / std, y[tr])
        ref[te] = sk.predict((x[te] - mean) / std)
        np.testing.assert_allclose(res.coefs[k], sk.coef_.T, atol=1e-5)
        np.testing.assert_allclose(res.r_folds[k], pearson_r(y[te], ref[te]), atol=1e-5)
    np.testing.assert_allclose(res.predictions, ref, atol=1e-5)
    assert res.predictions.dtype == np.float32 and res.alphas_.shape == (4, 6) and np.all(res.alphas_ == 30.0)
    np.testing.assert_allclose(res.r, pearson_r(y, ref), atol=1e-5)
    # default float32 solver: same up to float32 rounding
    res32 = cross_validated_ridge(x, y, folds=folds, alphas=30.0, backend="numpy")
    np.testing.assert_allclose(res32.predictions, ref, rtol=1e-4, atol=1e-4)


def test_alpha_per_target_matches_brute_force_inner_cv(rng) -> None:
    x, y = _planted(rng, n=90, p=5, t=8, noise=2.0)
    y[:, 2] *= 40.0  # scale must not matter to the choice
    folds = blocked_folds(len(x), 3)
    res = cross_validated_ridge(x, y, folds=folds, alphas=GRID, inner_folds=4, dtype="float64", backend="numpy")
    for k, (tr, te) in enumerate(folds):
        mean, std = zscore_fit(x[tr])
        xt, yt = (x[tr] - mean) / std, y[tr] - y[tr].mean(0)
        mse = np.zeros((len(GRID), y.shape[1]))
        for itr, ite in blocked_folds(len(tr), 4):  # inner contiguous blocks over the training fold
            xm, ym = xt[itr].mean(0), yt[itr].mean(0)
            for a, alpha in enumerate(GRID):
                w = _ridge_np(xt[itr] - xm, yt[itr] - ym, alpha)
                mse[a] += ((yt[ite] - ym - (xt[ite] - xm) @ w) ** 2).mean(0) / 4
        best = GRID[mse.argmin(0)]
        np.testing.assert_array_equal(res.alphas_[k], best)
        pred = (x[te] - mean) / std @ np.column_stack([_ridge_np(xt, yt[:, [j]], best[j])[:, 0]
                                                      for j in range(y.shape[1])]) + y[tr].mean(0)
        np.testing.assert_allclose(res.predictions[te], pred, atol=1e-4)
    assert len(np.unique(res.alphas_)) > 1  # the test exercises a real per-target choice


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize(("n", "p", "grouped"), [
    (300, 10, False),   # n_block > p: the off-span projection of the residuals
    (150, 60, False),   # n_block < p < n_train: the held-out block's predictions directly
    (100, 200, False),  # p > n_train: the row space from one SVD, null directions of the inner Grams
    (240, 30, True),    # inner folds leave whole groups out
])
def test_downdate_inner_cv_equals_himalaya_refit(rng, n: int, p: int, grouped: bool, dtype: str) -> None:
    """Reference test of the default inner CV: the exact leave-one-block-out scores from Gram downdates choose
    the same α as himalaya RidgeCV refitting every inner fold, with r equal to 1e-5 (one constant target, one
    scaled by 100, noise targets whose α differ)."""
    x, y = _planted(rng, n=n, p=p, t=12, noise=2.0)
    x[:, 1:] += 0.5 * x[:, :-1]  # correlated features
    y[:, 4] *= 100.0
    y[:, 7] = 3.0
    groups = np.repeat(np.arange(8), n // 8) if grouped else None
    folds = blocked_folds(n, 4, groups=groups)
    kw = dict(folds=folds, groups=groups, backend="numpy", dtype=dtype, return_coefs=True)
    ref = cross_validated_ridge(x, y, inner_cv="refit", **kw)
    new = cross_validated_ridge(x, y, **kw)
    np.testing.assert_array_equal(new.alphas_, ref.alphas_)
    np.testing.assert_allclose(new.r, ref.r, atol=1e-5)
    np.testing.assert_allclose(new.r_folds, ref.r_folds, atol=1e-5)
    tol = 1e-6 if dtype == "float64" else 1e-4
    scale = np.abs(ref.predictions).max(0)
    np.testing.assert_allclose(new.predictions / scale, ref.predictions / scale, atol=tol)
    for a, b in zip(new.coefs, ref.coefs, strict=True):
        np.testing.assert_allclose(a / scale, b / scale, atol=tol)
    assert len(np.unique(new.alphas_)) > 2 and new.r[7] == 0.0  # a real per-target choice; constant -> r 0


@pytest.mark.parametrize(("n", "p"), [(400, 60), (100, 150)])
def test_downdate_inner_cv_ill_conditioned_features_float32(rng, n: int, p: int) -> None:
    """Features with a spectrum decaying over 3 decades (as network activations): the float32 Gram
    eigendecompositions still give himalaya's α (small ones included) and r to 1e-5."""
    q, _ = np.linalg.qr(rng.normal(size=(p, p)))
    x = rng.normal(size=(n, p)) * np.logspace(0, -3, p) @ q.T
    y = rng.normal(size=(n, 12))
    y[:, :6] += x @ rng.normal(size=(p, 6)) * 3
    ref = cross_validated_ridge(x, y, folds=4, backend="numpy", inner_cv="refit")
    new = cross_validated_ridge(x, y, folds=4, backend="numpy")
    np.testing.assert_array_equal(new.alphas_, ref.alphas_)
    np.testing.assert_allclose(new.r, ref.r, atol=1e-5)
    assert new.alphas_.min() < 10 and new.alphas_.max() > 1e3


def test_downdate_torch_backend_and_target_batches_agree(rng) -> None:
    x, y = _planted(rng, n=160, p=12, t=9)
    folds = blocked_folds(len(x), 4)
    ref = cross_validated_ridge(x, y, folds=folds, dtype="float64", backend="numpy")
    for kw in (dict(backend="torch"), dict(n_targets_batch=2)):
        res = cross_validated_ridge(x, y, folds=folds, dtype="float64", **{"backend": "numpy", **kw})
        np.testing.assert_array_equal(res.alphas_, ref.alphas_, err_msg=str(kw))
        np.testing.assert_allclose(res.predictions, ref.predictions, rtol=1e-5, atol=1e-5, err_msg=str(kw))
    with pytest.raises(ValueError, match="inner_cv"):
        cross_validated_ridge(x, y, folds=folds, backend="numpy", inner_cv="loo")


def test_planted_signal_recovered_noise_near_zero(rng) -> None:
    x, y = _planted(rng, n=300, p=10, t=20, noise=2.0)
    res = cross_validated_ridge(x, y, folds=5, backend="numpy")
    assert res.predictions.shape == y.shape and res.r_folds.shape == (5, 20) and res.alphas_.shape == (5, 20)
    assert res.r[:10].min() > 0.5
    # noise: r over all events is pulled to about -sqrt((n_folds - 1) / n) by the training-fold means
    assert np.abs(res.r[10:]).max() < 0.3 and -0.2 < res.r[10:].mean() < 0.05
    assert abs(res.r_folds[:, 10:].mean()) < 0.1
    np.testing.assert_allclose(res.r, pearson_r(y, res.predictions))
    assert res.alphas_[:, 10:].mean() > res.alphas_[:, :10].mean()  # noise targets shrink harder


def test_zscore_y_batches_and_torch_backend_agree(rng) -> None:
    x, y = _planted(rng, n=120, p=6, t=9)
    y *= np.linspace(0.5, 20, 9)
    folds = blocked_folds(len(x), 4)
    ref = cross_validated_ridge(x, y, folds=folds, dtype="float64", backend="numpy")
    for kw in (dict(zscore_y=True), dict(n_targets_batch=2, n_alphas_batch=3), dict(backend="torch")):
        res = cross_validated_ridge(x, y, folds=folds, dtype="float64", **{"backend": "numpy", **kw})
        np.testing.assert_array_equal(res.alphas_, ref.alphas_, err_msg=str(kw))
        np.testing.assert_allclose(res.predictions, ref.predictions, rtol=1e-5, atol=1e-4, err_msg=str(kw))
    assert cross_validated_ridge(x, y, folds=folds, backend="numpy", return_predictions=False).predictions is None


def test_groups_make_inner_folds_leave_groups_out(rng) -> None:
    x, y = _planted(rng, n=120, p=4, t=3)
    groups = np.repeat(np.arange(8), 15)
    folds = blocked_folds(120, 4, groups=groups)
    res = cross_validated_ridge(x, y, folds=folds, groups=groups, inner_folds=3, backend="numpy")
    assert res.r[:1].min() > 0.3 and len(res.folds) == 4


def test_banded_ridge_two_bands_at_least_as_good_as_concatenation(rng) -> None:
    n = 240
    x1 = rng.normal(size=(n, 4))   # few features, strong signal
    x2 = rng.normal(size=(n, 60))  # many features, weak signal: needs its own (heavier) shrinkage
    y = x1 @ rng.normal(size=(4, 12)) + 0.15 * x2 @ rng.normal(size=(60, 12)) + rng.normal(scale=2.0, size=(n, 12))
    folds = blocked_folds(n, 4)
    plain = cross_validated_ridge(np.hstack([x1, x2]), y, folds=folds, backend="numpy")
    banded = cross_validated_banded_ridge([x1, x2], y, folds=folds, n_iter=10, backend="numpy", seed=0)
    assert banded.deltas_.shape == (4, 2, 12) and banded.alphas_.shape == (4, 12)
    assert banded.r.mean() >= plain.r.mean() - 0.005
    assert np.median(banded.deltas_[:, 0] - banded.deltas_[:, 1]) > 0  # band 1 weighted up
    again = cross_validated_banded_ridge([x1, x2], y, folds=folds, n_iter=10, backend="numpy", seed=0)
    np.testing.assert_array_equal(again.predictions, banded.predictions)  # seeded


@pytest.mark.parametrize(("mutate", "name"), [
    (lambda x, y: (np.where(np.arange(x.size).reshape(x.shape) == 3, np.nan, x), y), "X"),
    (lambda x, y: (x, np.where(np.arange(y.size).reshape(y.shape) == 5, np.inf, y)), "Y"),
    (lambda x, y: (x, y[:-1]), "Y"),
    (lambda x, y: (x[:, :0], y), "X"),
])
def test_ridge_rejects_bad_arrays(rng, mutate, name: str) -> None:
    x, y = mutate(*_planted(rng, n=40, p=3, t=2))
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        cross_validated_ridge(x, y, folds=4, backend="numpy")


def test_ridge_rejects_bad_options(rng) -> None:
    x, y = _planted(rng, n=40, p=3, t=2)
    empty = [(np.arange(20, 40), np.arange(0, 20)), (np.arange(0, 20), np.array([], dtype=int))]
    for kwargs, name in [(dict(folds=empty), "folds"), (dict(folds=[(np.arange(10), np.arange(10, 40))]), "folds"),
                         (dict(folds=[(np.arange(20, 40), np.arange(0, 20))] * 2), "folds"),
                         (dict(folds=4, alphas=[-1.0, 1.0]), "alphas"), (dict(folds=4, backend="cupy"), "backend"),
                         (dict(folds=4, inner_folds=1), "inner_folds"), (dict(folds=4, dtype="float16"), "dtype"),
                         (dict(folds=4, n_targets_batch=0), "n_targets_batch")]:
        with pytest.raises(ValueError, match=name):
            cross_validated_ridge(x, y, backend=kwargs.pop("backend", "numpy"), **kwargs)
    with pytest.raises(ValueError, match=r"Xs\[1\]"):
        cross_validated_banded_ridge([x, x[:-1]], y, folds=4, backend="numpy")
    with pytest.raises(ValueError, match="Xs"):
        cross_validated_banded_ridge(x, y, folds=4, backend="numpy")


def test_fit_without_predictions_gives_the_same_r(rng, monkeypatch) -> None:
    """return_predictions=False holds no (events x targets) array: r over all events and the pooled within-fold
    r come from per-fold sums and equal those computed from the predictions (a constant target: r 0)."""
    import neurovision.encoding.ridge as ridge

    x, y = _planted(rng, n=240, t=12)
    y = y.astype(np.float32) + 50.0  # an offset the sums must not lose precision to
    y[:, 3] = 7.0
    folds = blocked_folds(240, 4)
    a = cross_validated_ridge(x, y, folds=folds, inner_folds=3, backend="numpy")
    monkeypatch.setattr(ridge, "_PEARSON_BUDGET", 8 * 2 * 60 * 5)  # 5 columns per chunk: the chunked path
    b = cross_validated_ridge(x, y, folds=folds, inner_folds=3, backend="numpy", return_predictions=False)
    assert b.predictions is None
    # a's r comes from its float32 predictions (resolution ~4e-6 at 50): tight where the predictions vary, loose
    # on the noise targets, whose predictions vary by ~1e-3 (large α)
    pooled = pearson_r(ridge.center_by_fold(y, folds), ridge.center_by_fold(a.predictions, folds))
    for want, got in ((a.r, b.r), (pooled, a.r_pooled)):
        np.testing.assert_allclose(got[:6], want[:6], atol=1e-6)
        np.testing.assert_allclose(got, want, atol=2e-3)
    np.testing.assert_allclose(b.r_pooled, a.r_pooled, atol=1e-12)
    assert a.r[3] == b.r[3] == a.r_pooled[3] == 0.0
    assert a.r_pooled[:6].mean() > 0.5 and not np.allclose(a.r_pooled, a.r)  # signal found; not the same r
    np.testing.assert_allclose(pearson_r(y, a.predictions), a.r, atol=1e-12)  # chunked = whole
