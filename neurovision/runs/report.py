"""``neurovision report <run-or-sweep-dir> [--out report.html]``: one self-contained static HTML dashboard, summary first.

The page, in this order:

1. **Headline**: one table of the chain's numbers, whichever the folder has -- stage 1 test retrieval
   (averaged / single trials, with the chance level), stage 2 caption scores (CIDEr, METEOR, CLIP-S) and
   reasoning QA (exact match), the shuffled-fMRI control where a run's folder name says ``shuffled``, stage 3's
   best β (mean CLIP two-way identification of the sweep's ``beta_table.csv``) with its scores at that β, the
   mean concept-map r (``concept_r.csv``) and the encoding integration-site F1 (``summary.json``). Sweeps that
   are not β sweeps give the best combination of their ``summary.csv`` for the same metrics.
2. **Key figures**: the figures the stages wrote -- a β sweep's ``beta_curves.png`` and reconstruction grids
   (``beta_grid_*.png``, :mod:`neurovision.runs.beta_figures`), the encoding's glass brain.
3. **The stages in chain order**: stage 1 (each run: final test metrics as group × metric, validation curves,
   its config; the concept maps with their r table), stage 2 (captions/QA, the first generated texts), stage 3
   (the sweep's ``summary.csv`` as it is, its other figures), encoding (summary and integration sites), then
   other runs, sweeps and figures.
4. **Run index**: every run folder (stage, state, where its numbers come from) and each sweep's per-run
   ``results.csv``.

One results schema: the files the runs and ``neurovision sweep`` wrote (``metrics_table.csv``,
``results.csv``/``summary.csv``, ``beta_table.csv``, ``concept_r.csv``, ``summary.json``), read, never
re-aggregated (a sweep without ``summary.csv`` shows its per-run table and says so). A run folder is the folder
above a logger's ``tb/version_N`` (a ``fit`` and its ``test`` write two tables there; the newest with test rows
gives the final metrics) or, inside a sweep, the sweep's run folder. The stage of a run is its config's task
(``model.class_path``), else its metric names. Figures are the PNGs the stages wrote, embedded as base64 data
URIs; only the per-run validation curves are drawn here (matplotlib's Agg canvas; nothing writes them). The HTML
comes from one Jinja2 template (``neurovision/runs/templates/report.html.j2``, autoescaped), and the file is
written atomically (default ``<dir>/report.html``).

The headline readers (:func:`last_test_metrics`, :func:`best_beta`, :func:`encoding_scores`) are shared with
``benchmarks/demo_headline.py``, the numbers ``make demo`` prints.
"""

from __future__ import annotations

import base64
import csv
import datetime as _dt
import io
import json
import logging
import math
import os
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neurovision.data.atomic import atomic_path

log = logging.getLogger(__name__)

METRICS_TABLE = "metrics_table.csv"
TEMPLATE = "report.html.j2"
IMAGE_SUFFIXES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}
GENERATIONS_RE = re.compile(r"^test_generations_.*\.jsonl$")
GENERATION_ROWS = 10
PREFERRED_TEXT_KEYS = ("subject_name", "subject", "stimulus", "trial", "condition", "type", "prompt", "question",
                       "generated", "answer", "prediction", "reference", "references")
ENCODING_SITES = "sites.csv"  # written by `neurovision encode` (with summary.json and the two figures below)
ENCODING_FIGURES = ("sites_brain.png", "r_by_model.png", "r_by_layer.png")
ENCODING_KEY_FIGURE = "sites_brain.png"
ENCODING_ROWS = 40
BETA_TABLE = "beta_table.csv"  # neurovision.runs.beta_figures.figures
BETA_CURVES = "beta_curves.png"
NON_OVERRIDE = {"run", "seed", "metric", "value", "mean", "sd", "std", "n"}
LOGGER_DIRS = {"tb", "lightning_logs", "csv_logs"}  # <run>/<logger dir>/version_N/metrics_table.csv
PROGRESS_MIN_FILES = 200  # show a progress bar from this many scanned files on
#: the stages in chain order: (key, section title, the tasks' class names)
STAGES = (("stage1", "Stage 1: fMRI → CLIP / VAE alignment", ("AlignmentTask",)),
          ("stage2", "Stage 2: instruction tuning (captions, QA)", ("InstructTask",)),
          ("stage3", "Stage 3: reconstruction (β sweep)", ("ReconstructionTask",)))
RETRIEVAL = ("retrieval_fmri2img", "retrieval_chance")
CAPTION_SCORES = ("CIDEr", "METEOR", "CLIP-S")
QA_SCORE = "reasoning/exact_match/all"
CONDITIONS = ("average", "single")
STAGE_LABELS = {"stage1": "stage 1", "stage2": "stage 2", "stage2 control": "stage 2 control", "stage3": "stage 3"}
BETA_SCORE = "clip"  # stage 3's headline: the best mean CLIP two-way identification over β


class ReportError(ValueError):
    """Nothing recognisable to report (or a malformed input); the message names the directory."""


class Unreadable(ValueError):
    """A file that exists but does not hold what the chain writes (its message names the file)."""


# ----------------------------------------------------------------------------------------------- scanning


@dataclass
class Scan:
    """What :func:`scan` found under ``root`` (paths are absolute)."""

    root: Path
    metrics_tables: list[Path] = field(default_factory=list)
    configs: list[Path] = field(default_factory=list)
    results: list[Path] = field(default_factory=list)
    summaries: list[Path] = field(default_factory=list)
    images: list[Path] = field(default_factory=list)
    concept_r: list[Path] = field(default_factory=list)
    generations: list[Path] = field(default_factory=list)
    encodings: list[Path] = field(default_factory=list)
    beta_tables: list[Path] = field(default_factory=list)
    n_files: int = 0

    def empty(self) -> bool:
        return not (self.metrics_tables or self.configs or self.results or self.summaries or self.images
                    or self.concept_r or self.generations or self.encodings or self.beta_tables)

    def sweeps(self) -> list[Path]:
        """Folders holding a sweep's tables (``results.csv``, ``summary.csv`` or a β sweep's ``beta_table.csv``)."""
        return sorted({p.parent for p in self.results + self.summaries + self.beta_tables})


