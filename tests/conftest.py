"""Shared fixtures: a seeded generator, a small affine, a tiny volume and one phantom store per session."""

from __future__ import annotations

import os

# no test may reach the network: set before anything imports huggingface_hub / transformers
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import neurovision  # noqa: E402
from neurovision.cli import configure_logging  # noqa: E402

# the tests' entry point: the torchvision fix (where the installed torchvision needs it) before any test module
# imports lightning / torchvision, and the CLI's console logging, so library messages reach capsys as they reach
# a user's console
neurovision.setup_environment()
configure_logging()


@pytest.fixture
def rng() -> np.random.Generator:
    """A seeded generator: every test that draws random data draws the same data on every run."""
    return np.random.default_rng(0)


@pytest.fixture
def affine() -> np.ndarray:
    """A small, non-trivial voxel -> world affine (2 x 2.5 x 3 mm voxels, shifted origin)."""
    a = np.diag([2.0, 2.5, 3.0, 1.0])
    a[:3, 3] = [-10.0, 4.0, -7.5]
    return a


@pytest.fixture
def volume(rng: np.random.Generator) -> np.ndarray:
    """A tiny float32 volume, 10 x 12 x 9 (no axis divisible by a typical patch size)."""
    return rng.normal(size=(10, 12, 9)).astype(np.float32)


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The phantom ``tiny`` preset, generated once per session (a few seconds); returns the store path.

    Treat it as read-only: tests that modify a store work on a copy.
    """
    from neurovision.sources import phantom

    return phantom.prepare(tmp_path_factory.mktemp("phantom") / "tiny.h5", preset="tiny")
