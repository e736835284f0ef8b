#!/usr/bin/env python
"""The scale rehearsal (issue 17): every stage's real code path at NSD / Brain Treebank shapes and a bounded size
on this machine's CPU, projected to the full workload on one GPU node.

Each row (``benchmarks/scale/rows_data.py``: ``prepare``, ``teacher_cache``, ``stage1_train``,
``stage1_readout``, ``encoding_fit``, ``encoding_bootstrap``; ``benchmarks/scale/rows_models.py``:
``stage2_train``, ``stage2_test``, ``stage3_sweep``) measures time and peak RSS at its rehearsal size (real
architectures from the real configs with random weights, a few steps; or FLOPs counted with
``FlopCounterMode`` on the meta device where a real-size forward is too slow) and projects RAM, GPU memory per
GPU, disk, A100-hours (FLOPs at a stated utilisation of the dense peak) and CPU core-hours for the full
workload, with its arithmetic. A row fits the node (8 x A100-80GB, 512 GB RAM, 64 cores, 2 TB NVMe) when its
projection does and its measured cost grows at most like n^1.2 (rows that measure two sizes say so).

Usage::

    python benchmarks/bench_scale.py [--quick | --smoke] [--rows prepare,stage1_readout] [--no-progress]

Default size <= 20 min on 2 cores, ``--quick`` <= 5 min, ``--smoke`` (the test suite's) well under a minute per
row. Prints the table and each row's arithmetic; writes JSON to ``benchmarks/results/scale.json``:
``{"node", "rows": [{"stage", "what", "measured", "projected", "fits_node", "arithmetic", ...}], "total"}``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import neurovision  # noqa: E402

neurovision.setup_environment()  # the torchvision fix, before any row imports lightning or torchvision

from benchmarks.scale.common import NODE, Row, fits, fmt_hours, misfits  # noqa: E402
from neurovision.data.atomic import write_json  # noqa: E402

DEFAULT_JSON = REPO / "benchmarks" / "results" / "scale.json"
DECODING = ("prepare", "teacher_cache", "stage1_train", "stage1_readout", "stage2_train", "stage2_test",
            "stage3_sweep")
ENCODING = ("encoding_fit", "encoding_bootstrap")
ROW_NAMES = DECODING + ENCODING
TARGET_DECODING_GPU_HOURS = 50.0


def load_rows() -> tuple[dict[str, Any], dict[str, str]]:
    """The row functions of both row modules, and why a module could not be imported (name -> reason)."""
    import importlib

    rows: dict[str, Any] = {}
    missing: dict[str, str] = {}
    for mod in ("rows_data", "rows_models"):
        try:
            m = importlib.import_module(f"benchmarks.scale.{mod}")
        except ImportError as e:
            missing[mod] = f"{type(e).__name__}: {e}"
            continue
        rows.update(getattr(m, "ROWS", {}))
    return rows, missing


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smaller rehearsal sizes (<= 5 min on 2 cores)")
    size.add_argument("--smoke", action="store_true", help="the smallest sizes (the test suite's smoke run)")
    p.add_argument("--rows", default=",".join(ROW_NAMES),
                   help=f"comma-separated rows to run (default: all: {','.join(ROW_NAMES)})")
    p.add_argument("--workdir", type=Path, default=REPO / ".bench" / "scale",
                   help="scratch folder for the generated data (default .bench/scale)")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help="results file (default benchmarks/results/scale.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _fmt_row(r: dict[str, Any]) -> str:
    m, p = r["measured"], r["projected"]
    return (f"{r['stage']:<19}{m['seconds']:>8.1f}s{m['peak_rss_gb']:>7.2f}  | {fmt_hours(p['gpu_hours']):>8}"
            f"{p['cpu_core_hours']:>9.2f}{p['ram_gb']:>8.1f}{p['gpu_mem_gb']:>8.1f}{p['disk_gb']:>8.1f}  "
            f"{'yes' if r['fits_node'] else 'NO'}")


def print_table(result: dict[str, Any]) -> None:
    node = result["node"]
    print(f"\nscale rehearsal ({result['config']['size']} size) -> one node: {node['gpus']} x {node['gpu']} "
          f"({node['gpu_mem_gb']} GB), {node['ram_gb']} GB RAM, {node['cores']} cores, {node['disk_gb']} GB NVMe; "
          f"GPU-hours = FLOPs / ({node['efficiency']:.0%} model FLOP utilisation x {node['gpu_tflops_bf16']} TFLOPS "
          "dense bf16, unless a row states another precision)")
    print(f"{'':<19}{'measured here':>16}  | {'projected to the full workload':<47}")
    print(f"{'stage':<19}{'time':>9}{'RSS GB':>7}  | {'A100-h':>8}{'core-h':>9}{'RAM GB':>8}{'GPU GB':>8}"
          f"{'disk GB':>8}  fits")
    for r in result["rows"]:
        print(_fmt_row(r))
    for name in result["not_built"]:
        print(f"{name:<19}{'not built':>16}")
    for name, err in result["failed"].items():
        print(f"{name:<19}{'FAILED':>16}  {err.splitlines()[0][:80]}")
    t = result["total"]
    print(f"decoding total: {t['decoding_gpu_hours']:.1f} A100-hours over {len(t['decoding_rows'])} of "
          f"{len(DECODING)} decoding rows (target <= {TARGET_DECODING_GPU_HOURS:.0f}"
          + ("" if t["decoding_complete"] else "; incomplete") + f"); encoding: {t['encoding_gpu_hours']:.2f} "
          f"A100-hours; every row fits the node: {'yes' if t['all_fit'] else 'NO'}")
    for r in result["rows"]:
        print(f"\n[{r['stage']}] {r['what']}")
        for line in r["arithmetic"]:
            print(f"  - {line}")
        if r.get("notes"):
            print(f"  note: {r['notes']}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parser().parse_args(argv)
    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROW_NAMES]
    if unknown:
        raise SystemExit(f"--rows: unknown row(s) {unknown}; known: {', '.join(ROW_NAMES)}")
    args.workdir = Path(args.workdir)
    args.workdir.mkdir(parents=True, exist_ok=True)
    args.progress = not args.no_progress
    available, missing_modules = load_rows()
    t_start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    not_built: list[str] = []
    failed: dict[str, str] = {}
    for name in names:
        fn = available.get(name)
        if fn is None:
            not_built.append(name)
            print(f"[{name}] not built" + (f" ({'; '.join(missing_modules.values())})" if missing_modules else ""),
                  flush=True)
            continue
        print(f"[{name}] running ...", flush=True)
        t0 = time.perf_counter()
        try:
            row: Row = fn(args)
        except Exception as e:  # a failed row is reported, never replaced by a made-up number
            failed[name] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
            continue
        why = misfits(row)
        row.fits_node = fits(row)
        if why:
            row.notes = "; ".join(filter(None, [row.notes, "does not fit: " + ", ".join(why)]))
        d = row.to_dict()
        d["wall_s"] = time.perf_counter() - t0
        rows.append(d)
        print(f"[{name}] done in {d['wall_s']:.0f} s", flush=True)
    dec = [r for r in rows if r["stage"] in DECODING]
    enc = [r for r in rows if r["stage"] in ENCODING]
    complete = all(n in {r["stage"] for r in dec} for n in DECODING)
    dec_hours = sum(r["projected"]["gpu_hours"] for r in dec)
    result: dict[str, Any] = {
        "node": dict(NODE),
        "config": {"size": "smoke" if args.smoke else "quick" if args.quick else "default", "rows": names,
                   "seed": args.seed, "workdir": str(args.workdir)},
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpu_count": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                    "torch": __import__("torch").__version__},
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "rows": rows,
        "not_built": not_built,
        "failed": failed,
        "total": {
            "decoding_gpu_hours": dec_hours,
            "decoding_rows": [r["stage"] for r in dec],
            "decoding_complete": complete,
            "decoding_target_gpu_hours": TARGET_DECODING_GPU_HOURS,
            "decoding_within_target": bool(complete and dec_hours <= TARGET_DECODING_GPU_HOURS),
            "encoding_gpu_hours": sum(r["projected"]["gpu_hours"] for r in enc),
            "all_fit": bool(rows) and all(r["fits_node"] for r in rows) and not failed,
        },
        "runtime_s": time.perf_counter() - t_start,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.json, result)
    print_table(result)
    print(f"\nwrote {args.json} ({result['runtime_s']:.0f} s)")
    if failed:
        raise SystemExit(f"bench_scale: {len(failed)} row(s) failed: {', '.join(failed)}")
    return result


if __name__ == "__main__":
    main()