def scan(root: str | os.PathLike[str], exclude: Iterable[Path] = (), progress: bool | None = None) -> Scan:
    """Walk ``root`` (hidden files and folders, e.g. atomic writes' ``.*.partial``, are skipped)."""
    from tqdm.auto import tqdm

    root = Path(root).resolve()
    skip = {Path(p).resolve() for p in exclude}
    found = Scan(root)
    bar = tqdm(desc=f"scanning {root.name}", unit="file", disable=True if progress is False else None,
               file=sys.stderr, leave=False)
    try:
        for d, dirs, files in os.walk(root):
            dirs[:] = sorted(x for x in dirs if not x.startswith("."))
            here = Path(d)
            for name in sorted(files):
                found.n_files += 1
                if found.n_files == PROGRESS_MIN_FILES and progress is not False:
                    log.info("scanning %s: %d files so far", root, found.n_files)
                bar.update(1)
                if name.startswith("."):
                    continue
                p = here / name
                if p in skip:
                    continue
                low = name.lower()
                if name == METRICS_TABLE:
                    found.metrics_tables.append(p)
                elif name == "config.yaml":
                    found.configs.append(p)
                elif name == "results.csv":
                    found.results.append(p)
                elif name == "summary.csv":
                    found.summaries.append(p)
                elif name == "concept_r.csv":
                    found.concept_r.append(p)
                elif name == BETA_TABLE:
                    found.beta_tables.append(p)
                elif name == ENCODING_SITES:
                    found.encodings.append(p)
                elif GENERATIONS_RE.match(name):
                    found.generations.append(p)
                elif Path(low).suffix in IMAGE_SUFFIXES:
                    found.images.append(p)
    finally:
        bar.close()
    return found


# ------------------------------------------------------------------------------------------------ helpers


def _fmt(v: Any) -> str:
    """A number as 4 significant digits (ints as ints); anything else as text; NaN/None as an en dash."""
    if v is None:
        return "–"
    if isinstance(v, bool) or type(v).__name__ == "bool_":
        return str(bool(v))
    if isinstance(v, int):
        return str(v)
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    if math.isnan(f):
        return "–"
    if f.is_integer() and abs(f) < 1e15 and not isinstance(v, float):
        return str(int(f))
    return f"{f:.4g}"


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f} %"


def format_mean_sd(mean: Any, sd: Any, n: Any) -> str:
    """``mean ± sd (n)`` as shown in the sweep table (``mean (n)`` when sd is missing, e.g. n = 1)."""
    try:
        sd_f = float(sd)
    except (TypeError, ValueError):
        sd_f = math.nan
    n_s = _fmt(int(float(n))) if n is not None and not _isnan(n) else "?"
    if math.isnan(sd_f):
        return f"{_fmt(float(mean))} ({n_s})"
    return f"{_fmt(float(mean))} ± {_fmt(sd_f)} ({n_s})"


def _isnan(v: Any) -> bool:
    try:
        return math.isnan(float(v))
    except (TypeError, ValueError):
        return False


def finite_float(v: Any) -> float | None:
    """``v`` as a finite float; None when it is not a number, NaN or infinite."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _rel(p: Path, root: Path) -> str:
    try:
        return p.relative_to(root).as_posix() or "."
    except ValueError:
        return str(p)


def _name(d: Path, root: Path) -> str:
    """A directory's name in headings: its path below ``root`` (``root``'s own name for ``root``)."""
    return root.name if d == root else _rel(d, root)


READ_ERRORS = (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError, Unreadable)  # pandas: ValueErrors


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _fig_png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def _new_figure(w: float = 5.6, h: float = 3.2) -> tuple[Any, Any]:
    from matplotlib.figure import Figure  # the object API: no pyplot, no global backend switch

    fig = Figure(figsize=(w, h))
    return fig, fig.subplots()


# ------------------------------------------------------------------------------------- the results schema


def _split_metric(name: str) -> tuple[str, str, str]:
    """``test/average/sub-01/retrieval_fmri2img`` -> (``test``, ``average/sub-01``, ``retrieval_fmri2img``)."""
    parts = name.split("/")
    if len(parts) == 1:
        return "", "", parts[0]
    if len(parts) == 2:
        return parts[0], "", parts[1]
    return parts[0], "/".join(parts[1:-1]), parts[-1]


def read_metrics_table(path: Path) -> Any:
    """A :class:`callbacks.MetricsTable` CSV (``epoch, step, stage, metric, value``), values numeric."""
    import pandas as pd

    df = pd.read_csv(path)
    missing = {"epoch", "stage", "metric", "value"} - set(df.columns)
    if missing:
        raise ReportError(f"{path}: not a metrics table (missing columns {', '.join(sorted(missing))})")
    df["value"] = pd.to_numeric(df["value"], errors="coerce")
    df["epoch"] = pd.to_numeric(df["epoch"], errors="coerce")
    return df


def final_metrics(df: Any, stage: str) -> tuple[list[str], list[str], dict[tuple[str, str], float]]:
    """The last value of each ``<stage>/...`` metric as (groups, metrics, {(group, metric): value})."""
    rows = df[df["metric"].astype(str).str.startswith(stage + "/")]
    if stage == "val" and len(rows):
        rows = rows[rows["epoch"] == rows["epoch"].max()]
    last = rows.drop_duplicates("metric", keep="last")
    groups: list[str] = []
    metrics: list[str] = []
    cells: dict[tuple[str, str], float] = {}
    for name, value in zip(last["metric"].astype(str), last["value"], strict=True):
        _, g, m = _split_metric(name)
        g = g or "(all)"
        if g not in groups:
            groups.append(g)
        if m not in metrics:
            metrics.append(m)
        cells[(g, m)] = float(value)
    return groups, metrics, cells


def read_json_object(path: Path) -> dict[str, Any] | None:
    """A JSON object file; None when absent; :class:`Unreadable` when it is not one."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise Unreadable(f"{path}: {e}") from None
    if not isinstance(data, dict):
        raise Unreadable(f"{path}: not a JSON object")
    return data


