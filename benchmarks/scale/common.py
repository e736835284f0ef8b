"""Shared pieces of the scale rehearsal (``benchmarks/bench_scale.py``, issue 17).

The contract between the row modules (``rows_data.py``, ``rows_models.py``) and the driver:

* each row module exposes ``ROWS: dict[str, Callable[[argparse.Namespace], Row]]``; the namespace carries
  ``quick: bool``, ``smoke: bool``, ``workdir: Path``, ``seed: int`` and ``progress: bool``;
* a row runs the project's real code path at real shapes and a bounded size on the CPU (or counts FLOPs with
  :func:`count_flops`, on the ``meta`` device where a real-size forward is too slow) and returns a :class:`Row`
  whose ``measured`` holds at least ``seconds`` and ``peak_rss_gb`` plus the rehearsal size, and whose
  ``projected`` holds exactly :data:`PROJECTED_KEYS` (floats, 0.0 where not applicable) for the full workload
  (:class:`Scale`) on one node (:data:`NODE`), with the arithmetic spelled out in ``arithmetic``;
* the driver recomputes ``fits_node`` with :func:`fits` (a row states a measured ``scaling_exponent`` in
  ``measured`` where it measured two sizes; > :data:`MAX_EXPONENT` does not fit).

Row modules import this one relatively (``from .common import Row``); the driver puts the repository root on
``sys.path`` and imports ``benchmarks.scale.rows_data`` / ``benchmarks.scale.rows_models``.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

#: one GPU node: 8 x A100-80GB, 512 GB RAM, 64 cores, NVMe scratch. ``gpu_tflops_bf16`` is the dense bf16 peak;
#: ``efficiency`` the model FLOP utilisation assumed for training/inference of big transformers/UNets.
NODE: dict[str, Any] = {"gpus": 8, "gpu_mem_gb": 80, "ram_gb": 512, "cores": 64, "gpu": "A100-80GB",
                        "gpu_tflops_bf16": 312, "h100_tflops_bf16": 989, "efficiency": 0.4, "disk_gb": 2000}

PROJECTED_KEYS = ("ram_gb", "gpu_mem_gb", "disk_gb", "gpu_hours", "cpu_core_hours")
#: a row whose cost grows faster than n**MAX_EXPONENT in its workload size does not fit
MAX_EXPONENT = 1.2
GB = 1e9  # decimal gigabytes throughout (the node's RAM/disk are quoted that way)


class Scale:
    """The full NSD / Brain Treebank workload the rows project to."""

    # --- NSD (decoding)
    subjects = 4                      # subjects 1, 2, 5, 7
    trials_per_subject = 30_000
    trials = 4 * 30_000               # 120,000 single trials
    trials_per_session = 750
    sessions_per_subject = 40
    val_fraction = 0.03               # held-out slice of each subject's training images
    train_trials_per_subject = 27_000  # after the shared test images and the validation slice
    train_trials = 4 * 27_000          # ~108k stage-1/2 training trials
    repeats = 3
    images = 37_000                   # distinct images over the 4 subjects (~9k per subject + 1k shared)
    train_patterns_per_subject = 9_000  # repeat-averaged training patterns per subject
    train_patterns = 36_000           # over the 4 subjects (the read-out fit's n)
    test_items = 982                  # shared test images per subject (trial-averaged; as many single-trial)
    grid = (81, 104, 83)
    roi_voxels = 15_000               # nsdgeneral, ~15k voxels at 1.8 mm
    patch = 14
    active_patches = 78
    patch_voxels = 14 ** 3            # 2744
    values_per_trial = 78 * 14 ** 3   # 214,032
    imgbrick_px = 425
    # stage 1
    vit_depth = 16
    vit_dim = 768
    vit_heads = 12
    batch = 32                        # per GPU
    epochs = 30
    clip_model = "ViT-L-14"
    clip_px = 224
    clip_dim = 768
    vae_px = 768
    vae_latent = (4, 96, 96)
    # stage 2 / 3
    llm = "Llama-3-8B"
    lora_r = 16
    unclip = "stable-diffusion-2-1-unclip-small (768 px)"
    # --- Brain Treebank (encoding)
    bt_subjects = 10
    bt_electrodes = 1_600             # over the 10 subjects
    bt_bins = 161
    bt_targets_per_subject = 25_800   # ~160 electrodes x 161 bins
    bt_events_per_subject = 30_000
    bt_feature_dims = (768, 4_096)
    bt_bootstraps = 1_000


@dataclass
class Row:
    """One line of the rehearsal table: what ran, what it measured, and the full-workload projection."""

    stage: str
    what: str
    measured: dict[str, Any]
    projected: dict[str, float]
    arithmetic: list[str]
    fits_node: bool
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # free-form detail for the JSON (not printed)

    def __post_init__(self) -> None:
        missing = set(PROJECTED_KEYS) - set(self.projected)
        unknown = set(self.projected) - set(PROJECTED_KEYS)
        if missing or unknown:
            raise ValueError(f"row {self.stage!r}: projected keys must be exactly {PROJECTED_KEYS} "
                             f"(missing {sorted(missing)}, unknown {sorted(unknown)})")
        self.projected = {k: float(self.projected[k]) for k in PROJECTED_KEYS}
        for k in ("seconds", "peak_rss_gb"):
            if k not in self.measured:
                raise ValueError(f"row {self.stage!r}: measured needs {k!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def projected(ram_gb: float = 0.0, gpu_mem_gb: float = 0.0, disk_gb: float = 0.0, gpu_hours: float = 0.0,
              cpu_core_hours: float = 0.0) -> dict[str, float]:
    """The ``projected`` dict with every key (0.0 where not applicable)."""
    return {"ram_gb": float(ram_gb), "gpu_mem_gb": float(gpu_mem_gb), "disk_gb": float(disk_gb),
            "gpu_hours": float(gpu_hours), "cpu_core_hours": float(cpu_core_hours)}


def gpu_hours(flops: float, efficiency: float = NODE["efficiency"], tflops: float = NODE["gpu_tflops_bf16"]) -> float:
    """GPU-hours (A100 by default) to execute ``flops`` at ``efficiency`` of the ``tflops`` dense peak."""
    return float(flops) / (efficiency * tflops * 1e12) / 3600.0


def h100_hours(flops: float, efficiency: float = NODE["efficiency"]) -> float:
    return gpu_hours(flops, efficiency, NODE["h100_tflops_bf16"])


def scaling_exponent(n1: float, cost1: float, n2: float, cost2: float) -> float:
    """``k`` in cost ~ n**k from two measurements (time, bytes, ...) at sizes ``n1 < n2``."""
    if n1 <= 0 or n2 <= 0 or n1 == n2 or cost1 <= 0 or cost2 <= 0:
        raise ValueError(f"scaling_exponent needs two distinct positive sizes and costs, got "
                         f"({n1}, {cost1}), ({n2}, {cost2})")
    return math.log(cost2 / cost1) / math.log(n2 / n1)


def misfits(row: Row, node: dict[str, Any] | None = None) -> list[str]:
    """Why ``row`` does not fit one node (empty: it fits)."""
    node = node or NODE
    p = row.projected
    out = []
    if p["ram_gb"] > node["ram_gb"]:
        out.append(f"RAM {p['ram_gb']:.0f} GB > {node['ram_gb']} GB")
    if p["gpu_mem_gb"] > node["gpu_mem_gb"]:
        out.append(f"GPU memory {p['gpu_mem_gb']:.0f} GB > {node['gpu_mem_gb']} GB per GPU")
    if p["disk_gb"] > node["disk_gb"]:
        out.append(f"disk {p['disk_gb']:.0f} GB > {node['disk_gb']} GB")
    for key in ("scaling_exponent", "scaling_exponent_rss"):
        k = row.measured.get(key)
        if k is not None and k > MAX_EXPONENT:
            out.append(f"{key} {k:.2f} > {MAX_EXPONENT}")
    for k, v in p.items():
        if not math.isfinite(v) or v < 0:
            out.append(f"projected {k} = {v}")
    return out


def fits(row: Row, node: dict[str, Any] | None = None) -> bool:
    """True iff the row's projection fits one node: RAM <= 512 GB, GPU memory <= 80 GB per GPU, disk <= 2 TB,
    and no measured scaling exponent above :data:`MAX_EXPONENT`."""
    return not misfits(row, node)


def max_rss_gb() -> float:
    """This process's peak resident set size in GB: ``VmHWM`` (Linux; since the last :func:`reset_peak_rss`), else
    ``ru_maxrss`` (monotone, and inherited from the parent's address space at fork/exec, so a spawned child would
    report its parent's peak)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / GB
    except OSError:
        pass
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb * (1 if sys.platform == "darwin" else 1024) / GB


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark (``VmHWM``) to the current RSS, where Linux allows it (no-op elsewhere)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def measure(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float, float]:
    """``(result, seconds, peak_rss_delta_gb)`` of ``fn(*args)`` in this process. ``ru_maxrss`` is monotone, so
    the delta is only meaningful when the call raises the process's peak: use :func:`run_isolated` for rows
    whose memory is the point."""
    reset_peak_rss()
    before = max_rss_gb()
    t0 = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - t0, max(0.0, max_rss_gb() - before)


def _child(fn: Callable[..., Any], args: tuple, kwargs: dict, conn: Any) -> None:
    try:
        reset_peak_rss()  # a spawned child starts with its parent's ru_maxrss; VmHWM after this is its own
        base = max_rss_gb()
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        conn.send(("ok", result, time.perf_counter() - t0, max_rss_gb(), base))
    except BaseException as exc:  # noqa: BLE001 (re-raised in the parent)
        import traceback
        conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}", 0.0, 0.0, 0.0))
    finally:
        conn.close()


