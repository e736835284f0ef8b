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
from neurovision.report import build_report
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

    from neurovision.teachers import register_clip_config

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
    net = "neurovision.encoding.features.OpenClipNetwork"
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
    assert run_cli(["encode", *base, "--integration.multimodal", "fused"]) == 1
    assert "integration.multimodal" in capsys.readouterr().err
    assert run_cli(["encode", *base, "--subjects", "[sub_7]"]) == 1
    assert "'subjects'" in capsys.readouterr().err
    assert run_cli(["encode", *PHANTOM, "--store", str(tmp_path / "missing.h5")]) == 1
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
