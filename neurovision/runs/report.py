"""``neurovision report <run-or-sweep-dir> [--out report.html]``: one self-contained static HTML dashboard.

The directory is scanned recursively for what the other stages leave behind (each part is optional):

- runs: ``metrics_table.csv`` (:class:`callbacks.MetricsTable`): the final test metrics as a group x metric
  table (``test/<group>/<metric>``, e.g. ``test/average/sub-01/retrieval_fmri2img``; the last value of each
  metric; the last validation epoch when the run has no test rows) and one line plot per validation metric
  family over epochs (one line per group, the retrieval chance level dashed); the run's ``config.yaml``
  (saved by the LightningCLI beside it, or the nearest one above it) as a collapsible block;
- sweeps: ``summary.csv`` (``<overrides...>, metric, mean, sd, n``) as an overrides x metric table of
  ``mean ± sd (n)`` (computed from ``results.csv`` -- ``run, seed, <overrides...>, metric, value`` -- when
  there is no summary); with an override named ``beta`` (or ending in ``beta``), β curves: one figure per
  metric, mean ± sd against β, one line per combination of the other overrides;
- images (``*.png``, ``*.jpg``): reconstruction grids (``*grid*``), concept maps (under ``concept_maps/``,
  with their ``concept_r.csv`` as a concept x subject table of r) and other figures;
- generated text: the first rows of each ``test_generations_*.jsonl``;
- encoding analyses (``neurovision encode``): ``sites.csv`` with ``summary.json`` beside it: the summary per
  event set (with precision/recall/F1 on a phantom), the integration-site table and the two figures
  (``sites_brain.png``, ``r_by_model.png``).

Figures are drawn with matplotlib's Agg canvas (no pyplot state) and every image is embedded as a base64
data URI, so the single HTML file can be mailed or opened anywhere; all text is HTML-escaped; the file is
written atomically (default ``<dir>/report.html``).
"""

from __future__ import annotations

import argparse
import base64
import csv
import datetime as _dt
import html
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
IMAGE_SUFFIXES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}
GENERATIONS_RE = re.compile(r"^test_generations_.*\.jsonl$")
GENERATION_ROWS = 10
PREFERRED_TEXT_KEYS = ("subject_name", "subject", "stimulus", "trial", "condition", "type", "prompt", "question",
                       "generated", "answer", "prediction", "reference", "references")
ENCODING_SITES = "sites.csv"  # written by `neurovision encode` (with summary.json and the two figures below)
ENCODING_FIGURES = ("sites_brain.png", "r_by_model.png", "r_by_layer.png")
ENCODING_ROWS = 40
NON_OVERRIDE = {"run", "seed", "metric", "value", "mean", "sd", "std", "n"}
PROGRESS_MIN_FILES = 200  # show a progress bar from this many scanned files on


class ReportError(ValueError):
    """Nothing recognisable to report (or a malformed input); the message names the directory."""


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
    n_files: int = 0

    def empty(self) -> bool:
        return not (self.metrics_tables or self.configs or self.results or self.summaries or self.images
                    or self.concept_r or self.generations or self.encodings)


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


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


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


def _rel(p: Path, root: Path) -> str:
    try:
        return p.relative_to(root).as_posix() or "."
    except ValueError:
        return str(p)


def _name(d: Path, root: Path) -> str:
    """A directory's name in headings: its path below ``root`` (``root``'s own name for ``root``)."""
    return root.name if d == root else _rel(d, root)


def _unreadable(doc: _Doc, p: Path, root: Path, e: Exception) -> None:
    log.warning("report: skipping %s: %s", p, e)
    doc.add(f'<p class="note error">could not read {_e(_rel(p, root))}: {_e(type(e).__name__)}: {_e(e)}</p>')


