"""β-sweep figures: the curve table from a sweep's results.csv, curves, per-β grids and TensorBoard events."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest


def _fake_sweep(root: Path, betas=(0.0, 0.5, 1.0), seeds=(0, 1)) -> pd.DataFrame:
    rows = []
    rng = np.random.default_rng(0)
    for prompts in (None, "runs/x/predictions.jsonl"):
        for b in betas:
            for s in seeds:
                run = f"beta={b:g}__prompts={'p' if prompts else 'null'}__seed={s}"
                d = root / run / "test"
                d.mkdir(parents=True)
                n = 5
                imgs = np.full((n, 3, 8, 8), int(255 * b), np.uint8)
                np.savez(d / "reconstructions_average.npz", images=imgs,
                         stimuli=np.zeros((n, 3, 8, 8), np.uint8) + np.arange(n)[:, None, None, None].astype(np.uint8),
                         subject=np.zeros(n, np.int64), stimulus=np.arange(n)[::-1].copy())
                pix = 0.5 - (b - 0.5) ** 2 + 0.01 * s + (0.05 if prompts else 0)  # peaks at β = 0.5
                for metric, v in (("test/average/pixcorr", pix), ("test/average/clip", 0.9 + 0.01 * b),
                                  ("test/average/sub-01/pixcorr", 9.0), ("test/average/loss", 1.0)):
                    rows.append({"run": run, "seed": s, "beta": b, "prompts": prompts, "metric": metric,
                                 "value": v + rng.normal(0, 1e-9)})
    df = pd.DataFrame(rows)
    df.to_csv(root / "results.csv", index=False)
    return df


def test_curves_table_means_over_seeds(tmp_path):
    from neurovision.beta_sweep import curves_table

    df = _fake_sweep(tmp_path)
    t = curves_table(pd.read_csv(tmp_path / "results.csv"))
    assert set(t["metric"]) == {"pixcorr", "clip"}  # per-subject rows and non-image metrics left out
    r = t[(t["metric"] == "pixcorr") & (t["beta"] == 0.5) & (t["prompt"] == "no prompt")].iloc[0]
    assert r["mean"] == pytest.approx(0.5 + 0.005, abs=1e-6) and r["n"] == 2
    assert r["sd"] == pytest.approx(np.std([0.5, 0.51], ddof=1), abs=1e-6)
    assert set(t["prompt"]) == {"no prompt", "LLM prompt"}
    peak = t[(t["metric"] == "pixcorr") & (t["prompt"] == "no prompt")].sort_values("mean").iloc[-1]
    assert peak["beta"] == 0.5
    assert len(df) > 0


def test_figures_write_curves_grids_and_tensorboard(tmp_path):
    from PIL import Image

    from neurovision.beta_sweep import figures

    _fake_sweep(tmp_path)
    written = figures(tmp_path)
    names = {p.name for p in written}
    assert {"beta_table.csv", "beta_curves.png", "beta_grid_average.png", "beta_grid_average_prompt.png"} <= names
    grid = np.asarray(Image.open(tmp_path / "beta_grid_average.png").convert("L"))
    assert grid.std() > 10  # not blank: stimulus column black-ish, β=1 column white
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_grid_matches_items_across_runs(tmp_path):
    """Rows pair each stimulus with its own reconstruction in every β column, whatever the npz order."""
    from neurovision.beta_sweep import grids

    df = _fake_sweep(tmp_path, betas=(0.0, 1.0), seeds=(0,))
    run = df[(df["beta"] == 1.0) & df["prompts"].isna()]["run"].iloc[0]
    p = tmp_path / run / "test" / "reconstructions_average.npz"
    z = dict(np.load(p))
    order = np.array([2, 0, 4, 1, 3])
    z["images"] = (np.arange(5)[order, None, None, None] * 40 + np.zeros((5, 3, 8, 8))).astype(np.uint8)
    z = {k: (v[order] if k != "images" else v) for k, v in z.items()}
    np.savez(p, **z)
    captured = {}
    import neurovision.reconstruction as rec

    real = rec.image_grid

    def spy(rows, labels=None, path=None, title=None):
        captured[str(path)] = rows
        return real(rows, labels, path, title)

    rec.image_grid = spy
    try:
        grids(tmp_path, pd.read_csv(tmp_path / "results.csv"), n_items=5)
    finally:
        rec.image_grid = real
    rows = captured[str(tmp_path / "beta_grid_average.png")]
    stim_ids = rows[0][:, 0, 0, 0].numpy()  # stimulus images carry their stimulus index... reversed ids
    beta1 = rows[-1][:, 0, 0, 0].numpy() // 40
    # in the β=1 npz, the image of row i encodes the original position order[i]; match by (subject, stimulus)
    assert (stim_ids == beta1).all()


def test_not_a_beta_sweep(tmp_path):
    from neurovision.beta_sweep import figures

    pd.DataFrame([{"run": "a", "seed": 0, "dim": 32, "metric": "test/average/pixcorr", "value": 0.1}]).to_csv(
        tmp_path / "results.csv", index=False)
    with pytest.raises(ValueError, match="no 'beta' column"):
        figures(tmp_path)
    with pytest.raises(FileNotFoundError, match="results.csv"):
        figures(tmp_path / "missing")


def test_best_of_n_is_its_own_curve_and_grid(tmp_path):
    """A sweep that varies num_candidates keeps one series per N (not a mean over them)."""
    import shutil

    from neurovision.beta_sweep import curves_table, figures

    df = _fake_sweep(tmp_path, seeds=(0,))
    df = df[df["prompts"].isna()]
    best = df.assign(num_candidates=8, value=df["value"] + 0.1,
                     run=df["run"].str.replace("__prompts=null", "__n=8"))
    for run in best["run"].unique():  # the best-of-8 runs' folders (same reconstructions)
        src = tmp_path / run.replace("__n=8", "__prompts=null")
        shutil.copytree(src, tmp_path / run)
    both = pd.concat([df.assign(num_candidates=1), best])
    both.to_csv(tmp_path / "results.csv", index=False)
    t = curves_table(pd.read_csv(tmp_path / "results.csv"))
    assert set(t["prompt"]) == {"no prompt", "no prompt, best of 8"}
    one = t[(t["metric"] == "clip") & (t["prompt"] == "no prompt")].set_index("beta")["mean"]
    eight = t[(t["metric"] == "clip") & (t["prompt"] == "no prompt, best of 8")].set_index("beta")["mean"]
    np.testing.assert_allclose(eight - one, 0.1, atol=1e-6)
    names = {p.name for p in figures(tmp_path)}
    assert {"beta_grid_average.png", "beta_grid_average_best8.png"} <= names
