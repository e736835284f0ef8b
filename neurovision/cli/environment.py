"""Make a CUDA build of torchvision importable on a CPU build of torch.

The torchvision wheel on this project's CPU machines is a CUDA build: its compiled ops (``torchvision/_C``)
cannot load against CPU torch, and ``import torchvision`` then dies in ``_meta_registrations`` with
"operator torchvision::nms does not exist". That one failure breaks lightning, torchmetrics, peft and
open_clip, which all import torchvision. When (and only when) the compiled ops do not load, we define the
two op schemas that the meta registrations need (``nms``, ``qnms``) and give ``nms`` a plain-torch CPU kernel,
before torchvision is first imported. On a machine where torchvision's ops load, nothing is changed.

Nothing here runs at import: :func:`neurovision.setup_environment` (called by the entry points) applies it, and
:mod:`neurovision_boot` applies it in processes started by ``spawn`` where it is needed.
"""

from __future__ import annotations

import glob
import importlib.machinery
import logging
import os
import sys

import torch

log = logging.getLogger(__name__)

_LIB: torch.library.Library | None = None  # keep the fragment alive for the life of the process
_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}


def _op_exists(name: str) -> bool:
    try:
        getattr(torch.ops.torchvision, name)
        return True
    except (AttributeError, RuntimeError):
        return False


def _nms_cpu(dets: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression (boxes as x1, y1, x2, y2), indices by decreasing score."""
    if dets.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=dets.device)
    x1, y1, x2, y2 = dets.unbind(1)
    area = (x2 - x1).clamp_min(0) * (y2 - y1).clamp_min(0)
    order = scores.argsort(descending=True)
    keep: list[int] = []
    suppressed = torch.zeros(len(order), dtype=torch.bool)
    for oi in range(len(order)):
        if suppressed[oi]:
            continue
        i = int(order[oi])
        keep.append(i)
        rest = order[oi + 1:]
        w = (torch.minimum(x2[i], x2[rest]) - torch.maximum(x1[i], x1[rest])).clamp_min(0)
        h = (torch.minimum(y2[i], y2[rest]) - torch.maximum(y1[i], y1[rest])).clamp_min(0)
        inter = w * h
        iou = inter / (area[i] + area[rest] - inter).clamp_min(1e-12)
        suppressed[oi + 1:] |= iou > iou_threshold
    return torch.tensor(keep, dtype=torch.long, device=dets.device)


def torchvision_ops_loadable() -> bool:
    """True when torchvision is absent, already imported, or its compiled ops load against this torch."""
    if "torchvision" in sys.modules:
        return True
    # PathFinder, not importlib.util.find_spec: the latter runs meta-path hooks (neurovision_boot's)
    spec = importlib.machinery.PathFinder.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True
    libs = glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "_C*.so"))
    if not libs:
        return False
    try:
        torch.ops.load_library(libs[0])
    except (OSError, RuntimeError):
        return False
    return _op_exists("nms")


def patch_torchvision() -> bool:
    """Apply the fix if needed; returns True when schemas were defined by us."""
    global _LIB
    if _LIB is not None or torchvision_ops_loadable():
        return False
    lib = torch.library.Library("torchvision", "FRAGMENT")
    _LIB = lib
    for name, schema in _SCHEMAS.items():
        if not _op_exists(name):
            lib.define(schema)
    if _op_exists("nms"):
        try:
            lib.impl("nms", _nms_cpu, "CPU")
        except RuntimeError:  # a kernel is already registered
            pass
    log.debug("torchvision's compiled ops do not load against this torch: defined %s", ", ".join(_SCHEMAS))
    return True
