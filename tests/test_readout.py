"""The voxel read-out beside the ViT3D: full rank, and through a fitted principal subspace."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neurovision.models import VoxelReadout


def _low_rank(n: int, d: int, k: int, noise: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))
    scores = torch.randn(n, k, generator=g, dtype=torch.float64) * torch.linspace(5, 2, k, dtype=torch.float64)
    x = scores @ basis.T + noise * torch.randn(n, d, generator=g, dtype=torch.float64) + 3.0
    return x.float(), basis


@pytest.mark.parametrize("n,d", [(80, 300), (300, 40)])  # Gram path (n <= d) and covariance path (n > d)
def test_fit_matches_sklearn_pca_and_whitens(n, d):
    from sklearn.decomposition import PCA

    x, _ = _low_rank(n, d, 6, 0.3)
    r = VoxelReadout(d, 5, rank=6, dropout=0.0)
    ratio = r.fit(x)
    pca = PCA(6, svd_solver="full").fit(x.double().numpy())
    np.testing.assert_allclose(ratio.numpy(), pca.explained_variance_ratio_, rtol=1e-4)
    z = ((x - r.mean) @ r.basis).double()
    # whitened components over the fitted patterns: zero mean, identity covariance
    np.testing.assert_allclose(z.mean(0).numpy(), 0, atol=1e-4)
    np.testing.assert_allclose(np.cov(z.numpy(), rowvar=False), np.eye(6), atol=1e-3)
    # same subspace as sklearn (|cos| of matching components = 1) and a fixed sign convention
    v = r.basis.double() / r.basis.double().norm(dim=0)
    cos = (v.T @ torch.from_numpy(pca.components_.T)).diagonal().abs()
    np.testing.assert_allclose(cos.numpy(), 1, atol=1e-4)
    assert bool(r.fitted) and not r.needs_fit


def test_subspace_recovers_the_planted_signal_and_fit_is_deterministic():
    x, basis = _low_rank(200, 500, 4, 0.1, seed=1)
    a, b = VoxelReadout(500, 3, rank=4), VoxelReadout(500, 3, rank=4)
    a.fit(x)
    b.fit(x.clone())
    torch.testing.assert_close(a.basis, b.basis, rtol=0, atol=0)
    q, _ = torch.linalg.qr(a.basis.double())
    s = torch.linalg.svdvals(q.T @ basis)  # cosines of the principal angles between the two subspaces
    assert s.min() > 0.99


def test_full_rank_and_rank_read_outs_start_at_zero_and_get_gradients():
    x = torch.randn(7, 12, 5)
    full, low = VoxelReadout(60, 4, dropout=0.0), VoxelReadout(60, 4, rank=3, dropout=0.0)
    low.fit(torch.randn(20, 60))
    for r in (full, low):
        out = r(x)
        assert out.shape == (7, 4) and (out == 0).all()
        out.sum().backward()
        assert r.linear.weight.grad.abs().sum() > 0
    assert full.linear.in_features == 60 and low.linear.in_features == 3
    assert {"mean", "basis", "fitted"} <= set(low.state_dict())  # the subspace travels with the checkpoint


def test_bad_input_is_one_clear_error():
    with pytest.raises(ValueError, match="rank must be in 1..10"):
        VoxelReadout(10, 2, rank=11)
    r = VoxelReadout(10, 2, rank=3)
    with pytest.raises(RuntimeError, match="never fitted"):
        r(torch.randn(2, 10))
    with pytest.raises(ValueError, match="NaN"):
        r.fit(torch.full((8, 10), float("nan")))
    with pytest.raises(ValueError, match="8 values each"):
        r.fit(torch.randn(20, 8))
    with pytest.raises(ValueError, match="cannot give 3"):
        r.fit(torch.randn(3, 10))
    with pytest.raises(ValueError, match="nothing to fit"):
        VoxelReadout(10, 2).fit(torch.randn(20, 10))
    assert r.needs_fit  # a failed fit leaves it unfitted


# the streamed fit (principal_subspace): exact for small inputs, randomised for large ones ----------------------
def _chunked(x: torch.Tensor, m: int = 64) -> list[torch.Tensor]:
    return [x[s:s + m] for s in range(0, len(x), m)]


def _power_law(n: int, d: int, alpha: float, seed: int = 0) -> torch.Tensor:
    """Patterns whose covariance spectrum falls as i^-alpha (no gap at k: the hard case for a randomised fit)."""
    g = torch.Generator().manual_seed(seed)
    r = min(n, d)
    u, _ = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64))
    s = torch.arange(1, r + 1, dtype=torch.float64) ** (-alpha / 2)
    return ((torch.randn(n, r, generator=g, dtype=torch.float64) * s) @ u.T + 1.0).float()


def _cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosines of the principal angles between the column spaces of a and b."""
    qa, _ = torch.linalg.qr(a.double())
    qb, _ = torch.linalg.qr(b.double())
    return torch.linalg.svdvals(qa.T @ qb)


