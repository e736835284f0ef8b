"""`neurovision encode` end to end on the SEEG phantom: planted integration sites are found (F1), a null phantom
calls almost nothing, re-runs reuse every cached fit, real networks run through the same path, bad configs fail
with the field named, and the HTML report shows the result."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from neurovision.encoding.pipeline import call_scores
from neurovision.pretrained.feature_networks import PhantomOracle
from neurovision.runs.report import build_report
from neurovision.sources import phantom_seeg
from tests.helpers import run_cli

PHANTOM = ["-c", "experiments/encoding.yaml", "-c", "experiments/presets/encoding_phantom.yaml",
           "--progress", "false", "--statistics.n_boot", "300"]


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("planted")
    store = phantom_seeg.prepare(d / "seeg.h5", preset="tiny")
    out = d / "enc"
    assert run_cli(["encode", *PHANTOM, "--store", str(store), "--out", str(out)]) == 0
    return store, out


def test_planted_multimodal_sites_are_recovered(planted: tuple[Path, Path]) -> None:
    store, out = planted
    summary = json.loads((out / "summary.json").read_text())
    lang = summary["event_sets"]["language"]
    # the target: F1 >= 0.9 on the sentence-aligned events (scene cuts carry less agreement: reported)
    assert lang["f1"] >= 0.9, lang
    sites = pd.read_csv(out / "sites.csv")
    assert len(sites) == 2 * 2 * 24 and set(sites["event_set"]) == {"language", "vision"}
    # recomputed from the table: the summary is what the calls say
    d = sites[sites["event_set"] == "language"]
    again = call_scores(d["integration"].to_numpy(), d["planted"].to_numpy() == "multimodal")
    assert again["f1"] == pytest.approx(lang["f1"])
    # unimodal sites beat the other modality, never the linear combination
    for kind, other in (("vision", "language"), ("language", "vision")):
        k = d[d["planted"] == kind]
        assert (k[f"peak_r_{kind}"] > k[f"peak_r_{other}"]).mean() > 0.9
        assert not k["integration"].any()
    assert (out / "sites_brain.png").stat().st_size > 5000 and (out / "r_by_model.png").stat().st_size > 5000
    layers = pd.read_csv(out / "layers.csv")
    assert set(layers["model"]) == {"vision", "language", "multimodal"} and set(layers["layer"]) == {"concepts"}


def test_rerun_reuses_every_fit(planted: tuple[Path, Path]) -> None:
    store, out = planted
    fits = sorted((out / "fits").rglob("*.npz"))
    assert len(fits) == 4 * 2 * 2  # vision, language, multimodal, linear x subjects x sets
    before = {p: p.stat().st_mtime_ns for p in fits}
    sites = (out / "sites.csv").read_text()
    assert run_cli(["encode", *PHANTOM, "--store", str(store), "--out", str(out)]) == 0
    assert {p: p.stat().st_mtime_ns for p in fits} == before
    assert (out / "sites.csv").read_text() == sites


def test_null_phantom_calls_at_most_five_percent(tmp_path: Path) -> None:
    store = phantom_seeg.prepare(tmp_path / "null.h5", preset="tiny", null_phantom=True)
    out = tmp_path / "enc"
    assert run_cli(["encode", *PHANTOM, "--store", str(store), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["all"]["fraction_integration"] <= 0.05, summary["all"]
    sites = pd.read_csv(out / "sites.csv")
    for col in [c for c in sites.columns if c.startswith("sig_")]:
        assert sites[col].mean() <= 0.05, col


def test_report_shows_the_encoding(planted: tuple[Path, Path]) -> None:
    _, out = planted
    html = build_report(out, progress=False)
    assert "encoding: " in html and "integration sites (" in html
    assert html.count("file-encoding") == 2  # the glass brain and the model comparison, embedded once
    assert not (out / "r_by_layer.png").exists()  # one layer per model: no layer sweep figure
    sites = pd.read_csv(out / "sites.csv")
    n = int(sites["integration"].sum())
    assert f"integration sites ({n};" in html
    if (sites["integration"] & sites["planted"].isna()).any():  # a called null site shows its kind, not a dash
        assert ">null<" in html


def test_real_networks_and_pairs(tmp_path: Path) -> None:
    """A tiny open_clip model trained vs randomly initialised, through the same command: pairs, layers."""
    import open_clip
    import torch

    from neurovision.pretrained.teachers import register_clip_config

    cfg = {"embed_dim": 16,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 16, "head_width": 8, "patch_size": 8},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}
    cfg_path = tmp_path / "micro.json"
    cfg_path.write_text(json.dumps(cfg))
    torch.manual_seed(1)
    model = open_clip.create_model(register_clip_config("micro", cfg), pretrained=None)
    ckpt = tmp_path / "micro.pt"
    torch.save(model.state_dict(), ckpt)
    store = phantom_seeg.prepare(tmp_path / "seeg.h5", preset="tiny", n_subjects=1, n_electrodes=6,
                                 movie_minutes=1.5)
    net = "neurovision.pretrained.feature_networks.OpenClipNetwork"
    common = {"model_name": "micro", "model_config": str(cfg_path), "checkpoint": str(ckpt)}
    models = {
        "vision": {"class_path": net, "init_args": {**common, "modality": "vision",
                                                    "layers": ["embedding", "visual.conv1"]}},
        "language": {"class_path": net, "init_args": {**common, "modality": "language"}},
        "multimodal": {"class_path": net, "init_args": common},
        "multimodal_random": {"class_path": net, "init_args": {**common, "trained": False}},
    }
    yaml = tmp_path / "enc.yaml"
    yaml.write_text(json.dumps({"store": str(store), "out": str(tmp_path / "out"), "models": models,
                                "integration": {}, "pairs": [{"a": "multimodal", "b": "multimodal_random"}],
                                "regression": {"n_folds": 3, "inner_folds": 3},
                                "statistics": {"n_boot": 50}, "extraction": {"accelerator": "cpu"}}))
    assert run_cli(["encode", "-c", str(yaml), "--progress", "false"]) == 0
    sites = pd.read_csv(tmp_path / "out" / "sites.csv")
    assert {"peak_r_multimodal_random", "sig_multimodal>multimodal_random", "integration"} <= set(sites.columns)
    layers = pd.read_csv(tmp_path / "out" / "layers.csv")
    assert set(layers[layers["model"] == "vision"]["layer"]) == {"embedding", "visual.conv1"}
    assert (tmp_path / "out" / "r_by_layer.png").stat().st_size > 5000  # the layer sweep's figure
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    ids = summary["models"]
    assert ids["multimodal"] != ids["multimodal_random"] and "random" in ids["multimodal_random"]


def test_bad_configs_name_the_field(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    store = phantom_seeg.prepare(tmp_path / "seeg.h5", preset="tiny", n_subjects=1, n_electrodes=4,
                                 movie_minutes=1.0)
    base = [*PHANTOM, "--store", str(store), "--out", str(tmp_path / "o")]
    bad = tmp_path / "bad.yaml"
    bad.write_text("statistics: {n_bootstrap: 10}\n")
    assert run_cli(["encode", *base, "-c", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "n_bootstrap" in err
    assert run_cli(["encode", *base, "--integration.multimodal", "fused"]) == 2
    assert "integration.multimodal" in capsys.readouterr().err
    assert run_cli(["encode", *base, "--subjects", "[sub_7]"]) == 2
    assert "'subjects'" in capsys.readouterr().err
    assert run_cli(["encode", *PHANTOM, "--store", str(tmp_path / "missing.h5")]) == 2
    assert "missing.h5" in capsys.readouterr().err
    assert not (tmp_path / "o" / "sites.csv").exists()


class _Events:
    def __init__(self, trial: np.ndarray) -> None:
        self.trial = trial

    def __len__(self) -> int:
        return len(self.trial)


def test_folds_by_recording_fall_back_to_blocks() -> None:
    from neurovision.encoding.pipeline import Regression, _folds

    ev = _Events(np.repeat([0, 1, 2], 10))
    folds = _folds(ev, Regression(folds_by="trial"))
    assert [sorted(set(ev.trial[te])) for _, te in folds] == [[0], [1], [2]]  # whole recordings held out
    folds = _folds(_Events(np.zeros(30, int)), Regression(folds_by="trial", n_folds=5))
    assert len(folds) == 5 and all(np.all(np.diff(te) == 1) for _, te in folds)  # one recording: blocks


def test_call_scores() -> None:
    s = call_scores(np.array([1, 1, 0, 0, 1], bool), np.array([1, 0, 0, 1, 1], bool))
    assert (s["tp"], s["fp"], s["fn"]) == (2, 1, 1)
    assert s["precision"] == pytest.approx(2 / 3) and s["recall"] == pytest.approx(2 / 3)
    assert s["f1"] == pytest.approx(2 / 3) and s["false_call_rate"] == pytest.approx(1 / 2)
    assert os.environ.get("HF_HUB_OFFLINE") == "1"



# ------------------------------------------------------------------------------------------- Brain Treebank size
class SweepOracle(PhantomOracle):
    """The phantom oracle with a 3-layer sweep whose first layer is the oracle's own features."""

    def __init__(self, modality: str) -> None:
        super().__init__(modality)  # type: ignore[arg-type]
        self.layers = ["concepts", "reversed", "sine"]

    @property
    def model_id(self) -> str:
        return super().model_id + "|sweep"

    def extract(self, batch: dict) -> dict:
        x = super().extract(batch)["concepts"]
        return {"concepts": x, "reversed": x.flip(1), "sine": (7 * x + 1).sin()}


