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
