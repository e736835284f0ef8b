"""The Brain Treebank converter on a tiny layout-faithful fake: CLI, sites, event alignment, targets, errors."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from neurovision.data.events import EventStore
from neurovision.sources import braintreebank as btb
from tests.fakes.braintreebank import FPS, make_fake_braintreebank
from tests.helpers import run_cli

FRAME = 32  # frame_size of the module store
MOVIE = "fake-movie-0"


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return make_fake_braintreebank(tmp_path_factory.mktemp("btb"))


@pytest.fixture(scope="module")
def built(fake: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """The store made through `neurovision prepare braintreebank` (and the warnings it raised)."""
    out = tmp_path_factory.mktemp("store") / "btb.h5"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert run_cli(["prepare", "braintreebank", "--root", str(fake["root"]), "--movies", str(fake["movies"]),
                        "--out", str(out), "--frame_size", str(FRAME)]) == 0
    return out, [str(w.message) for w in caught]


@pytest.fixture(scope="module")
def store(built: tuple[Path, list[str]]) -> EventStore:
    return EventStore(built[0])


# --------------------------------------------------------------------------------------------- references
def _timings(fake: dict[str, Any], s: int, t: int = 0) -> tuple[np.ndarray, np.ndarray]:
    df = pd.read_csv(fake["root"] / "subject_timings" / f"sub_{s}_trial{t:03}_timings.csv")
    return df["movie_time"].to_numpy(float), df["index"].to_numpy(int)


def _sample(t: float, mt: np.ndarray, idx: np.ndarray) -> int:
    """The documented trigger rule, written out by hand."""
    row = min(int(np.searchsorted(mt, t)), len(mt) - 1)
    return int(idx[row] + np.round((t - mt[row]) * 2048))


def _valid(t: float, mt: np.ndarray, idx: np.ndarray, n_samples: int, start: float = -2.0, stop: float = 2.0,
           window: float = 0.2) -> bool:
    i = _sample(t, mt, idx)
    return (t + start - window / 2 >= mt[0] and t + stop + window / 2 <= mt[-1]
            and i + round((start - window / 2) * 2048) >= 0
            and i + round((stop - window / 2) * 2048) + round(window * 2048) <= n_samples)


def _n_samples(fake: dict[str, Any], s: int) -> int:
    with h5py.File(fake["root"] / f"sub_{s}_trial000.h5", "r") as f:
        return int(f["data/electrode_0"].shape[0])


def _first_frame_at_or_after(fake: dict[str, Any], t: float) -> float:
    times = fake["movie"][MOVIE]["frame_times"]
    return float(min(x for x in times if x >= t))


def _copy_root(fake: dict[str, Any], tmp_path: Path) -> Path:
    return Path(shutil.copytree(fake["root"], tmp_path / "braintreebank"))


# --------------------------------------------------------------------------------------------- CLI
def test_cli_builds_and_rerun_is_noop(fake: dict[str, Any], built: tuple[Path, list[str]],
                                      capsys: pytest.CaptureFixture[str]) -> None:
    out, _ = built
    mtime = out.stat().st_mtime_ns
    capsys.readouterr()
    assert run_cli(["prepare", "braintreebank", "--root", str(fake["root"]), "--movies", str(fake["movies"]),
                    "--out", str(out), "--frame_size", str(FRAME)]) == 0
    assert "up to date" in capsys.readouterr().out
    assert out.stat().st_mtime_ns == mtime


def test_help_lists_options() -> None:
    assert run_cli(["prepare", "braintreebank", "--help"]) == 0


# --------------------------------------------------------------------------------------------- sites
def test_sites(store: EventStore, fake: dict[str, Any], built: tuple[Path, list[str]]) -> None:
    assert store.subject_names == ["sub_1", "sub_2"]
    assert store.attrs["source"] == "braintreebank"
    for s in (1, 2):
        sites = store.sites(f"sub_{s}")
        assert sites.electrode == fake["kept"][s]
        assert "DC4" not in sites.electrode and "LB2" not in sites.electrode  # trigger, corrupted
        assert sites.space == "LIP"
        for k, lab in enumerate(sites.electrode):
            np.testing.assert_allclose(sites.coords[k], fake["coords"][s][lab], atol=1e-4)
            assert sites.region[k] == fake["regions"][s][lab]
        assert store.event_sets(f"sub_{s}") == ["language", "vision"]
    assert "RH1" not in store.sites("sub_2").electrode and "RH1" in store.sites("sub_1").electrode
    assert store.sites("sub_1").region[store.sites("sub_1").electrode.index("LA3")] == ""
    assert any("sub_2" in w and "RH1" in w and "depth-wm.csv" in w for w in built[1])
    np.testing.assert_allclose(store.bin_centers, np.linspace(-2, 2, 161))
    assert store.bin_window == pytest.approx(0.2)


# --------------------------------------------------------------------------------------------- events
def test_language_events(store: EventStore, fake: dict[str, Any]) -> None:
    info = fake["movie"][MOVIE]
    for s in (1, 2):
        mt, idx = _timings(fake, s)
        n = _n_samples(fake, s)
        expected = [t for t in info["onsets"] if _valid(t, mt, idx, n)]
        assert 0 < len(expected) < len(info["onsets"])  # the last sentence is too close to the end
        ev = store.events(f"sub_{s}", "language")
        np.testing.assert_allclose(ev.time, expected)
        assert set(ev.movie) == {MOVIE} and set(ev.trial) == {0}
        for k, t in enumerate(ev.time):
            assert store.frame_keys[ev.frame[k]] == f"{MOVIE}@{_first_frame_at_or_after(fake, t):.3f}"
            j = int(np.argmin(np.abs(info["onsets"] - t)))
            assert store.sentences[ev.sentence[k]] == info["sentences"][j]
    # both subjects watched the same movie: the frames they share are stored once
    assert len(set(store.frame_keys)) == len(store.frame_keys)
    assert len(set(store.sentences)) == len(store.sentences)
    np.testing.assert_array_equal(store.events("sub_1", "language").frame, store.events("sub_2", "language").frame)


def test_detected_cuts_match_planted_cuts(store: EventStore, fake: dict[str, Any]) -> None:
    info = fake["movie"][MOVIE]
    frames = btb.load_frames(fake["movies"], MOVIE)
    detected = btb.detect_scene_cuts(frames, 0.12, 1.0)
    assert len(detected) == len(info["cuts"])
    assert np.all(detected >= info["cuts"]) and np.all(detected - info["cuts"] < 1 / FPS)


def test_vision_events(store: EventStore, fake: dict[str, Any]) -> None:
    info = fake["movie"][MOVIE]
    detected = btb.detect_scene_cuts(btb.load_frames(fake["movies"], MOVIE), 0.12, 1.0)
    for s in (1, 2):
        mt, idx = _timings(fake, s)
        n = _n_samples(fake, s)
        expected = [c for c in detected if c >= info["onsets"][0] and _valid(c, mt, idx, n)]
        ev = store.events(f"sub_{s}", "vision")
        np.testing.assert_allclose(ev.time, expected)
        assert detected[0] < info["onsets"][0] and detected[0] not in ev.time  # no sentence before it
        for k, c in enumerate(ev.time):
            assert store.frame_keys[ev.frame[k]] == f"{MOVIE}@{_first_frame_at_or_after(fake, c):.3f}"
            prev = max(j for j, o in enumerate(info["onsets"]) if o <= c)
            assert store.sentences[ev.sentence[k]] == info["sentences"][prev]


def test_scene_cuts_csv_wins(fake: dict[str, Any], tmp_path: Path) -> None:
    movies = Path(shutil.copytree(fake["movies"], tmp_path / "movies"))
    given = [5.1, 12.3, 20.0, 26.6]
    pd.DataFrame({"time": given}).to_csv(movies / MOVIE / "scene_cuts.csv", index=False)
    out = btb.prepare(fake["root"], movies, tmp_path / "x.h5", subjects=[1], frame_size=8, n_bins=5)
    ev = EventStore(out).events("sub_1", "vision")
    np.testing.assert_allclose(ev.time, given)
    keys = EventStore(out).frame_keys
    assert [keys[i] for i in ev.frame] == [f"{MOVIE}@{_first_frame_at_or_after(fake, c):.3f}" for c in given]


def test_alignment_helpers() -> None:
    frames = np.array([0.0, 0.25, 0.5])
    np.testing.assert_array_equal(btb.following_frame(frames, np.array([-1.0, 0.25, 0.3, 0.5, 0.51])),
                                  [0, 1, 2, 2, -1])
    onsets = np.array([1.0, 3.0])
    np.testing.assert_array_equal(btb.preceding_onset(onsets, np.array([0.5, 1.0, 2.9, 3.0, 9.0])), [-1, 0, 0, 1, 1])
    mt, idx = np.array([0.0, 1.0, 2.0]), np.array([100, 2148, 4200])
    np.testing.assert_array_equal(btb.movie_to_sample(np.array([-0.5, 0.5, 1.0, 2.5]), mt, idx),
                                  [100 - 1024, 2148 - 1024, 2148, 4200 + 1024])
    assert btb.clean_label("T1b2*") == "T1b2" and btb.clean_label("#LA1") == "LA1"
    assert btb.is_trigger("dc1") and btb.is_trigger("TRIG2") and not btb.is_trigger("LA1")


# --------------------------------------------------------------------------------------------- frames
def test_frames(store: EventStore, fake: dict[str, Any]) -> None:
    assert store.frame_shape == (FRAME, FRAME, 3)
    df = pd.read_csv(fake["movies"] / MOVIE / "frames.csv")
    for r in (0, len(store.frame_keys) - 1):
        t = float(store.frame_keys[r].split("@")[1])
        file = df.loc[np.isclose(df["time"], t), "file"].item()
        im = Image.open(fake["movies"] / MOVIE / file).convert("RGB")  # 48 wide, 32 high
        expected = np.asarray(im.crop((8, 0, 40, 32)).resize((FRAME, FRAME), Image.BICUBIC))
        np.testing.assert_array_equal(store.frames([r])[0], expected)


# --------------------------------------------------------------------------------------------- targets
def _brute_force(raw: np.ndarray, t: float, mt: np.ndarray, idx: np.ndarray, centers: np.ndarray,
                 window: float = 0.2) -> np.ndarray:
    i = _sample(t, mt, idx)
    n = round(window * 2048)
    out = []
    for c in centers:
        lo = i + round((c - window / 2) * 2048)
        out.append(float(np.mean(raw[lo:lo + n].astype(np.float64))))
    return np.array(out)


@pytest.mark.parametrize("event_set", ["language", "vision"])
def test_targets_match_brute_force(store: EventStore, fake: dict[str, Any], event_set: str) -> None:
    for s in (1, 2):
        name = f"sub_{s}"
        mt, idx = _timings(fake, s)
        ev, y = store.events(name, event_set), store.targets(name, event_set)
        assert y.dtype == np.float32 and y.shape == (len(ev), len(store.sites(name)), 161)
        with h5py.File(fake["root"] / f"{name}_trial000.h5", "r") as f:
            for e in (0, len(ev) - 1):
                for label in ("LA1", "LA2", "RH2"):
                    j = store.sites(name).electrode.index(label)
                    pos = [x.replace("*", "").replace("#", "") for x in fake["labels"][s]].index(label)
                    raw = f[f"data/electrode_{pos}"][()]
                    np.testing.assert_allclose(y[e, j], _brute_force(raw, ev.time[e], mt, idx, store.bin_centers),
                                               rtol=1e-5, atol=1e-4)


def test_planted_waveform_visible(store: EventStore) -> None:
    for s in (1, 2):
        name = f"sub_{s}"
        y = store.targets(name, "language").mean(0)  # (N, B)
        y = y - np.median(y, axis=1, keepdims=True)
        k = store.sites(name).electrode.index("LA2")
        assert store.bin_centers[np.argmax(y[k])] == pytest.approx(0.5, abs=0.03)
        assert y[k].max() > 20
        others = np.delete(y, k, axis=0)
        assert np.abs(others).max() < 8


def test_high_gamma_and_word_events(fake: dict[str, Any], tmp_path: Path) -> None:
    from scipy.signal import butter, hilbert, sosfiltfilt

    out = btb.prepare(fake["root"], fake["movies"], tmp_path / "hg.h5", subjects=[1], signal="high_gamma",
                      language_events="word", n_bins=41, frame_size=8)
    s = EventStore(out)
    ev, y = s.events("sub_1", "language"), s.targets("sub_1", "language")
    mt, idx = _timings(fake, 1)
    words = [t for t in fake["movie"][MOVIE]["word_times"] if _valid(t, mt, idx, _n_samples(fake, 1))]
    np.testing.assert_allclose(ev.time, words)
    assert len(ev) > len(fake["movie"][MOVIE]["onsets"])
    # the 110 Hz burst from 1.0 to 1.3 s after each sentence onset
    onset_rows = np.isin(np.round(ev.time, 3), np.round(fake["movie"][MOVIE]["onsets"], 3))
    k = s.sites("sub_1").electrode.index("LA2")
    curve = y[onset_rows, k].mean(0)
    assert s.bin_centers[np.argmax(curve)] == pytest.approx(1.15, abs=0.1)
    assert curve.max() > 3 * np.median(curve) and (y >= 0).all()
    # exact values for one event: band-pass, Hilbert envelope, window means
    with h5py.File(fake["root"] / "sub_1_trial000.h5", "r") as f:
        raw = f["data/electrode_1"][()].astype(np.float64)
    env = np.abs(hilbert(sosfiltfilt(butter(4, [70, 150], btype="bandpass", fs=2048, output="sos"), raw)))
    e = int(np.argmax(onset_rows))
    np.testing.assert_allclose(y[e, k], _brute_force(env, ev.time[e], mt, idx, s.bin_centers), rtol=1e-4, atol=1e-3)


def test_several_trials_and_selection(tmp_path: Path) -> None:
    info = make_fake_braintreebank(tmp_path / "fake", seed=3, subjects=(3,), trials_per_subject=2, duration_s=24.0,
                                   n_electrodes=7)
    out = btb.prepare(info["root"], info["movies"], tmp_path / "two.h5", n_bins=9, frame_size=8)
    s = EventStore(out)
    ev = s.events("sub_3", "language")
    assert set(ev.trial) == {0, 1} and np.all(np.diff(ev.trial) >= 0)
    assert {(int(t), str(m)) for t, m in zip(ev.trial, ev.movie, strict=True)} == {(0, "fake-movie-0"),
                                                                                  (1, "fake-movie-1")}
    assert all(s.frame_keys[f].startswith(f"{m}@") for f, m in zip(ev.frame, ev.movie, strict=True))
    assert s.targets("sub_3", "language").shape == (len(ev), 5, 9)
    one = EventStore(btb.prepare(info["root"], info["movies"], tmp_path / "one.h5", trials=[1], n_bins=9,
                                 frame_size=8))
    assert set(one.events("sub_3", "language").trial) == {1}
    with pytest.raises(FileNotFoundError, match=r"sub_3_trial002\.h5: field '<file>'"):
        btb.prepare(info["root"], info["movies"], tmp_path / "x.h5", trials=[2])


# --------------------------------------------------------------------------------------------- errors
def test_missing_timings_file(fake: dict[str, Any], tmp_path: Path) -> None:
    root = _copy_root(fake, tmp_path)
    btb.timings_path(root, 1, 0).unlink()
    with pytest.raises(FileNotFoundError, match=r"sub_1_trial000_timings\.csv: field '<file>'"):
        btb.prepare(root, fake["movies"], tmp_path / "x.h5", subjects=[1])
    assert not (tmp_path / "x.h5").exists()


@pytest.mark.filterwarnings("ignore:.*have no localization")
def test_missing_timings_column(fake: dict[str, Any], tmp_path: Path) -> None:
    root = _copy_root(fake, tmp_path)
    p = btb.timings_path(root, 2, 0)
    pd.read_csv(p).drop(columns="movie_time").to_csv(p, index=False)
    with pytest.raises(ValueError, match=r"sub_2_trial000_timings\.csv: field 'movie_time': missing column"):
        btb.prepare(root, fake["movies"], tmp_path / "x.h5")


def test_missing_is_onset_column(fake: dict[str, Any], tmp_path: Path) -> None:
    root = _copy_root(fake, tmp_path)
    p = btb.features_path(root, MOVIE)
    pd.read_csv(p, index_col=0).drop(columns="is_onset").to_csv(p)
    with pytest.raises(ValueError, match=r"features\.csv: field 'is_onset': missing column"):
        btb.prepare(root, fake["movies"], tmp_path / "x.h5", subjects=[1])


def test_electrode_count_mismatch(fake: dict[str, Any], tmp_path: Path) -> None:
    root = _copy_root(fake, tmp_path)
    p = btb.labels_path(root, 1)
    p.write_text(json.dumps(json.loads(p.read_text())[:-1]))
    with pytest.raises(ValueError, match=r"sub_1_trial000\.h5: field 'data': 8 electrode datasets, but "
                                         r".*electrode_labels\.json lists 7 labels"):
        btb.prepare(root, fake["movies"], tmp_path / "x.h5", subjects=[1])


def test_unknown_movie(fake: dict[str, Any], tmp_path: Path) -> None:
    root = _copy_root(fake, tmp_path)
    p = btb.metadata_path(root, 2, 0)
    p.write_text(json.dumps({"title": "Nope", "filename": "nope.mp4"}))
    with pytest.raises(ValueError, match=r"sub_2_trial000_metadata\.json: field 'filename': movie 'nope\.mp4'.*"
                                         r"available: \['fake-movie-0'\]"):
        btb.prepare(root, fake["movies"], tmp_path / "x.h5")


def test_missing_frames(fake: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"fake-movie-0/frames\.csv: field '<file>'"):
        btb.prepare(fake["root"], tmp_path, tmp_path / "x.h5", subjects=[1])


def test_nan_in_raw_keeps_existing_store(fake: dict[str, Any], built: tuple[Path, list[str]], tmp_path: Path) -> None:
    root = _copy_root(fake, tmp_path)
    with h5py.File(btb.neural_path(root, 1, 0), "r+") as f:
        x = f["data/electrode_2"][()]
        x[5000:5010] = np.nan
        f["data/electrode_2"][...] = x
    out = tmp_path / "kept.h5"
    shutil.copy(built[0], out)
    before = out.read_bytes()
    with pytest.raises(ValueError, match=r"sub_1_trial000\.h5: field 'data/electrode_2': 10 non-finite"):
        btb.prepare(root, fake["movies"], out, subjects=[1])
    assert out.read_bytes() == before
    assert EventStore(out).subject_names == ["sub_1", "sub_2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["braintreebank", "kept.h5"]  # no temp left behind