READ_ERRORS = (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError)  # pandas' parser errors are ValueErrors


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


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]], cls: str = "", first_col_header: bool = True) -> str:
    out = [f'<table class="{_e(cls)}">' if cls else "<table>", "<thead><tr>"]
    out += [f"<th>{_e(h)}</th>" for h in header]
    out.append("</tr></thead><tbody>")
    for r in rows:
        cells = []
        for i, c in enumerate(r):
            tag = "th" if i == 0 and first_col_header else "td"
            cells.append(f"<{tag}>{_e(c)}</{tag}>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _figure(uri: str, caption: str, cls: str = "", attrs: dict[str, str] | None = None) -> str:
    extra = "".join(f' {k}="{_e(v)}"' for k, v in (attrs or {}).items())
    return (f'<figure class="fig {_e(cls)}"{extra}><img src="{uri}" alt="{_e(caption)}" loading="eager">'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


# ------------------------------------------------------------------------------------------------- runs


def _split_metric(name: str) -> tuple[str, str, str]:
    """``test/average/sub-01/retrieval_fmri2img`` -> (``test``, ``average/sub-01``, ``retrieval_fmri2img``)."""
    parts = name.split("/")
    if len(parts) == 1:
        return "", "", parts[0]
    if len(parts) == 2:
        return parts[0], "", parts[1]
    return parts[0], "/".join(parts[1:-1]), parts[-1]


def read_metrics_table(path: Path) -> Any:
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


def _integer_epochs(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _line_style(group: str) -> dict[str, Any]:
    if "sub-" in group:  # per-subject lines: thin, behind the aggregate ones
        return {"lw": 0.9, "alpha": 0.6, "marker": None}
    return {"lw": 2.0, "alpha": 1.0, "marker": "o", "ms": 3}


def val_figures(df: Any, title: str) -> list[tuple[str, bytes]]:
    """One PNG per validation metric family (the last name component) over epochs, plus one of train/*."""
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


def _config_for(table: Path, configs: Sequence[Path], root: Path) -> Path | None:
    """The run's ``config.yaml``: beside the table, else the nearest one above it (within ``root``)."""
    by_dir = {c.parent: c for c in configs}
    d = table.parent
    while True:
        if d in by_dir:
            return by_dir[d]
        if d == root or d.parent == d:
            return None
        d = d.parent


def _config_block(path: Path, root: Path) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        text = f"(unreadable: {e})"
    return (f'<details class="config"><summary>{_e(_rel(path, root))}</summary>'
            f"<pre>{_e(text)}</pre></details>")


# ------------------------------------------------------------------------------------------------ sweeps


def _overrides(columns: Iterable[str]) -> list[str]:
    return [c for c in columns if c not in NON_OVERRIDE]


def read_sweep(summary: Path | None, results: Path | None) -> tuple[Any, list[str], Any]:
    """(summary frame with ``<overrides...>, metric, mean, sd, n``, override columns, results frame or None).
    The summary is computed from the results (mean, sample sd, n over runs) when ``summary.csv`` is absent."""
    import pandas as pd

    res = None
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
        return summ, _overrides(summ.columns), res
    assert res is not None
    over = _overrides(res.columns)
    keys = [*over, "metric"]
    summ = (res.groupby(keys, sort=False, dropna=False)["value"]
            .agg(mean="mean", sd="std", n="count").reset_index())
    return summ, over, res


def _combo_label(cols: Sequence[str], values: Sequence[Any]) -> str:
    return ", ".join(f"{_short(c)}={_fmt(v)}" for c, v in zip(cols, values, strict=True)) or "all"


def _short(col: str) -> str:
    return col.rsplit(".", 1)[-1] if "." in col else col


def beta_column(columns: Sequence[str]) -> str | None:
    for c in columns:
        if c.lower() == "beta":
            return c
    for c in columns:
        if c.lower().endswith("beta"):
            return c
    return None


def beta_figures(summ: Any, over: Sequence[str], beta: str, title: str) -> list[tuple[str, bytes]]:
    """One PNG per metric: mean vs β with sd error bars, one line per combination of the other overrides
    (like Fig. 5 of Shen et al. 2024: metric vs noise strength β)."""
    import pandas as pd

    others = [c for c in over if c != beta]
    out = []
    for metric, sub in summ.groupby("metric", sort=False):
        sub = sub.copy()
        x_num = pd.to_numeric(sub[beta], errors="coerce")
        numeric = bool(x_num.notna().all())
        if numeric:
            sub["_x"] = x_num
        else:  # categorical β: positions in order of appearance
            cats = list(dict.fromkeys(sub[beta].astype(str)))
            sub["_x"] = sub[beta].astype(str).map({c: i for i, c in enumerate(cats)})
        fig, ax = _new_figure(5.6, 3.8)
        groups = sub.groupby(others, sort=True, dropna=False) if others else [((), sub)]
        for key, g in groups:
            key = key if isinstance(key, tuple) else (key,)
            g = g.sort_values("_x")
            sd = pd.to_numeric(g["sd"], errors="coerce")
            ax.errorbar(g["_x"], g["mean"], yerr=None if sd.isna().all() else sd.fillna(0), marker="o", ms=4,
                        capsize=3, lw=1.5, label=_combo_label(others, key))
        if not numeric:
            ax.set_xticks(range(len(cats)), cats)
        ax.set_xlabel(f"β ({beta})" if beta.lower() != "beta" else "β")
        ax.set_ylabel(str(metric))
        ax.set_title(f"{title}: {metric} vs β (mean ± sd over seeds)", fontsize=9)
        ax.grid(alpha=0.3)
        if others:
            ax.legend(fontsize=7, frameon=False)
        out.append((str(metric), _fig_png(fig)))
    return out


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


# ------------------------------------------------------------------------------------------ other inputs


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


# ------------------------------------------------------------------------------------------------- HTML

CSS = """
:root { --fg:#1d2330; --muted:#5b6577; --line:#dde2ea; --accent:#2f5fb3; --bg:#ffffff; --head:#f3f5f9; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; color: var(--fg);
       background: var(--bg); margin: 0 auto; max-width: 1180px; padding: 24px 28px 60px; }
h1 { font-size: 24px; margin: 0 0 4px; } h2 { font-size: 19px; margin: 36px 0 8px; border-bottom: 2px solid var(--line);
padding-bottom: 4px; } h3 { font-size: 15px; margin: 22px 0 6px; } h4 { font-size: 13px; margin: 14px 0 4px; color: var(--muted); }
.meta { color: var(--muted); margin: 0 0 18px; }
a { color: var(--accent); text-decoration: none; } a:hover { text-decoration: underline; }
nav.toc { background: var(--head); border: 1px solid var(--line); border-radius: 6px; padding: 10px 18px; }
nav.toc ul { margin: 4px 0; padding-left: 18px; } nav.toc > ul { padding-left: 4px; list-style: none; }
.scroll { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; margin: 6px 0 14px; font-size: 12.5px; }
th, td { border: 1px solid var(--line); padding: 3px 8px; text-align: right; vertical-align: top; }
thead th { background: var(--head); text-align: center; position: sticky; top: 0; }
tbody th { text-align: left; font-weight: 600; background: #fafbfd; }
table.text td { text-align: left; max-width: 420px; white-space: pre-wrap; word-break: break-word; }
.figs { display: flex; flex-wrap: wrap; gap: 14px; align-items: flex-start; }
figure.fig { margin: 0; border: 1px solid var(--line); border-radius: 6px; padding: 6px; background: #fff; max-width: 100%; }
figure.fig img { display: block; max-width: 100%; height: auto; }
.figs.plots figure.fig { flex: 0 1 calc(50% - 7px); } .figs.plots figure.fig img { width: 100%; }
.figs.small figure.fig { flex: 0 1 calc(33.3% - 10px); } .figs.small figure.fig img { width: 100%; }
figcaption { font-size: 11.5px; color: var(--muted); margin-top: 4px; word-break: break-all; }
details.config { margin: 8px 0; } details.config summary { cursor: pointer; color: var(--accent); }
details.config pre { background: #f7f8fa; border: 1px solid var(--line); padding: 8px; font-size: 11.5px; overflow: auto; max-height: 520px; }
.note { color: var(--muted); font-size: 12.5px; } .note.error { color: #b3261e; }
"""


class _Doc:
    """Sections (h2/h3 with ids) and a table of contents built from them."""

    def __init__(self) -> None:
        self.body: list[str] = []
        self.toc: list[tuple[int, str, str]] = []
        self._ids: dict[str, int] = {}

    def _id(self, title: str) -> str:
        base = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") or "s"
        n = self._ids.get(base, 0)
        self._ids[base] = n + 1
        return base if n == 0 else f"{base}-{n}"

    def heading(self, level: int, title: str) -> None:
        i = self._id(title)
        self.toc.append((level, i, title))
        self.body.append(f'<h{level} id="{i}">{_e(title)}</h{level}>')

    def add(self, s: str) -> None:
        self.body.append(s)

    def toc_html(self) -> str:
        out = ['<nav class="toc"><strong>Contents</strong><ul>']
        open_sub = False
        for level, i, title in self.toc:
            if level == 2:
                if open_sub:
                    out.append("</ul></li>")
                    open_sub = False
                out.append(f'<li><a href="#{i}">{_e(title)}</a>')
                out.append("<ul>")
                open_sub = True
            else:
                out.append(f'<li><a href="#{i}">{_e(title)}</a></li>')
        if open_sub:
            out.append("</ul></li>")
        out.append("</ul></nav>")
        return "".join(out).replace("<ul></ul>", "")


def _figs(items: Sequence[str], cls: str = "") -> str:
    return f'<div class="figs {cls}">' + "".join(items) + "</div>"


def build_report(path: str | os.PathLike[str], *, exclude: Iterable[Path] = (), progress: bool | None = None,
                 now: _dt.datetime | None = None) -> str:
    """The report's HTML for the run or sweep directory ``path``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ReportError: ``path`` is not a directory, or holds nothing this report understands.
    """
    from tqdm.auto import tqdm

    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such directory")
    if not root.is_dir():
        raise ReportError(f"{root}: not a directory (give a run or sweep directory)")
    root = root.resolve()
    found = scan(root, exclude=exclude, progress=progress)
    if found.empty():
        raise ReportError(
            f"{root}: nothing to report: found no {METRICS_TABLE}, results.csv/summary.csv, config.yaml, "
            f"concept_r.csv, test_generations_*.jsonl or images in its {found.n_files} files")
    log.info("report %s: %d files scanned: %d metrics tables, %d sweeps, %d configs, %d images, %d generation files",
             root, found.n_files, len(found.metrics_tables), len({p.parent for p in found.results + found.summaries}),
             len(found.configs), len(found.images), len(found.generations))
    doc = _Doc()
    n_figs = 0
    bar_total = len(found.metrics_tables) + len({p.parent for p in found.results + found.summaries}) + len(found.images)
    bar = tqdm(total=bar_total, desc="report", unit="item", file=sys.stderr, leave=False,
               disable=True if progress is False else (None if bar_total >= 20 else True))
    try:
        # -- sweeps
        sweep_dirs = sorted({p.parent for p in found.results + found.summaries})
        if sweep_dirs:
            doc.heading(2, "Sweeps" if len(sweep_dirs) > 1 else "Sweep")
        for d in sweep_dirs:
            name = _name(d, root)
            summary = d / "summary.csv" if (d / "summary.csv") in found.summaries else None
            results = d / "results.csv" if (d / "results.csv") in found.results else None
            doc.heading(3, f"sweep: {name}")
            bar.update(1)
            try:
                summ, over, res = read_sweep(summary, results)
            except READ_ERRORS as e:
                _unreadable(doc, summary or results, root, e)  # type: ignore[arg-type]
                continue
            src = "summary.csv" if summary else "results.csv (summarised here: mean ± sample sd over runs)"
            n_runs = int(res["run"].nunique()) if res is not None and "run" in res.columns else None
            doc.add(f'<p class="note">{_e(src)}; overrides: {_e(", ".join(over) or "none")}'
                    + (f"; {n_runs} runs" if n_runs is not None else "") + "</p>")
            header, body = sweep_table(summ, over)
            doc.add('<div class="scroll">' + _table(header, body, "sweep-summary", first_col_header=False) + "</div>")
            beta = beta_column(over)
            if beta is not None:
                doc.heading(4, f"β curves ({name})")
                items = []
                for metric, png in beta_figures(summ, over, beta, name):
                    items.append(_figure(data_uri(png), f"{metric} vs β", "beta-curve", {"data-metric": metric}))
                    n_figs += 1
                doc.add(_figs(items, "plots"))
            if res is not None and "run" in res.columns and len(res):
                piv = res.drop_duplicates(["run", "metric"], keep="last")
                metrics = list(dict.fromkeys(piv["metric"].astype(str)))
                cols = [c for c in res.columns if c not in ("metric", "value")]
                per_run: dict[tuple[str, ...], dict[str, str]] = {}
                for rec in piv.to_dict("records"):
                    per_run.setdefault(tuple(_fmt(rec[c]) for c in cols), {})[str(rec["metric"])] = _fmt(rec["value"])
                doc.add(f'<details class="config"><summary>all runs ({len(per_run)})</summary><div class="scroll">'
                        + _table([*cols, *metrics], ([*k, *(v.get(m, "–") for m in metrics)]
                                                     for k, v in per_run.items()), "sweep-runs", False)
                        + "</div></details>")

        # -- runs
        tables = sorted(found.metrics_tables)
        used_configs: set[Path] = set()
        if tables:
            doc.heading(2, "Runs" if len(tables) > 1 else "Run")
        for t in tables:
            name = _name(t.parent, root)
            doc.heading(3, f"run: {name}")
            bar.update(1)
            cfg = _config_for(t, found.configs, root)
            if cfg is not None:
                used_configs.add(cfg)
            try:
                df = read_metrics_table(t)
            except READ_ERRORS as e:
                _unreadable(doc, t, root, e)
                if cfg is not None:
                    doc.add(_config_block(cfg, root))
                continue
            stage = "test" if df["metric"].astype(str).str.startswith("test/").any() else "val"
            groups, metrics, cells = final_metrics(df, stage)
            if metrics:
                what = ("final test metrics" if stage == "test"
                        else f"no test metrics: validation metrics of the last epoch ({_fmt(df[df['stage'] == 'val']['epoch'].max())})")
                doc.add(f'<p class="note">{_e(what)} (group × metric, from {_e(_rel(t, root))})</p>')
                doc.add('<div class="scroll">' + _table(["group", *metrics], (
                    [g, *(_fmt(cells[(g, m)]) if (g, m) in cells else "–" for m in metrics)] for g in groups),
                    f"final-{stage}") + "</div>")
            else:
                doc.add(f'<p class="note">{_e(_rel(t, root))} holds no val/ or test/ metrics</p>')
            figs = val_figures(df, name)
            if figs:
                doc.add(_figs([_figure(data_uri(png), f"{name}: {fam}", "val-curve", {"data-metric": fam})
                               for fam, png in figs], "plots"))
                n_figs += len(figs)
            if cfg is not None:
                doc.add(_config_block(cfg, root))
        other_cfgs = [c for c in sorted(found.configs) if c not in used_configs]
        if other_cfgs:
            doc.heading(2, "Configurations")
            for c in other_cfgs:
                doc.add(_config_block(c, root))

        # -- encoding analyses
        shown: set[Path] = set()
        if found.encodings:
            doc.heading(2, "Encoding" if len(found.encodings) == 1 else "Encoding analyses")
        for sites in sorted(found.encodings):
            name = _name(sites.parent, root)
            doc.heading(3, f"encoding: {name}")
            try:
                (sh, srows), (ih, irows, n_int) = encoding_tables(sites)
            except READ_ERRORS as e:
                _unreadable(doc, sites, root, e)
                continue
            if srows:
                doc.add('<p class="note">summary.json (per event set; precision/recall/F1 against the planted '
                        'multimodal sites when the store is a phantom)</p><div class="scroll">'
                        + _table(sh, srows, "encoding-summary") + "</div>")
            if ih:
                doc.add(f'<h4>integration sites ({n_int}; first {len(irows)} shown)</h4><div class="scroll">'
                        + _table(ih, irows, "integration-sites", first_col_header=False) + "</div>")
            items = []
            for fig in ENCODING_FIGURES:
                p = sites.parent / fig
                if p in found.images:
                    shown.add(p)
                    bar.update(1)
                    items.append(_figure(data_uri(p.read_bytes()), _rel(p, root), "file-encoding",
                                         {"data-file": _rel(p, root)}))
                    n_figs += 1
            doc.add(_figs(items))

        # -- images and concept tables
        kinds: dict[str, list[Path]] = {"grids": [], "concepts": [], "figures": []}
        for p in sorted(p for p in found.images if p not in shown):
            kinds[image_kind(p, root)].append(p)
        titles = {"grids": "Reconstructions", "concepts": "Concept maps", "figures": "Other figures"}
        for kind in ("grids", "concepts", "figures"):
            paths = kinds[kind]
            r_tables = sorted(found.concept_r) if kind == "concepts" else []
            if not paths and not r_tables:
                continue
            doc.heading(2, titles[kind])
            for rt in r_tables:
                try:
                    header, body = concept_r_table(rt)
                except READ_ERRORS as e:
                    _unreadable(doc, rt, root, e)
                    continue
                doc.add(f'<h4>{_e(_rel(rt, root))} (Pearson r with the planted map)</h4><div class="scroll">'
                        + _table(header, body, "concept-r") + "</div>")
            by_dir: dict[Path, list[Path]] = {}
            for p in paths:
                by_dir.setdefault(p.parent, []).append(p)
            for d, ps in by_dir.items():
                if len(by_dir) > 1:
                    doc.add(f"<h4>{_e(_rel(d, root))}</h4>")
                items = []
                for p in ps:
                    bar.update(1)
                    try:
                        data = p.read_bytes()
                    except OSError as e:
                        _unreadable(doc, p, root, e)
                        continue
                    items.append(_figure(data_uri(data, IMAGE_SUFFIXES[p.suffix.lower()]), _rel(p, root),
                                         f"file-{kind}", {"data-file": _rel(p, root)}))
                doc.add(_figs(items, "small" if kind == "concepts" else ""))
        # -- generated text
        if found.generations:
            doc.heading(2, "Generated text")
            for g in sorted(found.generations):
                try:
                    header, body, total = generations_table(g)
                except READ_ERRORS as e:
                    _unreadable(doc, g, root, e)
                    continue
                doc.add(f"<h4>{_e(_rel(g, root))} (first {len(body)} of {total} rows)</h4>"
                        f'<div class="scroll">' + _table(header, body, "text", first_col_header=False) + "</div>")
    finally:
        bar.close()

    now = now or _dt.datetime.now().astimezone()
    title = f"neurovision report: {root.name}"
    head = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(title)}</title><style>{CSS}</style></head><body>")
    meta = (f'<p class="meta">{_e(str(root))} · created {_e(now.strftime("%Y-%m-%d %H:%M:%S %Z").strip())} · '
            f"{len(found.metrics_tables)} runs, {len(sweep_dirs)} sweeps, {len(found.images)} images, "
            f"{n_figs} plots</p>")
    return "".join([head, f"<h1>{_e(title)}</h1>", meta, doc.toc_html(), *doc.body, "</body></html>\n"])


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


def _parser() -> argparse.ArgumentParser:
    from neurovision.cli.habits import argparse_parser

    parser = argparse_parser(
        prog="neurovision report",
        description="a static, self-contained HTML dashboard of a run or sweep directory: final test metrics, "
                    "validation curves, configs, sweep summaries and β curves, reconstruction grids, concept "
                    "maps and generated text")
    parser.add_argument("dir", help="run or sweep directory (scanned recursively)")
    parser.add_argument("--out", default=None, help="output HTML file (default: <dir>/report.html)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or log lines")
    return parser


def main(args: list[str]) -> int:
    """``neurovision report <dir> [--out report.html]``; 0 on success, 1 (one error line) on bad input."""
    cfg = _parser().parse_args(args)
    package = logging.getLogger("neurovision")
    level = package.level
    if cfg.quiet:  # warnings still show
        package.setLevel(max(level, logging.WARNING))
    try:
        out = write_report(cfg.dir, cfg.out, progress=False if cfg.quiet else None)
    except (FileNotFoundError, ReportError) as e:
        print(f"neurovision report: error: {e}", file=sys.stderr)
        return 1
    finally:
        package.setLevel(level)
    print(f"report: {out}")
    return 0


if __name__ == "__main__":
    from neurovision.cli import setup_process

    setup_process()  # the torchvision fix (where needed) and console logging, before anything imports torchvision
    sys.exit(main(sys.argv[1:]))