def run_isolated(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float, float]:
    """Run ``fn(*args, **kwargs)`` in a fresh spawned process: ``(result, seconds, peak_rss_gb)`` with that
    process's peak RSS (interpreter + imports included; :func:`run_isolated_detail` also gives the baseline).
    ``fn`` must be a module-level function and its arguments/result picklable."""
    result, seconds, peak, _ = run_isolated_detail(fn, *args, **kwargs)
    return result, seconds, peak


def run_isolated_detail(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float, float, float]:
    """:func:`run_isolated` plus the child's peak RSS before ``fn`` ran (imports of the child's modules)."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(fn, args, kwargs, child))
    proc.start()
    child.close()
    try:
        status, result, seconds, peak, base = parent.recv()
    except EOFError:
        proc.join()
        raise RuntimeError(f"run_isolated: child running {getattr(fn, '__name__', fn)} died "
                           f"(exit code {proc.exitcode})") from None
    proc.join()
    if status != "ok":
        raise RuntimeError(f"run_isolated: {getattr(fn, '__name__', fn)} failed in the child: {result}")
    return result, seconds, peak, base


def count_flops(fn: Callable[..., Any], *args: Any, per_op: bool = False, **kwargs: Any) -> Any:
    """``(result, flops)`` of ``fn(*args, **kwargs)`` under ``torch.utils.flop_counter.FlopCounterMode`` (works
    on ``meta`` tensors: matmuls/convolutions/attention are counted from shapes; elementwise ops count 0).
    ``per_op=True`` returns ``(result, flops, {op name: flops})``. Count on ``meta`` (or with autograd on):
    CPU inference of ``nn.MultiheadAttention`` takes a fused fast path the counter does not see."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        result = fn(*args, **kwargs)
    total = int(counter.get_total_flops())
    if per_op:
        ops = {str(k): int(v) for k, v in counter.get_flop_counts().get("Global", {}).items()}
        return result, total, ops
    return result, total


