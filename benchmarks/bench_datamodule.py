#!/usr/bin/env python
"""Benchmark: volumes/s streamed by ``FMRIDataModule`` versus a raw ``os.pread`` of the same bytes.

On a phantom store at the ``nsd`` geometry (83x104x81 grid, patch 14; one subject, sized to ~1.2 GB), this
times the training dataloader (single trials, no MixUp, ``batch_size`` 32, shuffled) with 0 and 2 workers,
against the same trials' float16 active patches read from a flat trial-major binary file with one
``os.pread`` of exactly ``bytes_per_trial`` per trial, converted to a float32 tensor and stacked into the same
batches (the work the DataModule's dataset + ``default_collate`` do). The pread baseline runs twice:

- ``pread_dataloader``: a minimal ``Dataset`` behind the same ``DataLoader`` settings (workers, batch size,
  the DataModule's own shuffled order), so each (workers x cache) cell compares like with like;
- ``pread_loop``: a bare Python loop, one process, no DataLoader (the floor).

The store's chunks carry HDF5's Fletcher32 checksum (schema version 2), which HDF5 verifies as
:meth:`Store.patches` reads each trial through its filter pipeline. One more DataModule pass prices it:
``datamodule_unverified`` reads the same trials as direct chunk reads without the check (the read of the stores
before checksums; ``Store.verify_checksums = False``). ``checksum`` = DataModule / DataModule unverified.

Each cell runs cold (the files' pages dropped from the page cache: ``posix_fadvise(DONTNEED)`` after
``fsync``, plus ``echo 1 > /proc/sys/vm/drop_caches`` where permitted) and warm (right after a full
sequential read of the file). The residency of each file just before its timed pass is measured with
``mincore`` and reported, so a cold pass that was not really cold shows. Note: on a VM the host may still
cache the disk image, so "cold" means "not in this kernel's page cache".

Usage::

    python benchmarks/bench_datamodule.py [--trials N] [--workdir DIR] [--preset nsd] [--workers 0,2] ...

The store (``<workdir>/bench_<preset>.h5``) and the flat file are reused when present and up to date.
Results: a table on stdout and JSON at ``benchmarks/results/datamodule.json`` (``--json``).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import gc
import json
import math
import mmap
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

import neurovision

neurovision.setup_environment()  # the torchvision fix, before lightning (data_modules) imports torchvision

from data_modules.fmri import FMRIDataModule, FMRITrials  # noqa: E402
from neurovision.data.atomic import atomic_path  # noqa: E402
from neurovision.data.store import Store  # noqa: E402
from neurovision.sources import phantom  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_JSON = REPO / "benchmarks" / "results" / "datamodule.json"
# (n_train, n_test) per preset when not given: nsd -> 3 * (700 + 50 val + 20) = 2310 trials, ~1.0 GB,
# 2100 of them training trials; prepare takes ~3 min on 2 cores (~13 trials/s).
DEFAULT_SIZES: dict[str, tuple[int | None, int | None]] = {"nsd": (700, 20), "demo": (None, None),
                                                           "tiny": (None, None)}
READERS = ("datamodule", "datamodule_unverified", "pread_dataloader", "pread_loop", "pread_loop_numpy")


# ----------------------------------------------------------------------------------------- page cache
def resident_fraction(path: str | os.PathLike[str]) -> float | None:
    """Fraction of the file's pages in the page cache (``mincore``); None when it cannot be measured."""
    try:
        size = os.path.getsize(path)
        if size == 0:
            return 1.0
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        page = os.sysconf("SC_PAGE_SIZE")
        n_pages = (size + page - 1) // page
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr is None or addr == ctypes.c_void_p(-1).value:
                return None
            try:
                vec = np.zeros(n_pages, dtype=np.uint8)
                if libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec.ctypes.data) != 0:
                    return None
                return float((vec & 1).mean())
            finally:
                libc.munmap(ctypes.c_void_p(addr), ctypes.c_size_t(size))
        finally:
            os.close(fd)
    except (OSError, AttributeError):
        return None