def test_randomised_streamed_fit_matches_exact_pca_and_whitens():
    from neurovision.models.readout import principal_subspace

    x, planted = _low_rank(400, 3000, 16, 0.3, seed=2)
    exact = principal_subspace([x], 16)
    fast = principal_subspace(_chunked(x), 16, exact_max=0)  # 7 chunks, randomised path forced
    assert exact.exact and not fast.exact and fast.n == 400
    assert _cosines(fast.basis, exact.basis).min() > 0.99  # largest principal angle < 8 degrees
    # as close to the planted signal as exact PCA gets (the noise, not the algorithm, limits both)
    assert _cosines(fast.basis, planted).min() > _cosines(exact.basis, planted).min() - 0.005
    np.testing.assert_allclose(fast.ratio.numpy(), exact.ratio.numpy(), rtol=0.02)
    assert fast.ratio.sum() <= exact.ratio.sum() * (1 + 1e-5)  # no subspace explains more than the top-16
    torch.testing.assert_close(fast.mean, x.double().mean(0).float(), atol=1e-5, rtol=0)
    z = ((x - fast.mean) @ fast.basis).double()  # whitened and decorrelated over the fitted patterns
    np.testing.assert_allclose(np.cov(z.numpy(), rowvar=False), np.eye(16), atol=1e-3)
    big = fast.basis.abs().argmax(0)
    assert (fast.basis[big, torch.arange(16)] > 0).all()  # the sign convention


def test_randomised_fit_captures_the_variance_of_a_gapless_spectrum():
    from neurovision.models.readout import principal_subspace

    x = _power_law(400, 3000, 1.0)
    exact = principal_subspace([x], 16)
    fast = principal_subspace(_chunked(x), 16, exact_max=0)
    assert fast.ratio.sum() > 0.995 * exact.ratio.sum()
    one_pass = principal_subspace(_chunked(x), 16, exact_max=0, power_iters=0)  # the control: a random subspace
    assert one_pass.ratio.sum() < 0.5 * exact.ratio.sum()


