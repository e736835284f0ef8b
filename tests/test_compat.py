"""The torchvision fix: ``import neurovision`` changes nothing; the one explicit call makes the stack import where
torchvision's compiled ops do not load and is a no-op where they do; the spawn hook and ``install_pth`` act only
where needed; our CPU nms kernel is a correct NMS.

The import checks need fresh interpreters (this test process has made the call in conftest). They run
concurrently from one module fixture, to keep the wall time near that of the slowest. Each takes the
``neurovision_boot`` finder (installed by the venv's ``.pth`` where needed) off ``sys.meta_path`` first, so
that it tests the code path it names and nothing else.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import neurovision_boot
from neurovision.cli import environment as _compat

COMPAT_FILE = Path(_compat.__file__)
_NO_HOOK = """
import sys
sys.meta_path[:] = [f for f in sys.meta_path if type(f).__module__ != "neurovision_boot"]
"""
_LOADABLE = _NO_HOOK + """
from neurovision.cli.environment import torchvision_ops_loadable
print("LOADABLE", torchvision_ops_loadable())
"""
_NMS = """
import torch
print("NMS", torch.ops.torchvision.nms(torch.tensor([[0., 0, 1, 1], [0, 0, 1, 1]]), torch.tensor([1., .5]), .5).tolist())
"""
# the explicit call alone
_WITH_FIX = _NO_HOOK + """
import neurovision
print("APPLIED", neurovision.setup_environment())
import torchvision, lightning, torchmetrics, open_clip, peft
""" + _NMS
# `import neurovision` (and its data_modules / callbacks packages' __init__) has no side effect: torchvision
# fails exactly as without neurovision where its ops do not load
_WITHOUT_FIX = _NO_HOOK + """
import neurovision, neurovision.cli
assert "neurovision.cli.environment" not in sys.modules and "torch" not in sys.modules, sorted(sys.modules)
import torchvision
"""
# what neurovision_boot.pth does in a spawned process: the finder applies the fix on the first torchvision import
_HOOK = _NO_HOOK + """
import neurovision_boot
neurovision_boot.install_hook()
import lightning
assert not any(type(f).__module__ == "neurovision_boot" for f in sys.meta_path)  # it removed itself
""" + _NMS


@pytest.fixture(scope="module")
def runs() -> dict[str, subprocess.CompletedProcess[str]]:
    scripts = (("loadable", _LOADABLE), ("with_fix", _WITH_FIX), ("without_fix", _WITHOUT_FIX), ("hook", _HOOK))
    procs = {
        name: subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, cwd=COMPAT_FILE.parents[1])
        for name, code in scripts
    }
    out = {}
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=180)
        out[name] = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
    return out


def _loadable(runs: dict[str, subprocess.CompletedProcess[str]]) -> bool:
    probe = runs["loadable"]
    assert probe.returncode == 0, probe.stderr[-3000:]
    loadable = probe.stdout.split("LOADABLE")[-1].strip()
    assert loadable in ("True", "False"), probe.stdout
    return loadable == "True"


def test_stack_imports_after_the_explicit_call(runs: dict[str, subprocess.CompletedProcess[str]]) -> None:
    r = runs["with_fix"]
    assert r.returncode == 0, r.stderr[-3000:]
    assert "NMS [0]" in r.stdout  # the op runs: the second (identical, lower-scored) box is suppressed
    # the call applies the fix exactly where the ops do not load, and is a no-op where they do
    assert f"APPLIED {not _loadable(runs)}" in r.stdout, r.stdout


def test_spawn_hook_applies_the_fix_on_first_torchvision_import(
    runs: dict[str, subprocess.CompletedProcess[str]],
) -> None:
    r = runs["hook"]
    assert r.returncode == 0, r.stderr[-3000:]
    assert "NMS [0]" in r.stdout


def test_import_has_no_side_effect_and_torchvision_fails_without_the_fix_when_ops_do_not_load(
    runs: dict[str, subprocess.CompletedProcess[str]],
) -> None:
    r = runs["without_fix"]
    if _loadable(runs):
        assert r.returncode == 0, r.stderr[-3000:]  # nothing to fix: plain torchvision must import
        pytest.skip("torchvision's compiled ops load against this torch (matching build): nothing to fix")
    assert "AssertionError" not in r.stderr, r.stderr[-3000:]  # importing neurovision did not import torch
    assert r.returncode != 0, "torchvision imported without the fix although its compiled ops do not load"
    assert "torchvision::nms" in r.stderr, r.stderr[-3000:]


@pytest.mark.parametrize("loadable", [True, False])
def test_install_pth_writes_the_hook_only_where_needed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       loadable: bool) -> None:
    stale = tmp_path / neurovision_boot.PTH_NAME
    stale.write_text("import neurovision_boot; neurovision_boot.install_hook()\n")  # from an earlier install
    monkeypatch.setattr(_compat, "torchvision_ops_loadable", lambda: loadable)
    written = neurovision_boot.install_pth(str(tmp_path))
    if loadable:
        assert written is None and not stale.exists()
    else:
        assert written == stale and stale.read_text().startswith("import neurovision_boot;")


def test_patch_is_a_no_op_where_the_ops_load(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_compat, "_LIB", None)
    monkeypatch.setattr(_compat, "torchvision_ops_loadable", lambda: True)
    assert _compat.patch_torchvision() is False and _compat._LIB is None


def _nms_numpy(boxes: np.ndarray, scores: np.ndarray, thr: float) -> list[int]:
    """Brute-force greedy NMS: pairwise IoU matrix, walk by decreasing score."""
    x1, y1, x2, y2 = boxes.T
    area = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    iw = np.clip(np.minimum(x2[:, None], x2[None]) - np.maximum(x1[:, None], x1[None]), 0, None)
    ih = np.clip(np.minimum(y2[:, None], y2[None]) - np.maximum(y1[:, None], y1[None]), 0, None)
    inter = iw * ih
    iou = inter / (area[:, None] + area[None] - inter)
    keep: list[int] = []
    for i in np.argsort(-scores, kind="stable"):
        if all(iou[i, k] <= thr for k in keep):
            keep.append(int(i))
    return keep


def _random_boxes(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    xy = rng.uniform(0, 50, (n, 2))
    wh = rng.uniform(2, 20, (n, 2))
    return np.concatenate([xy, xy + wh], 1).astype(np.float32), rng.permutation(n).astype(np.float32) / n


@pytest.mark.parametrize("kernel", ["op", "cpu_fallback"])
@pytest.mark.parametrize("thr", [0.0, 0.3, 0.7])
def test_nms_matches_bruteforce(rng: np.random.Generator, kernel: str, thr: float) -> None:
    nms = torch.ops.torchvision.nms if kernel == "op" else _compat._nms_cpu
    for n in (1, 7, 60):
        boxes, scores = _random_boxes(rng, n)
        keep = nms(torch.as_tensor(boxes), torch.as_tensor(scores), thr)
        assert keep.dtype == torch.long
        expected = _nms_numpy(boxes.astype(np.float64), scores, thr)
        assert keep.tolist() == expected
        if n == 60 and thr == 0.3:
            assert 1 < len(expected) < n  # the case exercises suppression both ways


def test_nms_empty() -> None:
    keep = torch.ops.torchvision.nms(torch.zeros(0, 4), torch.zeros(0), 0.5)
    assert keep.shape == (0,) and keep.dtype == torch.long


def test_patch_is_idempotent() -> None:
    import neurovision

    assert neurovision.setup_environment() is False  # already applied (or not needed) by conftest
