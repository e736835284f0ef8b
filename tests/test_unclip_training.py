"""The tiny unCLIP trainer of the demo chain: timestep sampling, stage-1-like degradation, training end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_teachers import TINY_VAE


def test_sample_timesteps_uniform_and_high_noise() -> None:
    from neurovision.tiny.unclip import sample_timesteps

    rng = np.random.default_rng(0)
    u = sample_timesteps(20000, 1000, 1.0, rng).numpy()
    h = sample_timesteps(20000, 1000, 3.0, rng).numpy()
    assert u.min() >= 0 and u.max() <= 999 and h.min() >= 0 and h.max() <= 999
    assert abs(u.mean() - 499.5) < 10  # uniform
    assert abs(h.mean() - 750) < 10  # density ∝ t², mean 3T/4
    assert abs((h < 500).mean() - 0.125) < 0.01  # P(t < T/2) = (1/2)³
    with pytest.raises(ValueError, match="t_power"):
        sample_timesteps(4, 1000, 0.0, rng)


def test_degrade_latents_shrinks_blurs_and_adds_noise() -> None:
    from neurovision.tiny.unclip import degrade_latents

    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 4, 16, 16, generator=g)
    m = x0.mean(0, keepdim=True)
    exact = degrade_latents(x0, m, np.random.default_rng(0), shrink=(0.3, 0.3), blur=(0.0, 0.0), noise=(0.0, 0.0))
    torch.testing.assert_close(exact, m + 0.3 * (x0 - m))
    blurred = degrade_latents(x0, m, np.random.default_rng(0), shrink=(1.0, 1.0), blur=(1.5, 1.5), noise=(0.0, 0.0))
    # a blur lowers the high-frequency energy (neighbour differences) but keeps the mean
    dx = lambda z: (z[..., 1:] - z[..., :-1]).pow(2).mean()  # noqa: E731
    assert dx(blurred) < 0.5 * dx(x0)
    noisy = degrade_latents(x0, m, np.random.default_rng(1), shrink=(1.0, 1.0), blur=(0.0, 0.0), noise=(0.5, 0.5))
    assert (noisy - x0).std().item() == pytest.approx(0.5, rel=0.1)
    again = degrade_latents(x0, m, np.random.default_rng(1), shrink=(1.0, 1.0), blur=(0.0, 0.0), noise=(0.5, 0.5))
    assert torch.equal(noisy, again)  # seeded by the generator


@pytest.fixture(scope="module")
def teachers(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    import shutil

    from neurovision.tiny.teachers import tiny_clip_config, train_tiny_clip, train_tiny_vae

    tmp = tmp_path_factory.mktemp("unclip")
    store = Path(shutil.copy(tiny_store, tmp / "tiny.h5"))  # the teacher cache is written beside the store
    (tmp / "vae.json").write_text(json.dumps(TINY_VAE))
    cfg = tiny_clip_config(image_size=32, tower="resnet", embed_dim=32, width=16, text_width=32, text_layers=1)
    train_tiny_clip(store, tmp / "t", epochs=1, batch_size=16, config=cfg, progress=False, evaluate=False)
    train_tiny_vae(store, tmp / "t", epochs=1, batch_size=16, config=str(tmp / "vae.json"), progress=False,
                   evaluate=False)
    return store, tmp / "t"


@pytest.mark.parametrize("kind", ["epsilon", "sample+degrade"])
def test_train_tiny_unclip_writes_a_loadable_reconstructor(teachers: tuple[Path, Path], tmp_path: Path,
                                                           kind: str) -> None:
    from neurovision.pretrained.unclip import UnCLIPReconstructor
    from neurovision.tiny.unclip import train_tiny_unclip

    store, tdir = teachers
    kw = {"prediction_type": "sample", "degrade": 0.5, "t_power": 2.0} if kind != "epsilon" else {}
    out = train_tiny_unclip(store, tdir, tmp_path / "u" / "tiny_unclip", epochs=3, batch_size=16, width=16,
                            progress=False, eval_items=4, **kw)
    m = json.loads((out.parent / "tiny_unclip_metrics.json").read_text())
    assert m["steps"] == 3 * (112 // 16) and np.isfinite(m["loss_last_100"])
    assert m["prediction_type"] == kw.get("prediction_type", "epsilon") and m["degrade"] == kw.get("degrade", 0.0)
    assert set(m["test_true_targets"]) >= {"beta=0", "beta=0.5", "beta=1"}
    rec = UnCLIPReconstructor.from_pretrained(out)
    assert rec.scheduler.config.prediction_type == m["prediction_type"]  # sampling uses the trained target
    img = rec.reconstruct(torch.zeros(2, 4, 16, 16), torch.randn(2, 32), beta=0.5, steps=4)
    assert img.shape == (2, 3, 32, 32) and img.dtype == torch.uint8
    assert not list(out.parent.glob(".*partial"))


def test_degrade_needs_the_sample_target(teachers: tuple[Path, Path], tmp_path: Path) -> None:
    from neurovision.tiny.unclip import train_tiny_unclip

    store, tdir = teachers
    with pytest.raises(ValueError, match="prediction_type='sample'"):
        train_tiny_unclip(store, tdir, tmp_path / "x", degrade=0.5, prediction_type="epsilon", progress=False)
    with pytest.raises(ValueError, match="degrade must be in"):
        train_tiny_unclip(store, tdir, tmp_path / "x", degrade=1.5, prediction_type="sample", progress=False)
    assert not (tmp_path / "x").exists()
