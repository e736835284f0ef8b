"""Figures of a β sweep (stage 3): metric-vs-β curves and stimulus | reconstruction-per-β grids.

``neurovision sweep experiments/sweeps/beta.yaml`` runs :class:`~neurovision.tasks.ReconstructionTask` once per
prompt setting (× best-of-N × seed), each run doing every β of its list in one pass over the items, and,
because the sweep file says ``after: [neurovision.runs.beta_figures.figures]``, then calls :func:`figures` on the
sweep folder. It reads the sweep's ``results.csv`` (one row per run × β × metric: the ``beta`` column comes
from the metric name ``test/<cond>/beta=<b>/<metric>`` of a multi-β run, or from the β override of a
one-β-per-run sweep) and each run's reconstructions (``beta=<b>/reconstructions_<condition>.npz`` with the
run's ``stimuli_<condition>.npz``, or ``reconstructions_<condition>.npz`` of a one-β run), and writes

- ``beta_curves.png``: every image metric against β (mean ± sd over seeds), one line per prompt setting and
  condition (the paper's Figure 5), and per ``num_candidates`` where the sweep varies it (best of N);
- ``beta_grid_<condition>[_prompt][_best<N>].png``: the same test items in every row, the stimulus then one column per β;
- ``beta_table.csv``: the curves as a wide table (β, prompt, condition, metric, mean, sd, n);
- TensorBoard events under ``tb/`` (scalars with step = round(100·β), the curve figure, the grids).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from neurovision.data.atomic import atomic_path

IMAGE_METRICS = ("pixcorr", "ssim", "clip", "alexnet2", "alexnet5", "inception", "efficientnet", "swav")


def _prompt_label(v: Any) -> str:
    s = "" if v is None else str(v)
    return "no prompt" if s.strip().lower() in ("", "none", "null", "nan") else "LLM prompt"


def _setting(df: Any) -> Any:
    """Each row's setting label: the prompt, and ", best of N" where the sweep varies ``num_candidates``."""
    label = df["prompts"].map(_prompt_label) if "prompts" in df.columns else df["run"].map(lambda _: "no prompt")
    if "num_candidates" in df.columns:
        n = df["num_candidates"].fillna(1).astype(int)
        label = label + n.map(lambda k: f", best of {k}" if k > 1 else "")
    return label


def with_beta(results: Any) -> Any:
    """``results.csv`` rows with a numeric ``beta`` per row: a metric-name component ``beta=<b>`` (a multi-β run;
    ``neurovision sweep`` already splits it off when it writes the table) wins over the run's ``beta`` column;
    rows without a single β (e.g. a β-list cell and a metric that has no β) are dropped."""
    import pandas as pd

    from neurovision.runs.sweep import metric_columns

    df = results.copy()
    split = df["metric"].astype(str).map(metric_columns)
    from_name = split.map(lambda t: t[1].get("beta"))
    if "beta" not in df.columns and from_name.isna().all():
        raise ValueError("results.csv has no 'beta' column: not a β sweep (model.init_args.beta as a list, or a "
                         "grid key)")
    df["metric"] = split.map(lambda t: t[0])
    own = pd.to_numeric(df["beta"], errors="coerce") if "beta" in df.columns else pd.Series(float("nan"), df.index)
    df["beta"] = pd.to_numeric(from_name, errors="coerce").fillna(own)
    return df[df["beta"].notna()]


def curves_table(results: Any) -> Any:
    """``results.csv`` rows -> mean/sd/n per (β, prompt, condition, metric) for the image metrics."""
    import pandas as pd

    df = with_beta(results)
    df["prompt"] = _setting(df)
    parts = df["metric"].str.split("/", expand=True)
    if parts.shape[1] < 3:
        raise ValueError("results.csv: metric names are not test/<condition>/<metric>")
    df["condition"], df["name"] = parts[1], parts[2]
    df = df[(parts[0] == "test") & df["name"].isin(IMAGE_METRICS) & parts[2].notna()]
    if parts.shape[1] > 3:
        df = df[parts.loc[df.index, 3].isna()]
    df = df.assign(beta=df["beta"].astype(float), value=df["value"].astype(float))
    g = df.groupby(["beta", "prompt", "condition", "name"])["value"]
    out = pd.DataFrame({"mean": g.mean(), "sd": g.std(ddof=1), "n": g.count()}).reset_index()
    return out.rename(columns={"name": "metric"}).sort_values(["metric", "condition", "prompt", "beta"])


def plot_curves(table: Any, path: str | os.PathLike[str]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in IMAGE_METRICS if m in set(table["metric"])]
    n = len(metrics)
    cols = min(3, n)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    styles = {"average": "-", "single": "--"}
    for ax, m in zip(axes.flat, metrics, strict=False):
        sub = table[table["metric"] == m]
        for (cond, prompt), d in sub.groupby(["condition", "prompt"]):
            d = d.sort_values("beta")
            ax.errorbar(d["beta"], d["mean"], yerr=d["sd"].fillna(0), marker="o", ms=3, capsize=2,
                        ls=styles.get(cond, "-"), label=f"{cond}, {prompt}")
            best = d.loc[d["mean"].idxmax()] if m not in ("efficientnet", "swav") else d.loc[d["mean"].idxmin()]
            ax.plot([best["beta"]], [best["mean"]], marker="*", ms=10, color=ax.lines[-1].get_color())
        ax.set_title(m + (" (lower is better)" if m in ("efficientnet", "swav") else ""), fontsize=10)
        ax.set_xlabel("noise strength β")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    if n:
        axes.flat[0].legend(fontsize=7)
    fig.suptitle("Stage 3: image metrics vs β (★ = best β)", fontsize=11)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return Path(path)