def drop_cache(paths: list[Path], global_drop: bool) -> dict[str, Any]:
    """Evict the files' pages: fsync + posix_fadvise(DONTNEED) each, then drop_caches when allowed."""
    methods = []
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    methods.append("posix_fadvise")
    drop_note = "not tried (--no-global-drop)"
    if global_drop:
        os.sync()
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("1\n")
            methods.append("drop_caches")
            drop_note = "ok"
        except OSError as e:
            drop_note = f"refused: {e.strerror or e}"
    return {"methods": methods, "drop_caches": drop_note}


def warm_cache(path: Path) -> None:
    """A full sequential read of the file, so every page is in the page cache."""
    buf = bytearray(8 << 20)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


# ----------------------------------------------------------------------------------------- flat file
def build_flat(store_path: Path, rows: np.ndarray, out: Path, progress: bool) -> tuple[bool, float]:
    """Write the given trials' float16 active patches trial-major into ``out`` (reused when up to date)."""
    store = Store(store_path)
    meta = {"store": str(store_path.resolve()), "fingerprint": store.attrs.get("fingerprint", ""),
            "created": store.attrs.get("created", ""), "n_rows": int(len(rows)),
            "trials_sha": _sha(rows), "shape": list(store.h5["trials/patches"].shape[1:])}
    meta_path = out.with_name(out.name + ".json")
    nbytes = int(np.prod(meta["shape"])) * 2
    if out.exists() and meta_path.exists() and out.stat().st_size == nbytes * len(rows):
        try:
            if json.loads(meta_path.read_text()) == meta:
                store.close()
                return True, 0.0
        except (OSError, ValueError):
            pass
    t0 = time.perf_counter()
    ds = store.h5["trials/patches"]
    buf = np.empty(ds.shape[1:], dtype=np.float16)
    with atomic_path(out) as tmp, open(tmp, "wb", buffering=0) as f:
        for t in tqdm(rows, desc="flat file", unit="trial", disable=not progress, file=sys.stderr):
            ds.read_direct(buf, np.s_[int(t)])
            f.write(memoryview(buf).cast("B"))
        f.flush()
        os.fsync(f.fileno())
    _atomic_write(meta_path, json.dumps(meta, indent=1))
    store.close()
    return False, time.perf_counter() - t0


def _sha(a: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(a, dtype=np.int64).tobytes()).hexdigest()[:16]


