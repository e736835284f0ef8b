"""Figures of the encoding stage: electrodes on a glass brain and model comparisons (Agg, written atomically)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from neurovision.data.atomic import atomic_path

_COLOURS = {"integration": "#d62728", "significant": "#ff9f1c", "other": "#9aa5b1"}


def _save(fig: Any, out: str | os.PathLike[str]) -> Path:
    out = Path(out)
    with atomic_path(out, suffix=".partial.png") as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
    return out


def sites_brain(df: Any, out: str | os.PathLike[str]) -> Path:
    """Every electrode (one marker per subject x electrode; integration = called in any event set) on nilearn's
    glass brain when the coordinates are MNI, else on three orthogonal scatter views of the native space."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    keys = ["subject", "electrode"]
    g = df.groupby(keys, sort=False)
    first = g.first()
    coords = first[["x", "y", "z"]].to_numpy(float)
    integ = g["integration"].any().to_numpy() if "integration" in df else np.zeros(len(first), bool)
    sig_cols = [c for c in df.columns if c.startswith("sig_")]
    sig = g[sig_cols].any().any(axis=1).to_numpy() if sig_cols else np.zeros(len(first), bool)
    colours = np.where(integ, _COLOURS["integration"], np.where(sig, _COLOURS["significant"], _COLOURS["other"]))
    sizes = np.where(integ, 40, np.where(sig, 20, 8))
    title = (f"{int(integ.sum())} integration sites (red) of {len(first)} electrodes; orange: a significant "
             "comparison, not all")
    space = str(first["space"].iloc[0]) if "space" in first and len(first) else ""
    if space.upper() == "MNI":
        from nilearn import plotting

        fig = plt.figure(figsize=(10, 3.6))
        order = np.argsort(sizes)  # integration sites drawn last (on top)
        display = plotting.plot_markers(
            node_values=np.zeros(len(order)), node_coords=coords[order], node_size=sizes[order].tolist(),
            node_cmap="gray", colorbar=False, display_mode="ortho", figure=fig, title=title, alpha=0.9)
        # plot_markers colours by value; redraw with our categorical colours
        display.add_markers(coords[order], marker_color=colours[order].tolist(), marker_size=sizes[order].tolist())
    else:
        fig, axes = plt.subplots(1, 3, figsize=(9, 3.2))
        for ax, (i, j, lab) in zip(axes, [(0, 1, "x/y"), (0, 2, "x/z"), (1, 2, "y/z")], strict=True):
            ax.scatter(coords[:, i], coords[:, j], c=colours, s=sizes)
            ax.set_title(lab, fontsize=8)
            ax.set_aspect("equal", adjustable="datalim")
        fig.suptitle(f"{title} ({space or 'native'} coordinates)", fontsize=9)
    try:
        return _save(fig, out)
    finally:
        plt.close(fig)


def r_by_model(df: Any, curves: dict[str, list[np.ndarray]], bins: np.ndarray,
               out: str | os.PathLike[str]) -> Path:
    """Left: each model's peak r over sites (box per event set); right: mean Δr over time of every comparison,
    among the integration sites (solid) and the other sites (dashed)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    models = [c[len("peak_r_"):] for c in df.columns if c.startswith("peak_r_")]
    sets = sorted(df["event_set"].unique())
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.6))
    width = 0.8 / max(len(sets), 1)
    for k, es in enumerate(sets):
        d = df[df["event_set"] == es]
        pos = np.arange(len(models)) + (k - (len(sets) - 1) / 2) * width
        bp = a1.boxplot([d[f"peak_r_{m}"].to_numpy() for m in models], positions=pos, widths=width * 0.9,
                        patch_artist=True, showfliers=False)
        for box in bp["boxes"]:
            box.set_facecolor(f"C{k}")
            box.set_alpha(0.6)
        a1.plot([], [], color=f"C{k}", lw=6, alpha=0.6, label=es)
    a1.set_xticks(np.arange(len(models)), models, rotation=30, ha="right", fontsize=8)
    a1.set_ylabel("peak cross-validated r")
    a1.legend(fontsize=8)
    integ = df["integration"].to_numpy() if "integration" in df else None
    for k, (label, parts) in enumerate(curves.items()):
        dr = np.concatenate(parts, axis=0)
        if integ is not None and integ.any():
            a2.plot(bins, dr[integ].mean(0), color=f"C{k}", label=f"{label} (integration sites)")
            if (~integ).any():
                a2.plot(bins, dr[~integ].mean(0), color=f"C{k}", ls="--", lw=1)
        else:
            a2.plot(bins, dr.mean(0), color=f"C{k}", label=label)
    a2.axhline(0, color="k", lw=0.5)
    a2.axvline(0, color="k", lw=0.5, ls=":")
    a2.set_xlabel("time from event (s)")
    a2.set_ylabel("mean Δr")
    if curves:
        a2.legend(fontsize=7)
    try:
        return _save(fig, out)
    finally:
        plt.close(fig)


def r_by_layer(layers: Any, out: str | os.PathLike[str]) -> Path:
    """The layer sweep: mean peak r over sites (averaged over subjects) per layer, one line per model x event set."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.4))
    g = layers.groupby(["model", "event_set", "layer"], sort=False)["mean_peak_r"].mean().reset_index()
    for k, ((model, es), d) in enumerate(g.groupby(["model", "event_set"], sort=False)):
        ax.plot(np.arange(len(d)), d["mean_peak_r"].to_numpy(), marker="o", color=f"C{k % 10}",
                label=f"{model} ({es})")
        for i, name in enumerate(d["layer"]):
            ax.annotate(str(name), (i, float(d["mean_peak_r"].iloc[i])), fontsize=6, rotation=20,
                        xytext=(2, 2), textcoords="offset points")
    ax.set_xlabel("layer (order of the YAML's `layers`)")
    ax.set_ylabel("mean peak r over sites")
    ax.legend(fontsize=7)
    try:
        return _save(fig, out)
    finally:
        plt.close(fig)
