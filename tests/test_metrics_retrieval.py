"""Retrieval / identification metrics against brute-force numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neurovision.metrics import retrieval_top1, two_way_identification
from tests.helpers import np_two_way


def _np_top1(p: np.ndarray, t: np.ndarray) -> tuple[float, float]:
    pn = p / np.linalg.norm(p, axis=1, keepdims=True)
    tn = t / np.linalg.norm(t, axis=1, keepdims=True)
    s = pn @ tn.T
    n = len(p)
    f2i = np.mean([np.argmax(s[i]) == i for i in range(n)])
    i2f = np.mean([np.argmax(s[:, j]) == j for j in range(n)])
    return float(f2i), float(i2f)




def test_retrieval_equals_numpy_when_all_items_are_candidates(rng):
    t = rng.normal(size=(40, 16))
    p = t + rng.normal(scale=1.5, size=t.shape)
    r = retrieval_top1(torch.tensor(p), torch.tensor(t), candidates=300)
    f2i, i2f = _np_top1(p, t)
    assert r["candidates"] == 40
    assert r["fmri2img"] == pytest.approx(f2i) and r["img2fmri"] == pytest.approx(i2f)
    assert 0.05 < f2i < 1.0  # the example is neither trivial nor hopeless


def test_retrieval_subsets_average_numpy_over_the_same_draws(rng):
    t = rng.normal(size=(50, 8))
    p = t + rng.normal(scale=1.0, size=t.shape)
    r = retrieval_top1(torch.tensor(p), torch.tensor(t), candidates=10, draws=5, seed=3)
    g = torch.Generator().manual_seed(3)
    sets = [torch.randperm(50, generator=g)[:10].numpy() for _ in range(5)]
    ref = np.mean([_np_top1(p[s], t[s])[0] for s in sets])
    assert r["fmri2img"] == pytest.approx(ref)


def test_perfect_and_shuffled_predictions(rng):
    t = torch.tensor(rng.normal(size=(30, 12)))
    assert retrieval_top1(t, t)["fmri2img"] == 1.0
    assert two_way_identification(t, t) == 1.0
    perm = torch.tensor(rng.permutation(30))
    assert retrieval_top1(t[perm], t)["fmri2img"] < 0.2


def test_two_way_identification_equals_numpy(rng):
    t = rng.normal(size=(25, 10))
    p = t + rng.normal(scale=2.0, size=t.shape)
    assert two_way_identification(torch.tensor(p), torch.tensor(t)) == pytest.approx(np_two_way(p, t))


def test_bad_inputs():
    with pytest.raises(ValueError):
        retrieval_top1(torch.zeros(1, 3), torch.zeros(1, 3))
    with pytest.raises(ValueError):
        retrieval_top1(torch.zeros(3, 3), torch.zeros(4, 3))