def last_test_metrics(run_dir: Path, names: Sequence[str]) -> tuple[dict[str, float], Path | None]:
    """The last test-stage value of each of ``names`` in the newest ``metrics_table.csv`` under ``run_dir``
    that has any of them (a ``fit`` writes one table, the ``test`` another; the newest test wins)."""
    if not run_dir.is_dir():
        return {}, None
    tables = sorted(run_dir.rglob(METRICS_TABLE), key=lambda p: p.stat().st_mtime_ns, reverse=True)
    for table in tables:
        try:
            df = read_metrics_table(table)
        except (ReportError, OSError, ValueError, UnicodeDecodeError) as e:
            raise Unreadable(str(e) if isinstance(e, ReportError) else f"{table}: {e}") from None
        rows = df[(df["stage"] == "test") & df["metric"].isin(list(names))].dropna(subset=["value"])
        found = {str(m): float(v) for m, v in zip(rows["metric"], rows["value"], strict=True)}  # the last wins
        if found:
            return found, table
    return {}, None


def best_beta(path: Path, metric: str = BETA_SCORE) -> tuple[dict[str, str] | None, list[dict[str, str]]]:
    """The row of a β sweep's ``beta_table.csv`` with the highest mean ``metric`` (None when it has none) and
    every row of the table. :class:`Unreadable` when the file cannot be read."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, csv.Error, UnicodeDecodeError) as e:
        raise Unreadable(f"{path}: {e}") from None
    scored = [r for r in rows if r.get("metric") == metric and finite_float(r.get("mean")) is not None]
    return (max(scored, key=lambda r: float(r["mean"])) if scored else None), rows


def encoding_scores(path: Path) -> dict[str, float | None] | None:
    """Integration-site F1 per event set (and ``all``) of an encoding ``summary.json``; None when absent."""
    s = read_json_object(path)
    if s is None:
        return None
    sets = s.get("event_sets") or {}
    out = {name: finite_float(e.get("f1")) for name, e in sorted(sets.items()) if isinstance(e, dict)}
    if isinstance(s.get("all"), dict):
        out["all"] = finite_float(s["all"].get("f1"))
    return out


def concept_r_mean(path: Path) -> tuple[float | None, int]:
    """Mean r (and the number of maps) of a ``concept_r.csv`` (``subject, concept, r``)."""
    with open(path, newline="") as f:
        vals = [finite_float(r.get("r")) for r in csv.DictReader(f)]
    nums = [v for v in vals if v is not None]
    return (sum(nums) / len(nums) if nums else None), len(nums)


def _overrides(columns: Iterable[str]) -> list[str]:
    return [c for c in columns if c not in NON_OVERRIDE]


def read_sweep(summary: Path | None, results: Path | None) -> tuple[Any, list[str], Any]:
    """(summary frame ``<overrides...>, metric, mean, sd, n`` or None, override columns, results frame or None),
    as ``neurovision sweep`` wrote them (nothing recomputed)."""
    import pandas as pd

    res = summ = None
    if results is not None:
        res = pd.read_csv(results)
        if not {"metric", "value"} <= set(res.columns):
            raise ReportError(f"{results}: a sweep's results.csv needs columns metric and value")
        res["value"] = pd.to_numeric(res["value"], errors="coerce")
    if summary is not None:
        summ = pd.read_csv(summary)
        if "sd" not in summ.columns and "std" in summ.columns:
            summ = summ.rename(columns={"std": "sd"})
        if not {"metric", "mean"} <= set(summ.columns):
            raise ReportError(f"{summary}: a sweep's summary.csv needs columns metric and mean")
        for c in ("sd", "n"):
            if c not in summ.columns:
                summ[c] = math.nan
    over = _overrides(summ.columns if summ is not None else res.columns if res is not None else [])
    return summ, over, res


def sweep_table(summ: Any, over: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """Overrides x metric table of ``mean ± sd (n)`` strings."""
    metrics = list(dict.fromkeys(summ["metric"].astype(str)))
    rows: dict[tuple[str, ...], dict[str, str]] = {}
    for rec in summ.to_dict("records"):
        key = tuple(_fmt(rec[c]) for c in over)
        rows.setdefault(key, {})[str(rec["metric"])] = format_mean_sd(rec["mean"], rec.get("sd"), rec.get("n"))
    header = [*(list(over) or ["(sweep)"]), *metrics]
    body = [[*(list(k) or ["all"]), *(cells.get(m, "–") for m in metrics)] for k, cells in rows.items()]
    return header, body


def results_table(res: Any) -> tuple[list[str], list[list[str]]]:
    """A sweep's ``results.csv`` as one row per run (run, seed, overrides, one column per metric)."""
    piv = res.drop_duplicates(["run", "metric"] + [c for c in res.columns if c not in NON_OVERRIDE],
                              keep="last") if "run" in res.columns else res
    metrics = list(dict.fromkeys(piv["metric"].astype(str)))
    cols = [c for c in res.columns if c not in ("metric", "value")]
    per_run: dict[tuple[str, ...], dict[str, str]] = {}
    for rec in piv.to_dict("records"):
        per_run.setdefault(tuple(_fmt(rec[c]) for c in cols), {})[str(rec["metric"])] = _fmt(rec["value"])
    return [*cols, *metrics], [[*k, *(v.get(m, "–") for m in metrics)] for k, v in per_run.items()]


def image_kind(p: Path, root: Path) -> str:
    rel = p.relative_to(root) if p.is_relative_to(root) else p
    if "concept_maps" in rel.parts[:-1]:
        return "concepts"
    if "grid" in p.name.lower():
        return "grids"
    return "figures"


