"""The tables of a sweep: each done run's metrics (the last row of each metric in its commands' MetricsTables)
-> ``results.csv`` (one row per run x metric), ``summary.csv`` (mean, sd, n over seeds, with pandas) and
``results.parquet``; then the sweep's ``after`` hooks."""

from __future__ import annotations

import csv
import fnmatch
import json
import logging
import math
import re
from pathlib import Path
from typing import Any

from neurovision.data.atomic import atomic_path
from neurovision.runs.sweep.plan import read_status, run_done
from neurovision.runs.sweep.spec import (
    AFTER_HOOKS,
    RESERVED_COLUMNS,
    Run,
    Sweep,
    SweepError,
    after_function,
    override_keys,
    short_names,
)

log = logging.getLogger(__name__)

TABLE_FIELDS = ["epoch", "step", "stage", "metric", "value"]


def combine_tables(run_dir: Path, commands: list[str]) -> list[dict[str, str]]:
    """The commands' MetricsTable rows in command order (rows repeated from a restored checkpoint dropped)."""
    rows: list[dict[str, str]] = []
    seen: set[tuple[str, ...]] = set()
    for cmd in commands:
        folder = run_dir / cmd
        table = folder / "metrics_table.csv"
        if not table.is_file():
            found = sorted(folder.rglob("metrics_table.csv"), key=lambda p: p.stat().st_mtime_ns) if folder.is_dir() else []
            if not found:
                continue
            table = found[-1]
        with open(table, newline="") as f:
            for r in csv.DictReader(f):
                key = tuple(str(r.get(k, "")) for k in TABLE_FIELDS)
                if key not in seen:
                    seen.add(key)
                    rows.append({k: r.get(k, "") for k in TABLE_FIELDS})
    return rows