class PreadTrials(Dataset):
    """Row ``i`` of a flat trial-major float16 file: one ``os.pread`` -> float32 tensor (A, P**3)."""

    def __init__(self, path: Path, shape: tuple[int, int], n_rows: int) -> None:
        self.path = str(path)
        self.shape = shape
        self.nbytes = int(np.prod(shape)) * 2
        self.n_rows = n_rows
        self._fd: int | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return self.n_rows

    def _file(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd = os.open(self.path, os.O_RDONLY)
            self._pid = os.getpid()
        return self._fd

    def read(self, row: int) -> bytes:
        buf = os.pread(self._file(), self.nbytes, int(row) * self.nbytes)
        if len(buf) != self.nbytes:
            raise OSError(f"{self.path}: short read at row {row}: {len(buf)} of {self.nbytes} bytes")
        return buf

    def __getitem__(self, row: int) -> torch.Tensor:
        buf = self.read(row)
        with warnings.catch_warnings():  # read-only bytes: fine, .float() makes a new tensor
            warnings.simplefilter("ignore", UserWarning)
            x = torch.frombuffer(buf, dtype=torch.float16)
        return x.view(self.shape).float()

    def getitem_numpy(self, row: int) -> torch.Tensor:
        """The same, converting with numpy's ``astype`` (what ``FMRITrials`` does): a diagnostic."""
        x = np.frombuffer(self.read(row), dtype=np.float16).reshape(self.shape).astype(np.float32)
        return torch.from_numpy(x)

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fd": None, "_pid": None}


# ----------------------------------------------------------------------------------------- timed passes
def _shutdown(loader: DataLoader, it: Any) -> None:
    for x in (it, getattr(loader, "_iterator", None)):
        if x is not None and hasattr(x, "_shutdown_workers"):
            x._shutdown_workers()
    loader._iterator = None  # type: ignore[attr-defined]


def _iterate(loader: DataLoader, n_batches: int, key: str | None, desc: str, progress: bool,
             total: int) -> tuple[float, float, int, list[np.ndarray]]:
    """Time ``n_batches`` batches (from ``iter()``, so worker start-up counts); returns (s, first, n, trials)."""
    seen: list[np.ndarray] = []
    n = 0
    first = math.nan
    bar = tqdm(total=total, desc=desc, unit="vol", disable=not progress, file=sys.stderr, leave=False)
    t0 = time.perf_counter()
    it = iter(loader)
    try:
        for b, batch in enumerate(it):
            if b == 0:
                first = time.perf_counter() - t0
            x = batch["patches"] if key else batch
            n += int(x.shape[0])
            if key:
                seen.append(batch[key].numpy())
            bar.update(int(x.shape[0]))
            if b + 1 >= n_batches:
                break
        dt = time.perf_counter() - t0
    finally:
        bar.close()
        _shutdown(loader, it)
    return dt, first, n, seen


def pass_datamodule(store_path: Path, workers: int, batch_size: int, n_batches: int, seed: int,
                    progress: bool, desc: str, verify: bool = True) -> tuple[dict[str, Any], np.ndarray]:
    """One pass of the training dataloader; ``verify=False``: unverified direct chunk reads (the store's
    per-instance switch, pickled into the workers)."""
    torch.manual_seed(seed)  # the shuffled order of the pass (same in every cell)
    dm = FMRIDataModule(store_path, batch_size=batch_size, num_workers=workers, mixup_prob=0.0)
    dm.prepare_data()
    dm.store.verify_checksums = verify
    dm.setup("fit")
    loader = dm.train_dataloader()
    total = min(n_batches * batch_size, len(dm.datasets["train"]))
    dt, first, n, seen = _iterate(loader, n_batches, "trial", desc, progress, total)
    dm.teardown("fit")
    del loader, dm
    gc.collect()
    return {"seconds": dt, "first_batch_s": first, "trials": n}, np.concatenate(seen)


def pass_pread_dataloader(ds: PreadTrials, order: np.ndarray, workers: int, batch_size: int,
                          progress: bool, desc: str) -> dict[str, Any]:
    loader = DataLoader(ds, batch_size=batch_size, sampler=order.tolist(), num_workers=workers,
                        persistent_workers=workers > 0, drop_last=False)
    n_batches = math.ceil(len(order) / batch_size)
    dt, first, n, _ = _iterate(loader, n_batches, None, desc, progress, len(order))
    del loader
    gc.collect()
    return {"seconds": dt, "first_batch_s": first, "trials": n}


def pass_pread_loop(ds: PreadTrials, order: np.ndarray, batch_size: int, progress: bool,
                    desc: str, numpy_convert: bool = False) -> dict[str, Any]:
    bar = tqdm(total=len(order), desc=desc, unit="vol", disable=not progress, file=sys.stderr, leave=False)
    rows = order.tolist()
    get = ds.getitem_numpy if numpy_convert else ds.__getitem__
    first = math.nan
    t0 = time.perf_counter()
    for s in range(0, len(rows), batch_size):
        batch = torch.stack([get(r) for r in rows[s:s + batch_size]])
        if s == 0:
            first = time.perf_counter() - t0
        bar.update(int(batch.shape[0]))
    dt = time.perf_counter() - t0
    bar.close()
    ds.close()
    return {"seconds": dt, "first_batch_s": first, "trials": len(rows)}


# ----------------------------------------------------------------------------------------- report
def _geometry(store: Store) -> tuple[dict[str, Any], dict[str, Any]]:
    g = store.grid
    p3 = g.patch_size**3
    stored = g.n_active * p3 * 2
    grid_vox = int(np.prod(g.shape))
    pad_vox = int(np.prod(g.padded_shape))
    geometry = {"grid": list(g.shape), "padded_grid": list(g.padded_shape), "patch_size": g.patch_size,
                "active_patches": g.n_active, "total_patches": g.n_patches,
                "active_fraction": g.n_active / g.n_patches}
    b = {"stored_active_float16": stored,
         "padded_grid_float16": pad_vox * 2, "padded_grid_float32": pad_vox * 4,
         "grid_float16": grid_vox * 2, "grid_float32": grid_vox * 4}
    b["ratio_to_stored"] = {k: v / stored for k, v in b.items() if k != "stored_active_float16"}
    return geometry, b


def _fmt_table(res: dict[str, Any]) -> str:
    geo, by, cfg = res["geometry"], res["bytes_per_trial"], res["config"]
    lines = []
    gs = "x".join(map(str, geo["grid"]))
    ps = "x".join(map(str, geo["padded_grid"]))
    lines.append(f"store {res['store']['path']}  ({res['store']['file_bytes'] / 1e9:.2f} GB, "
                 f"{res['store']['trials']} trials, {res['store']['train_trials']} training)")
    lines.append(f"grid {gs} (padded {ps}), patch {geo['patch_size']}: active patches "
                 f"{geo['active_patches']} / {geo['total_patches']} ({100 * geo['active_fraction']:.1f} %)")
    lines.append("")
    lines.append(f"{'bytes per trial':<36}{'bytes':>12}{'x stored':>10}")
    rows = [("stored: active patches, float16", "stored_active_float16"),
            (f"padded grid {ps}, float16", "padded_grid_float16"),
            (f"padded grid {ps}, float32", "padded_grid_float32"),
            (f"grid {gs}, float16", "grid_float16"),
            (f"grid {gs}, float32", "grid_float32")]
    for label, k in rows:
        r = 1.0 if k == "stored_active_float16" else by["ratio_to_stored"][k]
        lines.append(f"{label:<36}{by[k]:>12,}{r:>9.2f}x")
    lines.append("")
    c = res["cache"]
    lines.append(f"cold cache: {'+'.join(c['methods']) or 'n/a'} (drop_caches: {c['drop_caches']}); "
                 f"warm: right after a full sequential read. res = page-cache residency before the pass")
    lines.append(f"{cfg['trials_per_pass']} trials per pass, batch {cfg['batch_size']}, shuffled; best of "
                 f"{cfg['repeats']} run(s); vol/s (MB/s of float16 read); torch threads in the main process: "
                 f"{cfg['torch_threads']}")
    lines.append("ratio = DataModule / pread+DataLoader (same workers, same order); "
                 "loop ratio = DataModule / bare pread loop; checksum = DataModule (Fletcher32 verified) / "
                 "DataModule unverified")
    hdr = (f"{'cache':<6}{'workers':>8}  {'DataModule':>17}{'res':>5}  {'pread+DataLoader':>17}{'res':>5}"
           f"  {'ratio':>6}  {'pread loop':>17}{'loop ratio':>11}  {'unverified':>17}{'checksum':>9}")
    lines.append(hdr)
    lines.append("-" * len(hdr))

    def cell(r: dict[str, Any] | None) -> str:
        if r is None:
            return f"{'-':>17}{'':>5}"
        rf = r.get("resident_before")
        res_s = "?" if rf is None else f"{100 * rf:.0f}%"
        return f"{r['volumes_per_s']:>8.1f} ({r['mb_per_s']:>5.0f}){res_s:>5}"

    for cache in cfg["cache_modes"]:
        for w in cfg["workers"]:
            get = {r["reader"]: r for r in res["results"] if r["cache"] == cache and r["workers"] == w}
            ratio = res["ratios"].get(f"{cache}/workers={w}")
            lr = res["ratios"].get(f"{cache}/workers={w}/vs_pread_loop")
            loop = get.get("pread_loop")
            loop_s = f"{'-':>17}" if loop is None else f"{loop['volumes_per_s']:>8.1f} ({loop['mb_per_s']:>5.0f})"
            un = get.get("datamodule_unverified")
            un_s = f"{'-':>17}" if un is None else f"{un['volumes_per_s']:>8.1f} ({un['mb_per_s']:>5.0f})"
            cr = res["ratios"].get(f"{cache}/workers={w}/checksum")
            lines.append(f"{cache:<6}{w:>8}  {cell(get.get('datamodule'))}  {cell(get.get('pread_dataloader'))}  "
                         f"{'-' if ratio is None else f'{ratio:.2f}':>6}  {loop_s}"
                         f"{'' if lr is None else f'{lr:.2f}':>11}  {un_s}{'' if cr is None else f'{cr:.2f}':>9}")
    np_rows = [r for r in res["results"] if r["reader"] == "pread_loop_numpy"]
    if np_rows:
        lines.append("diagnostic, bare pread loop converting with numpy astype (float16->float32 in numpy is ~10x slower than in torch) instead of "
                     "torch: " + ", ".join(f"{r['cache']} {r['volumes_per_s']:.1f} vol/s" for r in np_rows))
    lines.append("")
    la0, la1 = res["machine"]["loadavg_start"], res["machine"]["loadavg_end"]
    lines.append(f"load average (1 min) {la0[0]:.2f} at start, {la1[0]:.2f} at end on {res['machine']['cpu_count']} "
                 f"CPUs (other processes skew timings)")
    lines.append(f"total runtime {res['runtime_s']:.1f} s (store prepare {res['store']['prepare_s']:.1f} s"
                 f"{', reused' if res['store']['reused'] else ''}; flat file {res['flat_file']['build_s']:.1f} s"
                 f"{', reused' if res['flat_file']['reused'] else ''})")
    return "\n".join(lines)


def _atomic_write(path: Path, text: str) -> None:
    with atomic_path(path, suffix=".tmp") as tmp:
        tmp.write_text(text)


def _int_list(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def _cache_list(s: str) -> list[str]:
    out = [x.strip() for x in s.split(",") if x.strip()]
    if not out or any(x not in ("cold", "warm") for x in out):
        raise argparse.ArgumentTypeError(f"cache modes must be cold and/or warm, got {s!r}")
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--trials", type=int, default=0,
                   help="trials streamed per timed pass (rounded up to whole batches); 0 = the whole "
                        "training epoch")
    p.add_argument("--workdir", type=Path, default=REPO / ".bench", help="where the store and flat file go")
    p.add_argument("--preset", default="nsd", choices=sorted(phantom.PRESETS), help="phantom preset (geometry)")
    p.add_argument("--n-train", type=int, default=None,
                   help="training images of the store (3 repeats each); default 700 for nsd, else the preset's")
    p.add_argument("--n-test", type=int, default=None, help="shared test images; default 20 for nsd")
    p.add_argument("--n-subjects", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="phantom seed and shuffle seed")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=_int_list, default=[0, 2], help="comma-separated num_workers values")
    p.add_argument("--cache-modes", type=_cache_list, default=["cold", "warm"], help="cold,warm")
    p.add_argument("--repeats", type=int, default=2,
                   help="runs of the whole sweep (interleaved); each cell reports its best run")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="torch intra-op threads of the main process, where workers=0 collates (workers always "
                        "use 1); 0 = torch's default. 1 by default: a multi-threaded torch.stack of a 27 MB "
                        "batch collapses when the CPUs are oversubscribed")
    p.add_argument("--no-global-drop", action="store_true",
                   help="cold cache by posix_fadvise only (do not write /proc/sys/vm/drop_caches)")
    p.add_argument("--no-numpy-diagnostic", action="store_true",
                   help="skip the pread loop that converts with numpy astype")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write the results")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.batch_size < 1 or any(w < 0 for w in args.workers) or not args.workers:
        p.error("--repeats and --batch-size must be >= 1 and --workers non-negative")
    return args