def fmt_hours(h: float) -> str:
    return f"{h:.3g}" if h < 100 else f"{h:,.0f}"


def fmt_bytes(nbytes: float) -> str:
    for unit, div in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(nbytes) >= div:
            return f"{nbytes / div:.3g} {unit}"
    return f"{nbytes:.0f} B"


def peak_memory_meta(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, int]:
    """``(result, peak bytes)`` of the tensors ``fn`` allocates, run on ``meta`` tensors (nothing is allocated):
    every new (non-aliasing) op output adds its bytes until Python frees it; tensors autograd saves stay
    counted until the backward frees them. Bytes alive before the call (weights, inputs) are not included."""
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode

    state = {"live": 0, "peak": 0}

    def free(n: int) -> None:
        state["live"] -= n

    class _Track(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            out = func(*args, **(kwargs or {}))
            returns = func._schema.returns
            outs = out if isinstance(out, (tuple, list)) else (out,)
            for i, t in enumerate(outs):
                import torch

                if not isinstance(t, torch.Tensor):
                    continue
                if i < len(returns) and returns[i].alias_info is not None:
                    continue  # a view or in-place result: no new memory
                n = t.untyped_storage().nbytes()
                state["live"] += n
                state["peak"] = max(state["peak"], state["live"])
                weakref.finalize(t, free, n)
            return out

    with _Track():
        result = fn(*args, **kwargs)
    return result, int(state["peak"])