def test_streamed_fit_is_deterministic_for_a_seed_and_leaves_the_global_rng_alone():
    from neurovision.models.readout import principal_subspace

    x = _power_law(300, 2000, 1.0, seed=3)
    state = torch.get_rng_state()
    a = principal_subspace(_chunked(x), 8, exact_max=0, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(123)  # the global RNG does not matter
    b = principal_subspace(lambda: iter(_chunked(x)), 8, exact_max=0, seed=5)  # a function returning the stream
    torch.testing.assert_close(a.basis, b.basis, rtol=0, atol=0)
    c = principal_subspace(_chunked(x), 8, exact_max=0, seed=6)
    assert not torch.equal(a.basis, c.basis)
    with pytest.raises(TypeError, match="re-iterable"):
        principal_subspace((c for c in _chunked(x)), 8, exact_max=0)


def test_fit_takes_the_streamed_path_above_the_size_threshold(monkeypatch):
    from neurovision.models import readout

    x, _ = _low_rank(300, 2000, 6, 0.3, seed=4)
    exact = VoxelReadout(2000, 3, rank=6)
    exact.fit(x)
    calls: list[bool] = []
    finish = readout._finish
    monkeypatch.setattr(readout, "_finish", lambda *a, exact: calls.append(exact) or finish(*a, exact=exact))
    monkeypatch.setattr(readout, "EXACT_MAX_VALUES", 100_000)  # 600k values: above
    big = VoxelReadout(2000, 3, rank=6)
    big.fit(x)
    monkeypatch.setattr(readout, "EXACT_MAX_VALUES", 10**9)
    monkeypatch.setattr(readout, "EXACT_MAX_SIDE", 100)  # both sides above: randomised, from the buffer
    side = VoxelReadout(2000, 3, rank=6)
    side.fit(x)
    assert calls == [False, False]
    for r in (big, side):
        assert _cosines(r.basis, exact.basis).min() > 0.999 and bool(r.fitted)
        torch.testing.assert_close(r.mean, exact.mean, atol=1e-5, rtol=0)


def test_streamed_fit_bad_input_is_one_clear_error():
    from neurovision.models.readout import principal_subspace

    x = torch.randn(200, 50)
    bad = _chunked(x, 32)
    bad[3] = bad[3].clone()
    bad[3][5, 7] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        principal_subspace(bad, 4, exact_max=0)
    with pytest.raises(ValueError, match="NaN or inf"):
        principal_subspace(bad, 4)
    with pytest.raises(ValueError, match="20 values each, expected 50"):
        principal_subspace([x[:32], torch.randn(32, 20)], 4, exact_max=0)
    with pytest.raises(ValueError, match="gave 200 patterns, expected n=201"):
        principal_subspace(_chunked(x), 4, n=201, exact_max=0)
    with pytest.raises(ValueError, match="cannot give 4"):
        principal_subspace([x[:4]], 4, exact_max=0)


# computed once: rank 0 fits, the other ranks receive the basis ----------------------------------------------
class _Train:
    """An FMRITrials stand-in: 120 groups of 2 repeats of a 40-value pattern."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(120, 2, 40, generator=g)
        self.groups = [np.array([2 * i, 2 * i + 1]) for i in range(120)]
        self.seed = 0

    def group_mean(self, g: int) -> torch.Tensor:
        return self.x[g].mean(0).reshape(4, 10)


class _Strategy:
    def __init__(self, payload=None) -> None:
        self.payload, self.sent = payload, []

    def broadcast(self, obj, src=0):
        self.sent.append(obj)
        return obj if self.payload is None else self.payload


def _task_stub(rank: int, world: int, strategy: _Strategy):
    from types import SimpleNamespace

    trainer = SimpleNamespace(global_rank=rank, world_size=world, strategy=strategy,
                              datamodule=SimpleNamespace(num_workers=0))
    return SimpleNamespace(skip=VoxelReadout(40, 3, rank=5), device=torch.device("cpu"), _trainer=trainer,
                           trainer=trainer)


def test_only_rank_zero_fits_and_the_others_take_its_broadcast(monkeypatch, capsys):
    from neurovision.tasks import alignment

    calls = []
    real = alignment.principal_subspace
    monkeypatch.setattr(alignment, "principal_subspace", lambda *a, **k: calls.append(1) or real(*a, **k))
    train = _Train()
    zero = _task_stub(0, 2, _Strategy())
    alignment.AlignmentTask._fit_readout(zero, train)
    assert len(calls) == 1 and len(zero.trainer.strategy.sent) == 1
    mean, basis = zero.trainer.strategy.sent[0][:2]
    torch.testing.assert_close(zero.skip.basis, basis, rtol=0, atol=0)
    ref = VoxelReadout(40, 3, rank=5)
    ref.fit(train.x.mean(1))  # the repeat averages, fitted directly
    torch.testing.assert_close(basis, ref.basis, rtol=0, atol=0)
    torch.testing.assert_close(mean, ref.mean, rtol=0, atol=0)
    assert "explain" in capsys.readouterr().out

    one = _task_stub(1, 2, _Strategy(payload=zero.trainer.strategy.sent[0]))
    alignment.AlignmentTask._fit_readout(one, train)
    assert len(calls) == 1  # rank 1 read nothing and fitted nothing
    assert one.trainer.strategy.sent == [None]
    torch.testing.assert_close(one.skip.basis, zero.skip.basis, rtol=0, atol=0)
    torch.testing.assert_close(one.skip.mean, zero.skip.mean, rtol=0, atol=0)
    assert bool(one.skip.fitted) and "explain" not in capsys.readouterr().out


def test_an_error_on_rank_zero_reaches_every_rank_instead_of_a_hang():
    from neurovision.tasks import alignment

    train = _Train()
    train.x[7, 1, 3] = float("nan")
    zero = _task_stub(0, 2, _Strategy())
    with pytest.raises(ValueError, match="linear_skip_rank.*NaN or inf"):
        alignment.AlignmentTask._fit_readout(zero, train)
    (sent,) = zero.trainer.strategy.sent
    one = _task_stub(1, 2, _Strategy(payload=sent))
    with pytest.raises(ValueError, match="NaN or inf"):
        alignment.AlignmentTask._fit_readout(one, train)
    assert one.skip.needs_fit