def concept_r_table(path: Path) -> tuple[list[str], list[list[str]]]:
    """concept x subject table of r (+ the mean over subjects); the raw rows when the columns differ."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return ["(empty)"], []
    if not {"subject", "concept", "r"} <= set(rows[0]):
        header = list(rows[0])
        return header, [[_fmt(r.get(h)) for h in header] for r in rows]
    subjects = list(dict.fromkeys(r["subject"] for r in rows))
    concepts = list(dict.fromkeys(r["concept"] for r in rows))
    val = {(r["concept"], r["subject"]): r["r"] for r in rows}
    body = []
    for c in concepts:
        vals = [val.get((c, s)) for s in subjects]
        nums = [float(v) for v in vals if v not in (None, "") and not _isnan(v)]
        mean = sum(nums) / len(nums) if nums else math.nan
        body.append([c, *(_fmt(float(v)) if v not in (None, "") else "–" for v in vals), _fmt(mean)])
    return ["concept", *subjects, "mean"], body


def _text_cell(v: Any, limit: int = 600) -> str:
    if isinstance(v, list):
        s = " | ".join(str(x) for x in v)
    elif isinstance(v, dict):
        s = json.dumps(v, ensure_ascii=False)
    else:
        s = str(v)
    return s if len(s) <= limit else s[:limit] + " …"


def encoding_tables(sites: Path) -> tuple[tuple[list[str], list[list[str]]], tuple[list[str], list[list[str]], int]]:
    """(summary table: event set x counts/scores from summary.json; integration sites table, total count)."""
    import pandas as pd

    summ_path = sites.parent / "summary.json"
    header: list[str] = []
    rows: list[list[str]] = []
    if summ_path.is_file():
        summ = json.loads(summ_path.read_text())
        sets = dict(summ.get("event_sets", {}))
        if "all" in summ:
            sets["all"] = summ["all"]
        keys = list(dict.fromkeys(k for v in sets.values() for k in v))
        header = ["event set", *keys]
        rows = [[es, *(_fmt(v.get(k, "–")) for k in keys)] for es, v in sets.items()]
    df = pd.read_csv(sites, keep_default_na=False)  # the phantom's planted kind "null" is a word, not a NaN
    if "integration" not in df.columns:
        return (header, rows), ([], [], 0)
    hit = df[df["integration"].astype(str).str.lower() == "true"]
    cols = [c for c in ("subject", "event_set", "electrode", "x", "y", "z", "region", "planted") if c in df.columns]
    cols += [c for c in df.columns if c.startswith(("dr_", "bins_"))]
    body = [[_fmt(r[c]) for c in cols] for r in hit.head(ENCODING_ROWS).to_dict("records")]
    return (header, rows), (cols, body, len(hit))


def generations_table(path: Path, n: int = GENERATION_ROWS) -> tuple[list[str], list[list[str]], int]:
    """(header, first ``n`` rows, rows in the file) of a ``test_generations_*.jsonl``."""
    rows: list[dict[str, Any]] = []
    total = 0
    with open(path, errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            total += 1
            if len(rows) < n:
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    obj = {"(unparsed line)": line.strip()}
                rows.append(obj if isinstance(obj, dict) else {"value": obj})
    keys = list(dict.fromkeys(k for r in rows for k in r))
    header = [k for k in PREFERRED_TEXT_KEYS if k in keys] + [k for k in keys if k not in PREFERRED_TEXT_KEYS]
    return header, [[_text_cell(r.get(k, "")) for k in header] for r in rows], total


# -------------------------------------------------------------------------------------------- run folders


@dataclass
class RunInfo:
    """One run folder: its metrics tables (newest last), config, stage and the sweep it belongs to."""

    dir: Path
    tables: list[Path] = field(default_factory=list)
    configs: list[Path] = field(default_factory=list)
    generations: list[Path] = field(default_factory=list)
    sweep: Path | None = None
    stage: str = ""

    def config(self) -> Path | None:
        return self.configs[-1] if self.configs else None


def run_dir_of(table: Path, sweeps: Sequence[Path]) -> tuple[Path, Path | None]:
    """(run folder, its sweep folder or None) of a file: the sweep's run folder, else the folder above a
    logger's ``<logger dir>/<version>``, else the file's folder."""
    for s in sweeps:
        if table.is_relative_to(s) and len(table.relative_to(s).parts) > 1:
            return s / table.relative_to(s).parts[0], s
    d = table.parent
    if d.parent.name in LOGGER_DIRS:
        return d.parent.parent, None
    return d, None


def _task_of(config: Path | None) -> str:
    if config is None:
        return ""
    try:
        text = config.read_text(errors="replace")
    except OSError:
        return ""
    m = re.search(r"^model:\s*\n\s+class_path:\s*(\S+)", text, re.M)
    return m.group(1).rpartition(".")[2] if m else ""


def stage_of(task: str, metric_names: Iterable[str]) -> str:
    """``stage1``/``stage2``/``stage3`` from the task class name, else from the metric names; ``""``: other."""
    for key, _, tasks in STAGES:
        if task in tasks:
            return key
    names = list(metric_names)
    if any(n.endswith("/retrieval_fmri2img") for n in names):
        return "stage1"
    if any("/caption/" in n or "/reasoning/" in n for n in names):
        return "stage2"
    if any("/beta=" in n for n in names):
        return "stage3"
    return ""


def _metric_names(tables: Iterable[Path]) -> set[str]:
    names: set[str] = set()
    for t in tables:
        try:
            with open(t, newline="") as f:
                names.update(r.get("metric", "") for r in csv.DictReader(f))
        except (OSError, csv.Error, UnicodeDecodeError):
            continue
    return names


def collect_runs(found: Scan, sweeps: Sequence[Path]) -> list[RunInfo]:
    """The run folders of the scan, in path order, each with its tables, configs and generated texts."""
    runs: dict[Path, RunInfo] = {}
    for t in found.metrics_tables:
        d, s = run_dir_of(t, sweeps)
        runs.setdefault(d, RunInfo(d, sweep=s)).tables.append(t)
    for kind in ("configs", "generations"):
        for p in getattr(found, kind):
            d, _ = run_dir_of(p, sweeps)
            if d in runs:
                getattr(runs[d], kind).append(p)
    for r in runs.values():
        r.tables.sort(key=lambda p: (p.stat().st_mtime_ns, len(p.parts)))
        r.configs.sort(key=lambda p: (len(p.relative_to(r.dir).parts) > 1, p.stat().st_mtime_ns))
        r.stage = stage_of(_task_of(r.config()), _metric_names(r.tables))
    return [runs[d] for d in sorted(runs)]


# ---------------------------------------------------------------------------------------------- page model


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    cls: str = ""
    first_col_header: bool = True


@dataclass
class Figure:
    uri: str
    caption: str
    cls: str = ""
    attrs: dict[str, str] = field(default_factory=dict)


@dataclass
class Block:
    """One item of a section: ``note``, ``error``, ``h4``, ``table``, ``figures``, ``config`` or ``details``
    (a collapsed table)."""

    kind: str
    text: str = ""
    table: Table | None = None
    figures: list[Figure] = field(default_factory=list)
    cls: str = ""
    body: str = ""  # a config's text


@dataclass
class Section:
    title: str
    id: str = ""
    level: int = 2
    blocks: list[Block] = field(default_factory=list)
    children: list[Section] = field(default_factory=list)

    def note(self, text: str) -> None:
        self.blocks.append(Block("note", text))

    def error(self, p: Path, root: Path, e: Exception) -> None:
        log.warning("report: skipping %s: %s", p, e)
        self.blocks.append(Block("error", f"could not read {_rel(p, root)}: {type(e).__name__}: {e}"))

    def table(self, t: Table, caption: str = "") -> None:
        if caption:
            self.blocks.append(Block("h4", caption))
        self.blocks.append(Block("table", table=t))

    def figs(self, figures: list[Figure], cls: str = "") -> None:
        if figures:
            self.blocks.append(Block("figures", figures=figures, cls=cls))


@dataclass
class HeadlineRow:
    stage: str
    run: str
    measure: str
    value: str
    source: str


class _Ids:
    def __init__(self) -> None:
        self.seen: dict[str, int] = {}

    def __call__(self, title: str) -> str:
        base = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") or "s"
        n = self.seen.get(base, 0)
        self.seen[base] = n + 1
        return base if n == 0 else f"{base}-{n}"


def _image(p: Path, root: Path, cls: str) -> Figure:
    return Figure(data_uri(p.read_bytes(), IMAGE_SUFFIXES[p.suffix.lower()]), _rel(p, root), cls,
                  {"data-file": _rel(p, root)})


# ------------------------------------------------------------------------------------------------ headline


def headline_rows(root: Path, runs: Sequence[RunInfo], sweeps: Sequence[Path], found: Scan) -> list[HeadlineRow]:
    """The headline table's rows (see the module docstring), in chain order."""
    out: list[HeadlineRow] = []
    for run in runs:
        if run.sweep is not None:
            continue
        name = _name(run.dir, root)
        control = "shuffled" in run.dir.name.lower()
        try:
            if run.stage == "stage1":
                out += _stage1_rows(run.dir, name, root)
            elif run.stage == "stage2":
                out += _stage2_rows(run.dir, name, root, control)
        except Unreadable as e:
            out.append(HeadlineRow(run.stage, name, "unreadable", str(e), ""))
    for s in sweeps:
        try:
            out += _sweep_rows(s, root)
        except READ_ERRORS as e:
            out.append(HeadlineRow("sweep", _name(s, root), "unreadable", str(e), ""))
    for p in sorted(found.concept_r):
        try:
            r, n = concept_r_mean(p)
        except READ_ERRORS as e:
            out.append(HeadlineRow("localisation", _name(p.parent, root), "unreadable", str(e), ""))
            continue
        if r is not None:
            out.append(HeadlineRow("localisation", _name(p.parent, root), f"concept-map r (mean of {n} maps)",
                                   f"{r:.3f}", _rel(p, root)))
    for sites in sorted(found.encodings):
        path = sites.parent / "summary.json"
        try:
            f1 = encoding_scores(path)
        except Unreadable as e:
            out.append(HeadlineRow("encoding", _name(sites.parent, root), "unreadable", str(e), ""))
            continue
        if f1:
            out.append(HeadlineRow("encoding", _name(sites.parent, root), "integration-site F1",
                                   ", ".join(f"{k} {'–' if v is None else f'{v:.2f}'}" for k, v in f1.items()),
                                   _rel(path, root)))
    order = {"stage1": 0, "localisation": 1, "stage2": 2, "stage2 control": 3, "stage3": 4, "sweep": 5,
             "encoding": 6}
    out.sort(key=lambda r: order.get(r.stage, 9))  # stable: runs keep their path order within a stage
    for row in out:
        row.stage = STAGE_LABELS.get(row.stage, row.stage)
    return out