def _recons(run_dir: Path, cond: str, beta: float | None = None) -> dict[str, np.ndarray] | None:
    """A run's reconstructions of ``cond`` at ``beta`` (``beta=<b>/`` of a multi-β run, with the stimuli of its
    ``stimuli_<cond>.npz`` paired by (subject, stimulus)), else its one-β ``reconstructions_<cond>.npz``."""
    hits = sorted(run_dir.rglob(f"beta={beta:g}/reconstructions_{cond}.npz")) if beta is not None else []
    if not hits:
        hits = [h for h in sorted(run_dir.rglob(f"reconstructions_{cond}.npz")) if not h.parent.name.startswith("beta=")]
    if not hits:
        return None
    with np.load(hits[-1]) as z:
        out = {k: z[k] for k in z.files}
    if "stimuli" not in out:
        stim = hits[-1].parent.parent / f"stimuli_{cond}.npz"
        if not stim.is_file():
            return None
        with np.load(stim) as s:
            pos = {(int(a), int(b)): i for i, (a, b) in enumerate(zip(s["subject"], s["stimulus"], strict=True))}
            idx = [pos.get((int(a), int(b)), -1) for a, b in zip(out["subject"], out["stimulus"], strict=True)]
            if min(idx, default=0) < 0:
                return None
            out["stimuli"] = s["stimuli"][idx]
    return out


def grids(sweep_dir: Path, results: Any, n_items: int = 6, seed_pick: Any = None) -> list[Path]:
    """One grid per (condition, prompt setting): stimulus | reconstruction at each β, same items per row."""
    import pandas as pd
    import torch

    from neurovision.pretrained.unclip import image_grid

    df = with_beta(results).drop_duplicates(["run", "beta"]).copy()
    df["prompt"] = _setting(df)
    if "seed" in df.columns and df["seed"].notna().any():
        first = seed_pick if seed_pick is not None else sorted(df["seed"].dropna().unique())[0]
        df = df[df["seed"] == first]
    conds = sorted({m.split("/")[1] for m in results["metric"] if m.count("/") >= 2 and m.startswith("test/")})
    written: list[Path] = []
    for cond in conds:
        for prompt, d in df.groupby("prompt"):
            d = d.assign(beta=d["beta"].astype(float)).sort_values("beta")
            cols, labels, stim = [], [], None
            for _, row in d.iterrows():
                z = _recons(sweep_dir / str(row["run"]), cond, float(row["beta"]))
                if z is None:
                    continue
                key = z["subject"].astype(np.int64) * 1_000_000 + z["stimulus"].astype(np.int64)
                order = np.argsort(key)
                if stim is None:
                    pick = order[np.linspace(0, len(order) - 1, min(n_items, len(order))).round().astype(int)]
                    keys = key[pick]
                    stim = torch.from_numpy(z["stimuli"][pick])
                idx = [int(np.flatnonzero(key == k)[0]) for k in keys if (key == k).any()]
                if len(idx) != len(keys):
                    continue
                cols.append(torch.from_numpy(z["images"][idx]))
                labels.append(f"β={row['beta']:g}")
            if stim is None or not cols:
                continue
            first = d.iloc[0]
            n = int(first["num_candidates"]) if "num_candidates" in d.columns and pd.notna(first["num_candidates"]) else 1
            suffix = ("_prompt" if "prompts" in d.columns and _prompt_label(first["prompts"]) != "no prompt" else "") + (
                f"_best{n}" if n > 1 else "")
            p = sweep_dir / f"beta_grid_{cond}{suffix}.png"
            image_grid([stim, *cols], ["stimulus", *labels], path=p,
                       title=f"{cond}, {prompt}: stimulus | reconstruction per β")
            written.append(p)
    return written


def figures(sweep_dir: str | os.PathLike[str]) -> list[Path]:
    """All β-sweep figures of a finished sweep folder (see the module docstring); returns the files written."""
    import pandas as pd

    d = Path(sweep_dir)
    res_path = d / "results.csv"
    if not res_path.is_file():
        raise FileNotFoundError(f"{res_path}: no results table (run the sweep first)")
    results = pd.read_csv(res_path)
    if results.empty:
        return []
    table = curves_table(results)
    with atomic_path(d / "beta_table.csv") as tmp:
        table.to_csv(tmp, index=False)
    out = [d / "beta_table.csv", plot_curves(table, d / "beta_curves.png")]
    out += grids(d, results)
    _tensorboard(d, table, out)
    return out


def _tensorboard(d: Path, table: Any, files: list[Path]) -> None:
    from PIL import Image
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(d / "tb"))
    try:
        for (m, cond, prompt), g in table.groupby(["metric", "condition", "prompt"]):
            for _, r in g.iterrows():
                w.add_scalar(f"beta_sweep/{cond}/{m}/{prompt.replace(' ', '_')}", float(r["mean"]),
                             global_step=int(round(100 * float(r["beta"]))))
        for f in files:
            if f.suffix == ".png":
                w.add_image(f"beta_sweep/{f.stem}", np.asarray(Image.open(f).convert("RGB")), dataformats="HWC")
    finally:
        w.close()


__all__ = ["curves_table", "figures", "grids", "plot_curves", "with_beta"]