def _encoder(store: Path, out: Path, cls: type = PhantomOracle, **regression: object) -> object:
    from neurovision.encoding.pipeline import Encoder, Extraction, Integration, Regression, Statistics

    models = {m: cls(m) for m in ("vision", "language", "multimodal")}
    return Encoder(store, out, models, integration=Integration(), cache=out.parent / "features.h5",
                   regression=Regression(folds_by="contiguous", n_folds=4, inner_folds=3, **regression),
                   statistics=Statistics(n_boot=100, block=1, p_value="normal", min_bins=3),
                   extraction=Extraction(accelerator="cpu"), progress=False)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A small planted phantom run twice: one layer per model, and a 3-layer sweep whose first layer is it."""
    import neurovision.encoding.plots as plots

    d = tmp_path_factory.mktemp("sweep")
    store = phantom_seeg.prepare(d / "seeg.h5", preset="tiny", n_subjects=1, n_electrodes=12, movie_minutes=10.0,
                                 n_bins=41, snr=0.8)
    with pytest.MonkeyPatch.context() as m:  # the figures are tested above; seconds each
        for name in ("sites_brain", "r_by_model", "r_by_layer"):
            m.setattr(plots, name, lambda *a, **k: None)
        _encoder(store, d / "one").run()
        _encoder(store, d / "three", SweepOracle).run()
    return store, d / "one", d / "three"


def test_layer_sweep_stores_predictions_of_the_compared_layer_only(sweep: tuple[Path, Path, Path]) -> None:
    store, one, three = sweep
    # the statistics use the first layer: the sweep changes layers.csv, not the calls
    assert pd.read_csv(three / "sites.csv").equals(pd.read_csv(one / "sites.csv"))
    s1, s3 = (json.loads((d / "summary.json").read_text()) for d in (one, three))
    assert s3["event_sets"] == s1["event_sets"] and s3["all"] == s1["all"]
    assert s1["all"]["n_integration"] > 0  # the calls compared are not trivially empty
    layers = pd.read_csv(three / "layers.csv")
    assert len(layers) == 3 * 3 * 2 and set(layers["layer"]) == {"concepts", "reversed", "sine"}
    from neurovision.data.events import EventStore

    es = EventStore(store)
    for d in ("vision__concepts", "language__concepts", "multimodal__concepts", "linear"):
        for f in sorted((three / "fits" / d).glob("*.npz")):
            with np.load(f) as z:
                assert set(z.files) == {"version", "r", "alphas", "predictions", "predictions_scale"}, f
                n_ev = len(es.events("sub_1", f.name.split("_")[2]))
                assert z["predictions"].dtype == np.float16 and z["predictions"].shape[0] == n_ev
                assert f.stat().st_size >= 2 * z["predictions"].size  # float16 (E, N*B)
    n_targets = 12 * 41
    for d in ("reversed", "sine"):
        files = sorted((three / "fits").glob(f"*__{d}/*.npz"))
        assert len(files) == 3 * 2  # 3 models x 2 event sets
        for f in files:
            with np.load(f) as z:
                assert set(z.files) == {"version", "r", "alphas"}, f  # r (N, B) and α only
                assert z["r"].shape == (12, 41) and z["alphas"].shape == (4, n_targets)
            assert f.stat().st_size < (1 + 4) * n_targets * 4 + 2048  # r + α per fold (float32) + zip headers


def test_sweep_rerun_recomputes_nothing(sweep: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    import neurovision.encoding.features as features
    import neurovision.encoding.plots as plots
    import neurovision.encoding.ridge as ridge

    store, _, three = sweep
    fits = {p: p.stat().st_mtime_ns for p in (three / "fits").rglob("*.npz")}
    sites = (three / "sites.csv").read_text()

    def fail(*a: object, **k: object) -> None:
        raise AssertionError("recomputed")

    for mod, name in ((ridge, "cross_validated_ridge"), (ridge, "cross_validated_banded_ridge"),
                      (features, "_run_network")):
        monkeypatch.setattr(mod, name, fail)
    for name in ("sites_brain", "r_by_model", "r_by_layer"):
        monkeypatch.setattr(plots, name, lambda *a, **k: None)
    _encoder(store, three, SweepOracle).run()
    assert {p: p.stat().st_mtime_ns for p in (three / "fits").rglob("*.npz")} == fits
    assert (three / "sites.csv").read_text() == sites


def test_stale_fits_are_recomputed_not_misread(sweep: tuple[Path, Path, Path], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    import neurovision.encoding.pipeline as pipeline

    store, one, _ = sweep
    out = tmp_path / "one"
    shutil.copytree(one / "fits", out / "fits")
    enc = _encoder(store, out)
    path = enc.fit_path("vision", "sub_1", "language")
    with np.load(path) as z:
        good = {k: z[k] for k in z.files}
    fresh = enc.fit("vision", "sub_1", "language")
    np.testing.assert_array_equal(fresh["r"], good["r"])
    # a file in the previous format (FITS_VERSION 2: float32 predictions, no version) at the current path
    n, t = good["predictions"].shape
    np.savez(path, predictions=np.zeros((n, t), np.float32), r=np.zeros_like(good["r"]), alphas=good["alphas"])
    again = enc.fit("vision", "sub_1", "language")
    np.testing.assert_array_equal(again["r"], good["r"])  # recomputed, not the zeros
    np.testing.assert_array_equal(again["predictions"], fresh["predictions"])
    with np.load(path) as z:
        assert int(z["version"]) == pipeline.FITS_VERSION and z["predictions"].dtype == np.float16
    # a file without predictions (an unused layer's) is refitted when the predictions are asked for
    np.savez(path, version=np.int64(pipeline.FITS_VERSION), r=good["r"], alphas=good["alphas"])
    assert "predictions" not in enc.fit("vision", "sub_1", "language", predictions=False)
    np.testing.assert_array_equal(enc.fit("vision", "sub_1", "language")["predictions"], fresh["predictions"])
    # float32 asked for: float16 files are not read as such
    enc32 = _encoder(store, out, predictions_dtype="float32")
    assert enc32.fit_path("vision", "sub_1", "language") == path  # same fit, stored predictions differ
    p32 = enc32.fit("vision", "sub_1", "language")["predictions"]
    with np.load(path) as z:
        assert z["predictions"].dtype == np.float32
    assert np.abs(p32 - fresh["predictions"]).max() <= 1e-3 * np.abs(p32).max()
    # the version is part of every fit's key: an old version's files are never even opened
    monkeypatch.setattr(pipeline, "FITS_VERSION", 2)
    assert enc.fit_path("vision", "sub_1", "language") != path


def test_float16_predictions_keep_the_calls(sweep: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """The phantom's statistics from float32 predictions vs the float16 ones the pipeline stores: the same calls,
    Δr within 5e-4 (measured: < 1e-4 here and on the tiny phantom)."""
    from neurovision.encoding import stats
    from neurovision.encoding.pipeline import decode_predictions, encode_predictions

    store, one, _ = sweep
    enc = _encoder(store, tmp_path / "enc32", predictions_dtype="float32")
    sites = pd.read_csv(one / "sites.csv")  # the float16 run
    ig = enc.integration
    n_sig = 0
    for event_set in ("language", "vision"):
        y, yf, _ = enc.data("sub_1", event_set)
        preds = {m: enc.fit(m, "sub_1", event_set)["predictions"] for m in (ig.multimodal, ig.vision, ig.language)}
        preds["linear"] = enc.fit_linear("sub_1", event_set)["predictions"]
        assert all(p.dtype == np.float32 for p in preds.values())
        idx = enc.bootstrap("sub_1", event_set)
        kw = dict(multimodal=ig.multimodal, baselines=(ig.vision, ig.language, "linear"),
                  **enc.stats_kwargs(y.shape[2]))
        t32 = stats.integration_sites(yf, preds, idx, **kw)
        half = {k: decode_predictions(encode_predictions(p.copy())) for k, p in preds.items()}
        assert max(float(np.abs(half[k] - p).max() / np.abs(p).max()) for k, p in preds.items()) < 1e-3
        t16 = stats.integration_sites(yf, half, idx, **kw)
        row = sites[sites["event_set"] == event_set].reset_index(drop=True)
        for b in (ig.vision, ig.language, "linear"):
            label = f"{ig.multimodal}>{b}"
            want = t32[f"sig_{label}"].to_numpy()
            n_sig += int(want.sum())
            np.testing.assert_array_equal(t16[f"sig_{label}"].to_numpy(), want)
            np.testing.assert_array_equal(row[f"sig_{label}"].to_numpy(), want)
            np.testing.assert_array_equal(t16[f"n_sig_bins_{label}"].to_numpy(), t32[f"n_sig_bins_{label}"])
            np.testing.assert_allclose(t16[f"dr_peak_{label}"], t32[f"dr_peak_{label}"], atol=5e-4)
            np.testing.assert_allclose(row[f"dr_{label}"], t32[f"dr_peak_{label}"], atol=5e-4)
        np.testing.assert_array_equal(row["integration"].to_numpy(), t32["integration"].to_numpy())
    assert n_sig >= 10  # enough calls for the comparison to mean something