def _stage1_rows(run: Path, name: str, root: Path) -> list[HeadlineRow]:
    names = [f"test/{c}/{k}" for c in CONDITIONS for k in RETRIEVAL]
    m, table = last_test_metrics(run, names)
    if not m or table is None:
        return []
    chance = m.get("test/average/retrieval_chance") or m.get("test/single/retrieval_chance")
    among = f" among {round(1 / chance)}" if chance else ""
    return [HeadlineRow("stage1", name, f"test retrieval fMRI → image{among} ({c} trials)",
                        _pct(m.get(f"test/{c}/retrieval_fmri2img")), _rel(table, root))
            for c in CONDITIONS if f"test/{c}/retrieval_fmri2img" in m]


def _stage2_rows(run: Path, name: str, root: Path, control: bool) -> list[HeadlineRow]:
    names = [f"test/{c}/caption/{k}" for c in CONDITIONS for k in CAPTION_SCORES]
    names += [f"test/{c}/{QA_SCORE}" for c in CONDITIONS]
    m, table = last_test_metrics(run, names)
    if not m or table is None:
        return []
    stage = "stage2 control" if control else "stage2"
    what = ", shuffled fMRI" if control else ""
    out = []
    for k in CAPTION_SCORES:
        vals = [m.get(f"test/{c}/caption/{k}") for c in CONDITIONS]
        if any(v is not None for v in vals):
            out.append(HeadlineRow(stage, name, f"caption {k}{what} (averaged / single)",
                                   " / ".join("–" if v is None else f"{v:.3f}" for v in vals), _rel(table, root)))
    qa = [m.get(f"test/{c}/{QA_SCORE}") for c in CONDITIONS]
    if any(v is not None for v in qa):
        out.append(HeadlineRow(stage, name, f"QA exact match{what} (averaged / single)",
                               " / ".join(_pct(v) for v in qa), _rel(table, root)))
    return out