def final_metrics(rows: list[dict[str, str]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for r in rows:
        try:
            out[r["metric"]] = float(r["value"])
        except (TypeError, ValueError):
            continue
    return out


def write_table(path: Path, rows: list[dict[str, Any]], fields: list[str]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def metric_selected(name: str, patterns: list[str]) -> bool:
    inc = [p for p in patterns if not p.startswith("!")]
    exc = [p[1:] for p in patterns if p.startswith("!")]
    return any(fnmatch.fnmatchcase(name, p) for p in inc) and not any(fnmatch.fnmatchcase(name, p) for p in exc)


def _cell(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float, str)):
        return v
    return json.dumps(v, separators=(",", ":"), sort_keys=True)


def aggregate(sweep: Sweep, runs: list[Run], out: Path) -> dict[str, Any]:
    """Write ``results.csv``/``summary.csv`` (and ``results.parquet``) from the done runs; the tables."""
    import pandas as pd

    keys = override_keys(sweep)
    labels = short_names(keys)
    cols = [labels[k] for k in keys]
    results: list[dict[str, Any]] = []
    missing: list[str] = []
    for run in runs:
        st = read_status(run.dir)
        if not run_done(sweep, st):
            continue
        assert st is not None
        rows = combine_tables(run.dir, sweep.commands)
        if not rows and (run.dir / "metrics_table.csv").is_file():
            with open(run.dir / "metrics_table.csv", newline="") as f:
                rows = list(csv.DictReader(f))
        values = final_metrics(rows) if rows else dict(st.get("metrics") or {})
        chosen = {m: v for m, v in sorted(values.items()) if metric_selected(m, sweep.metrics)}
        if not chosen:
            missing.append(run.name)
        resolved = st.get("resolved") or {}
        base = {"run": run.name, "seed": _cell(run.seed if run.seed is not None else st.get("seed"))}
        for k in keys:
            base[labels[k]] = _cell(run.overrides[k] if k in run.overrides else resolved.get(k))
        split = [(*metric_columns(m), v) for m, v in chosen.items()]
        split.sort(key=lambda t: (tuple((isinstance(x, str), x) for x in t[1].values()), t[0]))  # numeric order
        for name, extra, v in split:
            cols += [c for c in extra if c not in cols]
            results.append({**base, **extra, "metric": name, "value": v})
    for r in results:
        for c in cols:
            r.setdefault(c, "")
    rfields = ["run", "seed", *cols, "metric", "value"]
    res = pd.DataFrame(results, columns=rfields, dtype=object)
    write_table(out / "results.csv", res.to_dict("records"), rfields)
    # summary: mean, sample sd and n over the seeds of each (override columns, metric); the columns' cells are
    # compared as text (a column may mix numbers and strings), groups in order of first appearance
    keyed = res.assign(**{f"_key{i}": res[c].astype(str) for i, c in enumerate([*cols, "metric"])})
    gkeys = [f"_key{i}" for i in range(len(cols) + 1)]
    grouped = keyed.assign(value=keyed["value"].astype(float)).groupby(gkeys, sort=False)
    summ = grouped[[*cols, "metric"]].first()
    stats = grouped["value"].agg(["mean", "std", "count"])
    summary = [{**{c: r[c] for c in [*cols, "metric"]}, "mean": float(s["mean"]),
                "sd": float(s["std"]) if s["count"] > 1 else math.nan, "n": int(s["count"])}
               for (_, r), (_, s) in zip(summ.iterrows(), stats.iterrows(), strict=True)]
    write_table(out / "summary.csv", summary, [*cols, "metric", "mean", "sd", "n"])
    _write_parquet(out / "results.parquet", results, rfields)
    return {"results": res.to_dict("records"), "summary": summary, "columns": cols, "no_metrics": missing}


def metric_columns(name: str) -> tuple[str, dict[str, Any]]:
    """``test/average/beta=0.93/ssim`` -> (``test/average/ssim``, {"beta": 0.93}): path components ``<key>=<value>``
    (key an identifier, not a reserved column) become columns; numbers are read as numbers."""
    parts, extra = [], {}
    for comp in name.split("/"):
        m = re.fullmatch(r"([A-Za-z_][\w.]*)=([^=]+)", comp)
        if m is None or m.group(1) in RESERVED_COLUMNS or m.group(1) in extra:
            parts.append(comp)
            continue
        try:
            value: Any = float(m.group(2))
        except ValueError:
            value = m.group(2)
        extra[m.group(1)] = value
    return "/".join(parts), extra


def _write_parquet(path: Path, rows: list[dict[str, Any]], fields: list[str]) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return
    columns: dict[str, list[Any]] = {}
    for f in fields:
        col = [r[f] for r in rows]
        types = {type(v) for v in col if v != ""}
        if f == "value":
            col = [float(v) for v in col]
        elif len(types) != 1 or "" in col:
            col = [str(v) for v in col]
        columns[f] = col
    try:
        with atomic_path(path) as tmp:
            pq.write_table(pa.table(columns), tmp)
    except Exception as e:  # noqa: BLE001  (the CSVs are the contract; Parquet is a convenience)
        log.warning("neurovision sweep: results.parquet not written: %s", e)


def _fmt(x: float) -> str:
    return "nan" if isinstance(x, float) and math.isnan(x) else f"{x:.4g}"


def format_summary(tables: dict[str, Any]) -> str:
    cols = tables["columns"]
    rows = [[str(r[c]) for c in cols] + [r["metric"], f"{_fmt(r['mean'])} ± {_fmt(r['sd'])}" if r["n"] > 1
                                          else _fmt(r["mean"]), str(r["n"])] for r in tables["summary"]]
    head = [*cols, "metric", "mean ± sd", "n"]
    if not rows:
        return "no results (no run is done, or no metric matches)"
    width = [max(len(x) for x in col) for col in zip(head, *rows, strict=True)]
    line = lambda xs: "  ".join(x.ljust(w) for x, w in zip(xs, width, strict=True)).rstrip()  # noqa: E731
    return "\n".join([line(head), *(line(r) for r in rows)])


def run_after(sweep: Sweep, out: Path) -> bool:
    """Call each ``after`` function with the out folder; False when one failed (reported, the others still run).
    Only registered functions (:data:`AFTER_HOOKS`) are called, whatever ``sweep.after`` holds."""
    import traceback

    ok = True
    for name in sweep.after:
        try:
            if name not in AFTER_HOOKS:  # load_sweep refuses it; a Sweep built in code must not bypass that
                raise SweepError(f"{sweep.path}: after: {name!r} is not an allowed after function")
            result = after_function(name)(out)
        except Exception:  # noqa: BLE001  (the tables are written; report the hook's error and go on)
            log.error("neurovision sweep: after: %s failed:\n%s", name, traceback.format_exc())
            ok = False
            continue
        log.info("after: %s%s", name, f" -> {len(result)} files" if isinstance(result, (list, tuple)) else "")
    return ok
