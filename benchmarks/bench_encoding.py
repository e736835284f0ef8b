#!/usr/bin/env python
"""Benchmark the encoding fit: ``cross_validated_ridge`` vs a loop of scikit-learn ``RidgeCV`` over the folds.

All fit ``--targets`` targets from ``--features`` features over ``--events`` events in ``--folds`` contiguous
folds (the same folds), z-scoring X with each training fold's statistics, with one α per target from the grid
logspace(-1, 5, 7):

- ours: :func:`neurovision.encoding.ridge.cross_validated_ridge`, α chosen by an inner blocked 5-fold CV, exact,
  from one eigendecomposition of the Gram per inner block (``inner_cv="downdate"``, the default; backend
  ``auto``: numpy on CPU, torch_cuda on GPU), once per ``--dtypes`` entry;
- scikit-learn (timed right after ours, so that both see the same machine load):
  ``RidgeCV(alphas, alpha_per_target=True)`` per fold. Note it chooses α by efficient leave-one-out (GCV), which
  is cheaper than a blocked CV but not valid for autocorrelated events;
- reference: the same call as ours with ``inner_cv="refit"`` (himalaya ``RidgeCV`` refitting every inner fold, the
  method before issue 22); same folds, so its α and mean r must equal ours up to rounding (printed: the share
  of equal α and the largest |Δr|); ``--no-reference`` skips it;
- bootstrap: the statistics stage on our predictions, :func:`neurovision.encoding.stats.bootstrap_indices`
  (``--n-boot`` resamples, moving blocks of 20 events) + :func:`~neurovision.encoding.stats.bootstrap_r`
  (``--no-bootstrap`` skips it).

The data are synthetic (half the targets carry a linear signal); the mean r of each fit is printed. Only the
fits are timed (after a tiny warm-up fit of each). Set OMP_NUM_THREADS for reproducible CPU timings.

Usage::

    OMP_NUM_THREADS=2 python benchmarks/bench_encoding.py [--events 5000 --features 1024 --targets 2000]
                                                         [--folds 5] [--dtypes float32,float64] [--quick]

Results: a table on stdout and JSON at ``benchmarks/results/encoding.json`` (``encoding_quick.json`` with
``--quick``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

import neurovision

neurovision.setup_environment()  # the torchvision fix, before the ridge code's torchmetrics imports torchvision

from neurovision.data.atomic import write_json  # noqa: E402
from neurovision.encoding.ridge import (  # noqa: E402
    DEFAULT_ALPHAS,
    blocked_folds,
    cross_validated_ridge,
    pearson_r,
    zscore_fit,
)
from neurovision.encoding.stats import bootstrap_indices, bootstrap_r  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
QUICK = {"events": 300, "features": 24, "targets": 40}


def make_data(n: int, p: int, t: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """X (n, p) float32 with correlated columns; Y (n, t): half the targets X @ W + noise, half noise."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, p), dtype=np.float32)
    x[:, 1:] += 0.5 * x[:, :-1]
    y = rng.standard_normal((n, t), dtype=np.float32) * 2
    k = min(p, 32)
    y[:, : t // 2] += x[:, :k] @ rng.standard_normal((k, t // 2), dtype=np.float32) / np.sqrt(k)
    return x, y


def sklearn_folds(x: np.ndarray, y: np.ndarray, folds: list, alphas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold predictions and chosen α (n_folds, n_targets) of a loop of sklearn RidgeCV."""
    from sklearn.linear_model import RidgeCV

    pred = np.empty(y.shape, dtype=np.float64)
    chosen = np.empty((len(folds), y.shape[1]))
    for k, (tr, te) in enumerate(folds):
        mean, std = zscore_fit(x[tr])
        m = RidgeCV(alphas=alphas, alpha_per_target=True).fit((x[tr] - mean) / std, y[tr])
        pred[te] = m.predict((x[te] - mean) / std)
        chosen[k] = m.alpha_
    return pred, chosen


def _timed(fn: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=5000)
    p.add_argument("--features", type=int, default=1024)
    p.add_argument("--targets", type=int, default=2000)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--inner-folds", type=int, default=5)
    p.add_argument("--backend", default="auto", choices=("auto", "numpy", "torch", "torch_cuda"))
    p.add_argument("--dtypes", default="float32", help="comma list of float32,float64 (ours)")
    p.add_argument("--n-targets-batch", type=int, default=None)
    p.add_argument("--no-sklearn", action="store_true", help="skip scikit-learn")
    p.add_argument("--no-reference", action="store_true", help="skip the inner_cv='refit' reference")
    p.add_argument("--no-bootstrap", action="store_true", help="skip the bootstrap stage")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples")
    p.add_argument("--quick", action="store_true", help=f"tiny sizes for smoke tests: {QUICK}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="output (default benchmarks/results/encoding[_quick].json)")
    args = p.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    dtypes = [s.strip() for s in args.dtypes.split(",") if s.strip()]
    if not dtypes or set(dtypes) - {"float32", "float64"}:
        p.error(f"--dtypes: expected float32 and/or float64, got {args.dtypes!r}")
    import torch
    from threadpoolctl import threadpool_info

    backend = args.backend
    if backend == "auto":
        backend = "torch_cuda" if torch.cuda.is_available() else "numpy"
    t_start = time.perf_counter()
    res: dict[str, Any] = {
        "config": dict(vars(args)),
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
                    "cpus": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                    "blas_threads": max((i.get("num_threads", 0) for i in threadpool_info()), default=None),
                    "device_name": torch.cuda.get_device_name() if backend == "torch_cuda" else "cpu"},
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "results": [],
    }
    x, y = make_data(args.events, args.features, args.targets, args.seed)
    folds = blocked_folds(args.events, args.folds)
    alphas = DEFAULT_ALPHAS
    print(f"encoding fit: {args.events} events x {args.features} features -> {args.targets} targets, "
          f"{args.folds} blocked folds, {len(alphas)} alphas per target ({res['machine']['device_name']}, "
          f"OMP_NUM_THREADS={res['machine']['omp_num_threads']})")
    # warm-up (imports, first BLAS / solver calls) outside the timings
    xw, yw = make_data(60, 4, 3, args.seed)
    cross_validated_ridge(xw, yw, folds=3, inner_folds=3, backend=backend)
    sklearn_folds(xw, yw, blocked_folds(60, 3), alphas)
    ours_alphas: dict[str, np.ndarray] = {}
    ours: dict[str, Any] = {}
    for dt in dtypes:
        enc, sec = _timed(lambda dt=dt: cross_validated_ridge(
            x, y, folds=folds, alphas=alphas, inner_folds=args.inner_folds, backend=backend, dtype=dt,
            n_targets_batch=args.n_targets_batch))
        ours_alphas[dt], ours[dt] = enc.alphas_, enc
        res["results"].append({"method": f"ours ({backend}, {dt}, exact blocked inner CV)", "key": f"ours_{dt}",
                               "seconds": sec, "mean_r": float(enc.r.mean()),
                               "mean_r_signal": float(enc.r[: args.targets // 2].mean())})
    first = dtypes[0]
    ours_s = next(r["seconds"] for r in res["results"] if r["key"] == f"ours_{first}")
    if not args.no_sklearn:
        (pred, sk_alphas), sec = _timed(lambda: sklearn_folds(x, y, folds, alphas))
        r = pearson_r(y, pred)
        res["results"].append({"method": "sklearn RidgeCV per fold (float64, LOO/GCV)", "key": "sklearn",
                               "seconds": sec, "mean_r": float(r.mean()),
                               "mean_r_signal": float(r[: args.targets // 2].mean())})
        res["alpha_agreement"] = float(np.mean(ours_alphas[first] == sk_alphas))
        res["ratio_sklearn_over_ours"] = sec / ours_s
    if not args.no_reference:
        ref, sec = _timed(lambda: cross_validated_ridge(
            x, y, folds=folds, alphas=alphas, inner_folds=args.inner_folds, backend=backend, dtype=first,
            n_targets_batch=args.n_targets_batch, inner_cv="refit"))
        res["results"].append({"method": f"reference ({first}, inner_cv='refit')", "key": "reference",
                               "seconds": sec, "mean_r": float(ref.r.mean()),
                               "mean_r_signal": float(ref.r[: args.targets // 2].mean())})
        res["reference"] = {"alpha_agreement": float(np.mean(ours_alphas[first] == ref.alphas_)),
                            "max_abs_dr": float(np.abs(ours[first].r - ref.r).max()),
                            "mean_r_diff": float(ours[first].r.mean() - ref.r.mean()),
                            "ratio_reference_over_ours": sec / ours_s}
    if not args.no_bootstrap:
        pred_ours = ours[first].predictions
        assert pred_ours is not None
        block = min(20, args.events)
        boot, sec = _timed(lambda: bootstrap_r(y, pred_ours, bootstrap_indices(
            args.events, n_boot=args.n_boot, seed=args.seed, block=block)))
        res["bootstrap"] = {"seconds": sec, "n_boot": args.n_boot, "block": block,
                            "mean_sd_r": float(boot.std(axis=0).mean())}
    print(f"\n{'method':<46} {'seconds':>9} {'mean r':>8} {'r signal':>9}")
    for row in res["results"]:
        print(f"{row['method']:<46} {row['seconds']:9.2f} {row['mean_r']:8.3f} {row['mean_r_signal']:9.3f}")
    if "ratio_sklearn_over_ours" in res:
        print(f"sklearn / ours ({first}) = {res['ratio_sklearn_over_ours']:.2f}x  (> 1: ours faster); "
              f"same α in {100 * res['alpha_agreement']:.0f} % of fold x target cells (LOO vs blocked CV)")
    if "reference" in res:
        rf = res["reference"]
        print(f"reference / ours ({first}) = {rf['ratio_reference_over_ours']:.2f}x; same α in "
              f"{100 * rf['alpha_agreement']:.2f} % of fold x target cells, max |Δr| {rf['max_abs_dr']:.1e}, "
              f"Δ mean r {rf['mean_r_diff']:+.1e}")
    if "bootstrap" in res:
        bs = res["bootstrap"]
        print(f"bootstrap stage: bootstrap_indices + bootstrap_r, {bs['n_boot']} resamples (blocks of "
              f"{bs['block']}) x {args.targets} targets x {args.events} events: {bs['seconds']:.2f} s "
              f"(mean bootstrap sd of r {bs['mean_sd_r']:.3f})")
    res["runtime_s"] = time.perf_counter() - t_start
    out = Path(args.json) if args.json else RESULTS / ("encoding_quick.json" if args.quick else "encoding.json")
    write_json(out, res)
    print(f"\nresults: {out}")
    return res


if __name__ == "__main__":
    main()