def _sweep_rows(sweep: Path, root: Path) -> list[HeadlineRow]:
    name = _name(sweep, root)
    bt = sweep / BETA_TABLE
    if bt.is_file():
        best, rows = best_beta(bt)
        if best is None:
            return [HeadlineRow("stage3", name, f"best β ({BETA_SCORE})", "–", _rel(bt, root))]
        at = [r for r in rows if r.get("beta") == best.get("beta") and r.get("prompt") == best.get("prompt")
              and r.get("condition") == best.get("condition")]
        scores = ", ".join(f"{r['metric']} {float(r['mean']):.3f}" for r in at if finite_float(r.get("mean")) is not None)
        return [HeadlineRow("stage3", name, f"best β by mean CLIP two-way identification ({best.get('condition')}, "
                            f"{best.get('prompt')}; n = {best.get('n')})", f"β = {best.get('beta')}", _rel(bt, root)),
                HeadlineRow("stage3", name, f"scores at β = {best.get('beta')}", scores, _rel(bt, root))]
    summary = sweep / "summary.csv"
    if not summary.is_file():
        return []
    summ, over, _ = read_sweep(summary, None)
    out = []
    wanted = [f"test/{c}/retrieval_fmri2img" for c in CONDITIONS] + [f"test/{c}/caption/CIDEr" for c in CONDITIONS]
    for metric in wanted:
        sub = summ[summ["metric"] == metric]
        if sub.empty:
            continue
        best = sub.loc[sub["mean"].astype(float).idxmax()]
        combo = ", ".join(f"{c}={_fmt(best[c])}" for c in over) or "all runs"
        value = format_mean_sd(best["mean"], best["sd"], best["n"])
        out.append(HeadlineRow("stage1" if "retrieval" in metric else "stage2", name,
                               f"{metric}, best of {len(sub)} settings ({combo})", value, _rel(summary, root)))
    return out


# ------------------------------------------------------------------------------------------------- figures


