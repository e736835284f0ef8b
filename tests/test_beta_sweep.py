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
    from neurovision.runs.beta_figures import curves_table

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

    from neurovision.runs.beta_figures import figures

    _fake_sweep(tmp_path)
    written = figures(tmp_path)
    names = {p.name for p in written}
    assert {"beta_table.csv", "beta_curves.png", "beta_grid_average.png", "beta_grid_average_prompt.png"} <= names
    grid = np.asarray(Image.open(tmp_path / "beta_grid_average.png").convert("L"))
    assert grid.std() > 10  # not blank: stimulus column black-ish, β=1 column white
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_grid_matches_items_across_runs(tmp_path):
    """Rows pair each stimulus with its own reconstruction in every β column, whatever the npz order."""
    from neurovision.runs.beta_figures import grids

    df = _fake_sweep(tmp_path, betas=(0.0, 1.0), seeds=(0,))
    run = df[(df["beta"] == 1.0) & df["prompts"].isna()]["run"].iloc[0]
    p = tmp_path / run / "test" / "reconstructions_average.npz"
    z = dict(np.load(p))
    order = np.array([2, 0, 4, 1, 3])
    z["images"] = (np.arange(5)[order, None, None, None] * 40 + np.zeros((5, 3, 8, 8))).astype(np.uint8)
    z = {k: (v[order] if k != "images" else v) for k, v in z.items()}
    np.savez(p, **z)
    captured = {}
    import neurovision.pretrained.unclip as rec

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
    from neurovision.runs.beta_figures import figures

    pd.DataFrame([{"run": "a", "seed": 0, "dim": 32, "metric": "test/average/pixcorr", "value": 0.1}]).to_csv(
        tmp_path / "results.csv", index=False)
    with pytest.raises(ValueError, match="no 'beta' column"):
        figures(tmp_path)
    with pytest.raises(FileNotFoundError, match="results.csv"):
        figures(tmp_path / "missing")


def test_best_of_n_is_its_own_curve_and_grid(tmp_path):
    """A sweep that varies num_candidates keeps one series per N (not a mean over them)."""
    import shutil

    from neurovision.runs.beta_figures import curves_table, figures

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


def _multi_beta_sweep(root: Path, betas=(0.0, 0.5, 1.0)) -> Path:
    """A finished sweep of multi-β runs as ReconstructionTask + MetricsTable + neurovision sweep leave it: one run
    per prompt setting, metrics test/average/beta=<b>/<metric>, beta=<b>/reconstructions_average.npz without the
    stimuli and stimuli_average.npz beside the β folders (in another item order)."""
    import csv
    import json

    import yaml

    from neurovision.runs import sweep as sw

    beta_list = [float(b) for b in betas]
    spec = {"commands": ["test"], "args": [f"--model.init_args.beta={beta_list}"],
            "runs": [{"model.init_args.prompts": None}, {"model.init_args.prompts": "runs/x/predictions.jsonl"}],
            "seeds": [0], "out": str(root / "out"), "after": ["neurovision.runs.beta_figures.figures"]}
    path = root / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    sweep = sw.load_sweep(path)
    n = 5
    for run in sw.expand(sweep, root / "out"):
        prompted = run.overrides["model.init_args.prompts"] is not None
        log = run.dir / "test"
        rows = []
        for b in betas:
            (log / f"beta={b:g}").mkdir(parents=True)
            order = np.array([3, 1, 4, 0, 2])  # the stimulus of each npz row
            imgs = (order[:, None, None, None] * 40 + int(b * 10) + np.zeros((n, 3, 8, 8))).astype(np.uint8)
            np.savez(log / f"beta={b:g}" / "reconstructions_average.npz", images=imgs, subject=np.zeros(n, np.int64),
                     stimulus=order)
            pix = 0.5 - (b - 0.5) ** 2 + (0.05 if prompted else 0)
            for m, v in (("pixcorr", pix), ("clip", 0.9 + 0.01 * b)):
                rows.append({"epoch": 0, "step": 0, "stage": "test", "metric": f"test/average/beta={b:g}/{m}",
                             "value": v})
        stim = (np.arange(n)[:, None, None, None] * 40 + np.zeros((n, 3, 8, 8))).astype(np.uint8)
        np.savez(log / "stimuli_average.npz", stimuli=stim, subject=np.zeros(n, np.int64), stimulus=np.arange(n))
        with open(log / "metrics_table.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=sw.TABLE_FIELDS)
            w.writeheader()
            w.writerows(rows)
        (run.dir / "status.json").write_text(json.dumps({"run": run.name, "state": "done", "spec": sw.spec_of(sweep, run),
                                                          "commands": {"test": {"state": "done"}}}))
    return path


def test_multi_beta_runs_give_the_beta_column_curves_and_grids(tmp_path):
    """One run per prompt setting doing every β: the sweep's tables get one row per β (from the metric names),
    and the figures draw a point per β and a grid column per β with each stimulus beside its own images."""
    from neurovision.cli.sweep import main as sweep_main
    from neurovision.runs.beta_figures import curves_table

    path = _multi_beta_sweep(tmp_path)
    captured = {}
    import neurovision.pretrained.unclip as rec

    real = rec.image_grid

    def spy(rows, labels=None, path=None, title=None):
        captured[str(path)] = (rows, labels)
        return real(rows, labels, path, title)

    rec.image_grid = spy
    try:
        assert sweep_main([str(path), "--aggregate_only"]) == 0  # tables, then the after hook (figures)
    finally:
        rec.image_grid = real
    out = tmp_path / "out"
    res = pd.read_csv(out / "results.csv")
    assert set(res["metric"]) == {"test/average/pixcorr", "test/average/clip"}
    assert sorted(set(res["beta"])) == [0.0, 0.5, 1.0] and len(res) == 2 * 3 * 2
    summ = pd.read_csv(out / "summary.csv")
    assert len(summ) == 2 * 3 * 2 and set(summ["n"]) == {1}
    t = curves_table(res)
    peak = t[(t["metric"] == "pixcorr") & (t["prompt"] == "LLM prompt")].sort_values("mean").iloc[-1]
    assert peak["beta"] == 0.5 and peak["mean"] == pytest.approx(0.55)
    assert {"beta_curves.png", "beta_grid_average.png", "beta_grid_average_prompt.png"} <= {
        p.name for p in out.iterdir()}
    rows, labels = captured[str(out / "beta_grid_average.png")]
    assert labels == ["stimulus", "β=0", "β=0.5", "β=1"]
    stim_ids = rows[0][:, 0, 0, 0].numpy() // 40
    for j, b in enumerate((0.0, 0.5, 1.0), start=1):  # each β column: the row's own stimulus, that β's image
        assert (rows[j][:, 0, 0, 0].numpy() // 40 == stim_ids).all()
        assert (rows[j][:, 0, 0, 0].numpy() % 40 == int(b * 10)).all()
    # the raw per-β metric names (a table written before the split) give the same curves
    raw = res.assign(metric=[m.replace("average/", f"average/beta={b:g}/") for m, b in zip(res.metric, res.beta,
                                                                                          strict=True)])
    raw["beta"] = "[0.0, 0.5, 1.0]"
    pd.testing.assert_frame_equal(curves_table(raw).reset_index(drop=True), t.reset_index(drop=True))