# ----------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    t_start = time.perf_counter()
    load_start = list(os.getloadavg())
    progress = not args.no_progress
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    d_train, d_test = DEFAULT_SIZES.get(args.preset, (None, None))
    n_train = args.n_train if args.n_train is not None else d_train
    n_test = args.n_test if args.n_test is not None else d_test
    threads_before = torch.get_num_threads()
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    try:
        out = _run(args, workdir, n_train, n_test, progress)
    finally:
        torch.set_num_threads(threads_before)
    out["machine"]["loadavg_start"] = load_start
    out["machine"]["loadavg_end"] = list(os.getloadavg())
    out["runtime_s"] = time.perf_counter() - t_start
    print(_fmt_table(out), flush=True)
    _atomic_write(args.json, json.dumps(out, indent=1, allow_nan=False, default=_json_default) + "\n")
    print(f"[bench] wrote {args.json}", file=sys.stderr, flush=True)
    return out


def _run(args: argparse.Namespace, workdir: Path, n_train: int | None, n_test: int | None,
         progress: bool) -> dict[str, Any]:
    # the store (phantom.prepare is a no-op when an up-to-date one is there)
    store_path = workdir / f"bench_{args.preset}.h5"
    before = _created(store_path)
    print(f"[bench] store {store_path} (preset={args.preset}, n_subjects={args.n_subjects}, n_train={n_train}, "
          f"n_test={n_test})", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    phantom.prepare(store_path, preset=args.preset, seed=args.seed, n_subjects=args.n_subjects,
                    n_train=n_train, n_test=n_test)
    prepare_s = time.perf_counter() - t0
    store = Store(store_path)
    train = FMRITrials(store, "train", [s.index for s in store.subjects], "trials")
    train_trials = np.sort(np.asarray(train.items, dtype=np.int64))  # flat-file row r = r-th training trial
    shape = tuple(int(x) for x in store.h5["trials/patches"].shape[1:])
    geometry, bytes_per_trial = _geometry(store)
    store_info = {"path": str(store_path), "file_bytes": store_path.stat().st_size, "trials": len(store),
                  "train_trials": int(len(train_trials)), "prepare_s": prepare_s,
                  "reused": before is not None and before == store.attrs.get("created"),
                  "fingerprint": store.attrs.get("fingerprint", "")}
    store.close()
    del train

    flat_path = workdir / f"bench_{args.preset}.train.f16"
    print(f"[bench] flat file {flat_path}", file=sys.stderr, flush=True)
    flat_reused, flat_s = build_flat(store_path, train_trials, flat_path, progress)
    pread_ds = PreadTrials(flat_path, shape, len(train_trials))  # type: ignore[arg-type]

    n_avail = len(train_trials)
    per_pass = n_avail if args.trials <= 0 else min(args.trials, n_avail)
    n_batches = math.ceil(per_pass / args.batch_size)
    per_pass = min(n_batches * args.batch_size, n_avail)
    mb = bytes_per_trial["stored_active_float16"] / 1e6

    cache_info: dict[str, Any] = {"methods": [], "drop_caches": "not used (no cold pass)"}
    runs: dict[tuple[str, int, str], list[dict[str, Any]]] = {}

    def prime(cache: str, path: Path) -> float | None:
        nonlocal cache_info
        if cache == "cold":
            cache_info = drop_cache([store_path, flat_path], not args.no_global_drop)
        else:
            warm_cache(path)
        return resident_fraction(path)

    def record(cache: str, workers: int, reader: str, r: dict[str, Any], resident: float | None) -> None:
        r = {**r, "volumes_per_s": r["trials"] / r["seconds"], "mb_per_s": r["trials"] * mb / r["seconds"],
             "resident_before": resident}
        runs.setdefault((cache, workers, reader), []).append(r)
        rf = "?" if resident is None else f"{100 * resident:.0f}%"
        print(f"[bench] {cache:<4} workers={workers} {reader:<17} {r['volumes_per_s']:8.1f} vol/s "
              f"({r['mb_per_s']:5.0f} MB/s, resident before {rf})", file=sys.stderr, flush=True)

    for rep in range(args.repeats):
        for cache in args.cache_modes:
            for w in args.workers:
                tag = f"[{rep + 1}/{args.repeats}] {cache} w={w}"
                res_dm = prime(cache, store_path)
                r, order_trials = pass_datamodule(store_path, w, args.batch_size, n_batches, args.seed, progress,
                                                  f"{tag} DataModule")
                record(cache, w, "datamodule", r, res_dm)
                rows = np.searchsorted(train_trials, order_trials)  # the DataModule's order, as flat-file rows
                if not np.array_equal(train_trials[rows], order_trials):
                    raise RuntimeError("the DataModule streamed trials outside the training split")
                res_dm = prime(cache, store_path)
                r, order_u = pass_datamodule(store_path, w, args.batch_size, n_batches, args.seed, progress,
                                             f"{tag} DataModule unverified", verify=False)
                if not np.array_equal(order_u, order_trials):
                    raise RuntimeError("the unverified DataModule pass streamed another order")
                record(cache, w, "datamodule_unverified", r, res_dm)
                res_p = prime(cache, flat_path)
                r = pass_pread_dataloader(pread_ds, rows, w, args.batch_size, progress, f"{tag} pread+DL")
                record(cache, w, "pread_dataloader", r, res_p)
                if w == 0:
                    res_p = prime(cache, flat_path)
                    r = pass_pread_loop(pread_ds, rows, args.batch_size, progress, f"{tag} pread loop")
                    record(cache, w, "pread_loop", r, res_p)
                    if not args.no_numpy_diagnostic:
                        res_p = prime(cache, flat_path)
                        r = pass_pread_loop(pread_ds, rows, args.batch_size, progress, f"{tag} pread loop np",
                                            numpy_convert=True)
                        record(cache, w, "pread_loop_numpy", r, res_p)

    results: list[dict[str, Any]] = []
    for (cache, w, reader), rs in runs.items():
        best = max(rs, key=lambda r: r["volumes_per_s"])
        results.append({"cache": cache, "workers": w, "reader": reader, **best,
                        "runs_volumes_per_s": [r["volumes_per_s"] for r in rs]})
    ratios: dict[str, float] = {}
    for cache in args.cache_modes:
        for w in args.workers:
            get = {r["reader"]: r["volumes_per_s"] for r in results if r["cache"] == cache and r["workers"] == w}
            ratios[f"{cache}/workers={w}"] = get["datamodule"] / get["pread_dataloader"]
            if "pread_loop" in get:
                ratios[f"{cache}/workers={w}/vs_pread_loop"] = get["datamodule"] / get["pread_loop"]
            ratios[f"{cache}/workers={w}/checksum"] = get["datamodule"] / get["datamodule_unverified"]
            ratios[f"{cache}/workers={w}/unverified_vs_pread"] = get["datamodule_unverified"] / get["pread_dataloader"]

    return {
        "benchmark": "datamodule",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "config": {"preset": args.preset, "n_subjects": args.n_subjects, "n_train": n_train, "n_test": n_test,
                   "seed": args.seed, "batch_size": args.batch_size, "workers": args.workers,
                   "cache_modes": args.cache_modes, "trials_per_pass": per_pass, "repeats": args.repeats,
                   "torch_threads": torch.get_num_threads(), "global_drop": not args.no_global_drop,
                   "mixup_prob": 0.0, "mode": "trials", "shuffle": True},
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                    "h5py": h5py.__version__, "hdf5": h5py.version.hdf5_version},
        "store": store_info,
        "flat_file": {"path": str(flat_path), "file_bytes": flat_path.stat().st_size, "reused": flat_reused,
                      "build_s": flat_s},
        "geometry": geometry,
        "bytes_per_trial": bytes_per_trial,
        "cache": cache_info,
        "results": results,
        "ratios": ratios,
    }


def _created(path: Path) -> str | None:
    """The ``created`` attr of a valid store at ``path`` (None when absent or invalid)."""
    try:
        return Store(path).attrs.get("created")
    except (OSError, ValueError):
        return None


def _json_default(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x)}")


if __name__ == "__main__":
    main()