def _integer_epochs(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _line_style(group: str) -> dict[str, Any]:
    if "sub-" in group:  # per-subject lines: thin, behind the aggregate ones
        return {"lw": 0.9, "alpha": 0.6, "marker": None}
    return {"lw": 2.0, "alpha": 1.0, "marker": "o", "ms": 3}


def val_figures(df: Any, title: str) -> list[tuple[str, bytes]]:
    """One PNG per validation metric family (the last name component) over epochs, plus one of train/* (the
    one figure the report draws: nothing else writes a run's validation curves as a picture)."""
    val = df[df["metric"].astype(str).str.startswith("val/")]
    per_epoch = val.groupby(["metric", "epoch"], sort=False)["value"].last().reset_index()
    families: dict[str, dict[str, Any]] = {}
    for name, sub in per_epoch.groupby("metric", sort=False):
        _, g, m = _split_metric(str(name))
        families.setdefault(m, {})[g or "(all)"] = sub.sort_values("epoch")
    chance = families.pop("retrieval_chance", None)
    out = []
    for fam, lines in families.items():
        fig, ax = _new_figure()
        for g, sub in lines.items():
            ax.plot(sub["epoch"], sub["value"], label=g, **_line_style(g))
        if chance and fam.startswith("retrieval"):
            first = next(iter(chance.values()))
            ax.plot(first["epoch"], first["value"], ls="--", color="grey", lw=1, label="chance")
        _integer_epochs(ax)
        ax.set_ylabel(fam)
        ax.set_title(f"{title}: val {fam}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
        out.append((f"val/{fam}", _fig_png(fig)))
    train = df[df["metric"].astype(str).str.startswith("train/")]
    if len(train):
        fig, ax = _new_figure()
        for name, sub in train.groupby("metric", sort=False):
            sub = sub.groupby("epoch")["value"].last()
            ax.plot(sub.index, sub.values, label=str(name).split("/", 1)[1], marker="o", ms=3)
        _integer_epochs(ax)
        ax.set_title(f"{title}: training losses", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
        out.append(("train", _fig_png(fig)))
    return out


# ----------------------------------------------------------------------------------------------- sections


def _config_block(path: Path, root: Path) -> Block:
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        text = f"(unreadable: {e})"
    return Block("config", _rel(path, root), body=text)


def _run_section(run: RunInfo, root: Path, ids: _Ids, shown: set[Path]) -> Section:
    name = _name(run.dir, root)
    sec = Section(f"run: {name}", ids(f"run: {name}"), 3)
    frames = []
    for t in run.tables:
        try:
            frames.append((t, read_metrics_table(t)))
        except READ_ERRORS as e:
            sec.error(t, root, e)
    tested = [(t, df) for t, df in frames if df["metric"].astype(str).str.startswith("test/").any()]
    final = tested[-1] if tested else (frames[-1] if frames else None)
    if final is not None:
        t, df = final
        stage = "test" if tested else "val"
        groups, metrics, cells = final_metrics(df, stage)
        if metrics:
            what = ("final test metrics" if stage == "test" else "no test metrics: validation metrics of the last "
                    f"epoch ({_fmt(df[df['stage'] == 'val']['epoch'].max())})")
            sec.note(f"{what} (group × metric, from {_rel(t, root)})")
            sec.table(Table(["group", *metrics], [[g, *(_fmt(cells[(g, m)]) if (g, m) in cells else "–"
                                                        for m in metrics)] for g in groups], f"final-{stage}"))
        else:
            sec.note(f"{_rel(t, root)} holds no val/ or test/ metrics")
    curves = max(frames, key=lambda f: int(f[1]["metric"].astype(str).str.startswith("val/").sum()), default=None)
    if curves is not None:
        figs = val_figures(curves[1], name)
        sec.figs([Figure(data_uri(png), f"{name}: {fam}", "val-curve", {"data-metric": fam}) for fam, png in figs],
                 "plots")
    for g in run.generations:
        shown.add(g)
        try:
            header, body, total = generations_table(g)
        except READ_ERRORS as e:
            sec.error(g, root, e)
            continue
        sec.table(Table(header, body, "text", False), f"{_rel(g, root)} (first {len(body)} of {total} rows)")
    for c in run.configs:
        shown.add(c)
    cfg = run.config()
    if cfg is not None:
        sec.blocks.append(_config_block(cfg, root))
    return sec


def _sweep_section(sweep: Path, root: Path, ids: _Ids, found: Scan, key_figs: set[Path]) -> Section:
    name = _name(sweep, root)
    sec = Section(f"sweep: {name}", ids(f"sweep: {name}"), 3)
    summary = sweep / "summary.csv" if (sweep / "summary.csv") in found.summaries else None
    results = sweep / "results.csv" if (sweep / "results.csv") in found.results else None
    try:
        summ, over, res = read_sweep(summary, results)
    except READ_ERRORS as e:
        sec.error(summary or results or sweep, root, e)
        return sec
    n_runs = int(res["run"].nunique()) if res is not None and "run" in res.columns else None
    if summ is None and res is None:
        sec.note(f"no results.csv or summary.csv: the {BETA_TABLE} only")
    else:
        sec.note(f"{'summary.csv' if summ is not None else 'no summary.csv: the per-run results.csv only'}; "
                 f"overrides: {', '.join(over) or 'none'}" + (f"; {n_runs} runs" if n_runs is not None else ""))
    if summ is not None:
        header, body = sweep_table(summ, over)
        sec.table(Table(header, body, "sweep-summary", False))
    elif res is not None:
        header, body = results_table(res)
        sec.table(Table(header, body, "sweep-runs", False))
    if (sweep / BETA_TABLE).is_file():
        try:
            _, rows = best_beta(sweep / BETA_TABLE)
        except Unreadable as e:
            sec.error(sweep / BETA_TABLE, root, e)
            rows = []
        if rows and summ is None and res is None:
            header = list(rows[0])
            sec.table(Table(header, [[_fmt(r.get(h)) for h in header] for r in rows], "beta-table", False))
        sec.note(f"β curves and grids: {BETA_CURVES}, beta_grid_*.png (neurovision.runs.beta_figures)"
                 + ("; shown under Key figures" if key_figs & set(sweep.glob("beta_*.png")) else ""))
    figs = [p for p in found.images if p.parent == sweep and p not in key_figs]
    sec.figs([_image(p, root, "beta-figure" if p.name.startswith("beta_") else "file-figures") for p in figs])
    return sec


def _encoding_section(sites: Path, root: Path, ids: _Ids, found: Scan, key_figs: set[Path]) -> Section:
    name = _name(sites.parent, root)
    sec = Section(f"encoding: {name}", ids(f"encoding: {name}"), 3)
    try:
        (sh, srows), (ih, irows, n_int) = encoding_tables(sites)
    except READ_ERRORS as e:
        sec.error(sites, root, e)
        return sec
    if srows:
        sec.note("summary.json (per event set; precision/recall/F1 against the planted multimodal sites when the "
                 "store is a phantom)")
        sec.table(Table(sh, srows, "encoding-summary"))
    if ih:
        sec.table(Table(ih, irows, "integration-sites", False), f"integration sites ({n_int}; first {len(irows)} shown)")
    figs = [sites.parent / f for f in ENCODING_FIGURES if (sites.parent / f) in found.images]
    sec.figs([_image(p, root, "file-encoding") for p in figs if p not in key_figs])
    return sec


def _concept_section(found: Scan, root: Path, ids: _Ids, paths: list[Path]) -> Section:
    sec = Section("Concept maps (localisation of stage 1)", ids("Concept maps"), 3)
    for rt in sorted(found.concept_r):
        try:
            header, body = concept_r_table(rt)
        except READ_ERRORS as e:
            sec.error(rt, root, e)
            continue
        sec.table(Table(header, body, "concept-r"), f"{_rel(rt, root)} (Pearson r with the planted map)")
    by_dir: dict[Path, list[Path]] = {}
    for p in paths:
        by_dir.setdefault(p.parent, []).append(p)
    for d, ps in by_dir.items():
        if len(by_dir) > 1:
            sec.blocks.append(Block("h4", _rel(d, root)))
        sec.figs([_image(p, root, "file-concepts") for p in ps], "small")
    return sec


def build_sections(found: Scan, root: Path) -> tuple[list[HeadlineRow], list[Figure], list[Section], int]:
    """(headline rows, key figures, sections in page order, number of run folders)."""
    ids = _Ids()
    ids.seen.update({"summary": 1, "headline": 1, "key-figures": 1})  # the template's own ids
    sweeps = found.sweeps()
    runs = collect_runs(found, sweeps)
    head = headline_rows(root, runs, sweeps, found)

    # key figures: each β sweep's curves and its first grid, the encoding's glass brain
    key: list[Path] = []
    for s in sweeps:
        key += [p for p in (s / BETA_CURVES,) if p in found.images]
        key += sorted(p for p in found.images if p.parent == s and p.name.startswith("beta_grid_"))[:1]
    key += [s.parent / ENCODING_KEY_FIGURE for s in sorted(found.encodings)
            if (s.parent / ENCODING_KEY_FIGURE) in found.images]
    key_set = set(key)
    key_figs = [_image(p, root, "file-encoding" if p.name == ENCODING_KEY_FIGURE else "key-figure") for p in key]

    shown: set[Path] = set(key_set)
    sections: list[Section] = []
    concept_imgs = [p for p in found.images if image_kind(p, root) == "concepts"]
    shown.update(concept_imgs)
    stage3_sweeps = [s for s in sweeps if (s / BETA_TABLE).is_file() or any(
        r.stage == "stage3" for r in runs if r.sweep == s)]
    for key_, title, _ in STAGES:
        sec = Section(title, ids(title))
        for run in runs:
            if run.sweep is None and run.stage == key_:
                sec.children.append(_run_section(run, root, ids, shown))
        if key_ == "stage1" and (found.concept_r or concept_imgs):
            sec.children.append(_concept_section(found, root, ids, concept_imgs))
        if key_ == "stage3":
            for s in stage3_sweeps:
                sec.children.append(_sweep_section(s, root, ids, found, key_set))
                shown.update(p for p in found.images if p.parent == s)
        if sec.children:
            sections.append(sec)
    if found.encodings:
        sec = Section("Encoding", ids("Encoding"))
        for sites in sorted(found.encodings):
            sec.children.append(_encoding_section(sites, root, ids, found, key_set))
            shown.update(sites.parent / f for f in ENCODING_FIGURES)
            shown.update(c for c in found.configs if c.parent == sites.parent)
            sec.blocks += [_config_block(c, root) for c in found.configs if c.parent == sites.parent]
        sections.append(sec)
    other_runs = [r for r in runs if r.sweep is None and not r.stage]
    other_sweeps = [s for s in sweeps if s not in stage3_sweeps]
    if other_runs or other_sweeps:
        sec = Section("Other runs and sweeps", ids("Other runs and sweeps"))
        sec.children += [_run_section(r, root, ids, shown) for r in other_runs]
        for s in other_sweeps:
            sec.children.append(_sweep_section(s, root, ids, found, key_set))
            shown.update(p for p in found.images if p.parent == s)
        sections.append(sec)
    in_sweeps = {p for p in found.images + found.configs + found.generations for s in sweeps if p.is_relative_to(s)}
    rest = [p for p in found.images if p not in shown and p not in in_sweeps]
    grids = [p for p in rest if image_kind(p, root) == "grids"]
    if grids:
        sec = Section("Reconstructions", ids("Reconstructions"))
        sec.figs([_image(p, root, "file-grids") for p in grids])
        sections.append(sec)
    others = [p for p in rest if p not in grids]
    if others:
        sec = Section("Other figures", ids("Other figures"))
        sec.figs([_image(p, root, "file-figures") for p in others])
        sections.append(sec)
    gens = [g for g in found.generations if g not in shown and g not in in_sweeps]
    cfgs = [c for c in found.configs if c not in shown and c not in in_sweeps]
    if gens or cfgs:
        sec = Section("Generated text and configurations", ids("Generated text and configurations"))
        for g in gens:
            try:
                header, body, total = generations_table(g)
            except READ_ERRORS as e:
                sec.error(g, root, e)
                continue
            sec.table(Table(header, body, "text", False), f"{_rel(g, root)} (first {len(body)} of {total} rows)")
        sec.blocks += [_config_block(c, root) for c in cfgs]
        sections.append(sec)
    if runs or sweeps:
        sections.append(_run_index(runs, sweeps, root, ids, found))
    return head, key_figs, sections, len(runs)


def _run_index(runs: Sequence[RunInfo], sweeps: Sequence[Path], root: Path, ids: _Ids, found: Scan) -> Section:
    sec = Section("Run index", ids("Run index"))
    titles = {k: t.split(":")[0] for k, t, _ in STAGES}
    rows = []
    for r in runs:
        state = ""
        if r.sweep is not None:
            try:
                state = str((read_json_object(r.dir / "status.json") or {}).get("state", ""))
            except Unreadable:
                state = "unreadable status.json"
        rows.append([_rel(r.dir, root), titles.get(r.stage, "other"), _name(r.sweep, root) if r.sweep else "",
                     state, "; ".join(_rel(t, root) for t in r.tables)])
    if rows:
        sec.table(Table(["run folder", "stage", "sweep", "state", "metrics tables"], rows, "run-index"))
    for s in sweeps:
        results = s / "results.csv"
        if results not in found.results:
            continue
        try:
            _, _, res = read_sweep(None, results)
        except READ_ERRORS as e:
            sec.error(results, root, e)
            continue
        if res is not None and len(res):
            header, body = results_table(res)
            n = int(res["run"].nunique()) if "run" in res.columns else len(body)
            sec.blocks.append(Block("details", f"{_rel(results, root)}: per-run results ({n} runs, {len(body)} rows)",
                                    table=Table(header, body, "sweep-runs", False)))
    return sec


# ------------------------------------------------------------------------------------------------- render


def _template() -> Any:
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("neurovision.runs", "templates"),
                             autoescape=jinja2.select_autoescape(["html", "j2"], default=True),
                             trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    return env.get_template(TEMPLATE)


def build_report(path: str | os.PathLike[str], *, exclude: Iterable[Path] = (), progress: bool | None = None,
                 now: _dt.datetime | None = None) -> str:
    """The report's HTML for the run or sweep directory ``path``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ReportError: ``path`` is not a directory, or holds nothing this report understands.
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such directory")
    if not root.is_dir():
        raise ReportError(f"{root}: not a directory (give a run or sweep directory)")
    root = root.resolve()
    found = scan(root, exclude=exclude, progress=progress)
    if found.empty():
        raise ReportError(
            f"{root}: nothing to report: found no {METRICS_TABLE}, results.csv/summary.csv/{BETA_TABLE}, config.yaml, "
            f"concept_r.csv, test_generations_*.jsonl or images in its {found.n_files} files")
    head, key_figs, sections, n_runs = build_sections(found, root)
    n_sweeps = len(found.sweeps())
    log.info("report %s: %d files scanned: %d run folders, %d sweeps, %d images, %d headline rows", root,
             found.n_files, n_runs, n_sweeps, len(found.images), len(head))
    now = now or _dt.datetime.now().astimezone()
    n_imgs = len(key_figs) + sum(len(b.figures) for s in _walk(sections) for b in s.blocks)
    return str(_template().render(
        title=f"neurovision report: {root.name}", root=str(root), headline=head, key_figures=key_figs,
        sections=sections, created=now.strftime("%Y-%m-%d %H:%M:%S %Z").strip(),
        counts=f"{n_runs} runs, {n_sweeps} sweeps, {n_imgs} figures"))


def _walk(sections: Sequence[Section]) -> Iterable[Section]:
    for s in sections:
        yield s
        yield from _walk(s.children)


def write_report(path: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, *,
                 progress: bool | None = None) -> Path:
    """Write the HTML report of the run or sweep directory ``path`` to ``out`` (default ``<path>/report.html``),
    atomically; returns the output path. Raises FileNotFoundError / :class:`ReportError` (see
    :func:`build_report`)."""
    target = Path(out) if out is not None else Path(path) / "report.html"
    text = build_report(path, exclude=[target], progress=progress)
    with atomic_path(target, suffix=".html") as tmp:
        tmp.write_text(text, encoding="utf-8")
    return target
