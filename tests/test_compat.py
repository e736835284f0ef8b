"""The torchvision fix: the stack imports after ``import neurovision``; our CPU nms kernel is a correct NMS.

The import checks need fresh interpreters (the test process has imported neurovision already). The three
subprocesses run concurrently from one module fixture, to keep the wall time near that of the slowest.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from neurovision import _compat

COMPAT_FILE = Path(_compat.__file__)

# load _compat.py by path: importing it as neurovision._compat would run neurovision/__init__ (the patch)
_LOADABLE = f"""
import importlib.util
spec = importlib.util.spec_from_file_location("nv_compat_probe", {str(COMPAT_FILE)!r})
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
print("LOADABLE", mod.torchvision_ops_loadable())
"""
_WITH_FIX = """
import neurovision
import torchvision, lightning, torchmetrics, open_clip, peft
import torch
print("NMS", torch.ops.torchvision.nms(torch.tensor([[0., 0, 1, 1], [0, 0, 1, 1]]), torch.tensor([1., .5]), .5).tolist())
"""
# the neurovision_boot .pth hook (when installed) would apply the fix on `import torchvision`: take it out
_WITHOUT_FIX = """
import sys
sys.meta_path[:] = [f for f in sys.meta_path if type(f).__module__ != "neurovision_boot"]
import torchvision
assert "neurovision" not in sys.modules and "neurovision._compat" not in sys.modules
"""


@pytest.fixture(scope="module")
def runs() -> dict[str, subprocess.CompletedProcess[str]]:
    procs = {
        name: subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, cwd=COMPAT_FILE.parents[1])
        for name, code in (("loadable", _LOADABLE), ("with_fix", _WITH_FIX), ("without_fix", _WITHOUT_FIX))
    }
    out = {}
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=180)
        out[name] = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
    return out


def test_stack_imports_after_neurovision(runs: dict[str, subprocess.CompletedProcess[str]]) -> None:
    r = runs["with_fix"]
    assert r.returncode == 0, r.stderr[-3000:]
    assert "NMS [0]" in r.stdout  # the op runs: the second (identical, lower-scored) box is suppressed


def test_torchvision_fails_without_the_fix_when_ops_do_not_load(
    runs: dict[str, subprocess.CompletedProcess[str]],
) -> None:
    probe = runs["loadable"]
    assert probe.returncode == 0, probe.stderr[-3000:]
    loadable = probe.stdout.split("LOADABLE")[-1].strip()
    assert loadable in ("True", "False"), probe.stdout
    r = runs["without_fix"]
    if loadable == "True":
        assert r.returncode == 0, r.stderr[-3000:]  # nothing to fix: plain torchvision must import
        pytest.skip("torchvision's compiled ops load against this torch (matching build): nothing to fix")
    assert r.returncode != 0, "torchvision imported without the fix although its compiled ops do not load"
    assert "torchvision::nms" in r.stderr, r.stderr[-3000:]


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
    assert _compat.patch_torchvision() is False  # already applied (or not needed) at `import neurovision`
