"""The events store (schema, validation, atomic writes) and the SEEG phantom (planted kinds, determinism)."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from neurovision.cli import main as cli_main
from neurovision.data.events import EventStore, EventStoreWriter, default_bins
from neurovision.data.store import StoreError
from neurovision.sources import phantom_seeg


def _write(path: Path, targets: np.ndarray | None = None, frame: np.ndarray | None = None) -> Path:
    with EventStoreWriter(path, source="test", converter_version="t1", options={"a": 1}, fingerprint="fp") as w:
        w.set_bins(default_bins(5, -0.5, 0.5), 0.2, 2048)
        w.set_stimuli(np.zeros((3, 4, 4, 3), np.uint8), ["m@0", "m@1", "m@2"], ["one", "two"])
        w.add_subject("sub_1", electrodes=["A1", "A2"], coords=np.arange(6).reshape(2, 3), regions=["r1", ""])
        y = np.zeros((4, 2, 5), np.float32) if targets is None else targets
        w.add_events("sub_1", "language", time=np.arange(4.0), trial=np.zeros(4), movie=["m"] * 4,
                     frame=np.array([0, 1, 2, 0]) if frame is None else frame, sentence=np.array([0, 1, 1, 0]),
                     targets=y)
    return path


def test_roundtrip(tmp_path: Path) -> None:
    y = np.random.default_rng(0).normal(size=(4, 2, 5)).astype(np.float32)
    s = EventStore(_write(tmp_path / "e.h5", y))
    assert s.subject_names == ["sub_1"] and s.event_sets("sub_1") == ["language"]
    np.testing.assert_array_equal(s.targets("sub_1", "language"), y)
    ev = s.events("sub_1", "language")
    assert len(ev) == 4 and ev.movie.tolist() == ["m"] * 4 and ev.frame.tolist() == [0, 1, 2, 0]
    sites = s.sites("sub_1")
    assert sites.electrode == ["A1", "A2"] and sites.region == ["r1", ""] and sites.space == "LIP"
    np.testing.assert_array_equal(sites.coords, np.arange(6).reshape(2, 3))
    assert s.frames([2, 0, 2]).shape == (3, 4, 4, 3)
    np.testing.assert_allclose(s.bin_centers, [-0.5, -0.25, 0, 0.25, 0.5])
    with pytest.raises(KeyError, match="no event set 'vision'"):
        s.events("sub_1", "vision")
    with pytest.raises(KeyError, match="no subject 'sub_9'"):
        s.sites("sub_9")


def test_validation_names_the_field(tmp_path: Path) -> None:
    p = _write(tmp_path / "e.h5")
    with h5py.File(p, "a") as f:
        del f["subjects/sub_1/targets/language"]
        f["subjects/sub_1/targets"].create_dataset("language", data=np.zeros((4, 3, 5), np.float32))
    with pytest.raises(StoreError, match=r"subjects/sub_1/targets/language.*expected \(4, 2, 5\)"):
        EventStore(p)
    bad = _write(tmp_path / "f.h5", frame=np.array([0, 1, 7, 0]))
    with pytest.raises(StoreError, match="events/language/frame.*outside"):
        EventStore(bad)
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = 1
    with pytest.raises(StoreError, match="schema"):
        EventStore(foreign)
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5")
    with pytest.raises(StoreError, match="not a readable HDF5"):
        EventStore(junk)
    nan = _write(tmp_path / "n.h5", np.full((4, 2, 5), np.nan, np.float32))
    with pytest.raises(StoreError, match="targets/language.*non-finite"):
        EventStore(nan).targets("sub_1", "language")


def test_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    p = _write(tmp_path / "e.h5")
    before = p.read_bytes()
    with pytest.raises(ValueError, match="coords shape"):
        with EventStoreWriter(p, source="test", converter_version="t1", options={}) as w:
            w.set_bins(default_bins(5), 0.2, 2048)
            w.add_subject("s", electrodes=["a"], coords=np.zeros((2, 3)))
    assert p.read_bytes() == before
    assert [x.name for x in tmp_path.iterdir()] == ["e.h5"]


# ------------------------------------------------------------------------------------------ phantom
@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return phantom_seeg.prepare(tmp_path_factory.mktemp("seeg") / "seeg.h5", preset="tiny")


def test_phantom_structure(phantom: Path) -> None:
    s = EventStore(phantom)
    assert s.subject_names == ["sub_1", "sub_2"]
    assert len(s.bin_centers) == 161 and np.isclose(s.bin_centers[1] - s.bin_centers[0], 0.025)
    for sub in s.subject_names:
        kinds = phantom_seeg.site_truth(s, sub)
        assert {k: int((kinds == k).sum()) for k in phantom_seeg.SITE_KINDS} == {
            "null": 12, "vision": 4, "language": 4, "multimodal": 4}  # round(0.15 * 24) = 4 each
        for es in ("language", "vision"):
            ev = s.events(sub, es)
            assert len(ev) > 40 and np.all(np.diff(ev.time) > 0)
            assert s.targets(sub, es).shape == (len(ev), 24, 161)
        assert s.sites(sub).space == "MNI"
    # a language event's frame is the shot on screen at the onset; a vision event's sentence precedes the cut
    keys = s.frame_keys
    ev = s.events("sub_1", "language")
    shot_start = np.array([float(keys[f].split("@")[1]) for f in ev.frame])
    assert np.all(shot_start <= ev.time)
    ev = s.events("sub_1", "vision")
    np.testing.assert_allclose([float(keys[f].split("@")[1]) for f in ev.frame], ev.time, atol=1e-3)
    # the frame and sentence concepts are what the frames show and the sentences name
    concepts = np.array(s.annotations("sentence_concepts"))
    for i in range(5):
        named = [c for c, n in zip(phantom_seeg.scenes.CONCEPTS, concepts[i], strict=True) if n]
        assert all(c in s.sentences[i] or {"small": "little", "large": "big"}.get(c, c) in s.sentences[i]
                   for c in named)


def test_phantom_plants_its_kinds(phantom: Path) -> None:
    """At each site's planted latency, the target correlates with its own kind's feature read-out only."""
    s = EventStore(phantom)
    v_all = np.array(s.annotations("frame_concepts"))
    l_all = np.array(s.annotations("sentence_concepts"))
    ev = s.events("sub_1", "language")
    y = s.targets("sub_1", "language")
    kinds = phantom_seeg.site_truth(s, "sub_1")
    lat = s.extra("site_latency_sub_1")
    v, lang = v_all[ev.frame], l_all[ev.sentence]
    v, lang = v - v.mean(0), lang - lang.mean(0)
    feats = {"vision": v, "language": lang, "interaction": v * lang}

    def r2(x: np.ndarray, t: np.ndarray) -> float:  # in-sample R^2 of a least-squares fit
        x = np.c_[x, np.ones(len(x))]
        res = t - x @ np.linalg.lstsq(x, t, rcond=None)[0]
        return 1 - res.var() / t.var()

    for i, kind in enumerate(kinds):
        t = y[:, i, int(np.argmin(np.abs(s.bin_centers - lat[i])))]
        fit = {k: r2(f, t) for k, f in feats.items()}
        both = r2(np.c_[v, lang], t)
        gain = r2(np.c_[v, lang, v * lang], t) - both  # what the interaction adds to vision + language
        if kind == "null":
            assert max(fit.values()) < 0.25, fit
        elif kind in ("vision", "language"):
            other = "language" if kind == "vision" else "vision"
            assert fit[kind] > 0.2 and fit[kind] > fit[other] and gain < 0.08, (kind, fit, gain)
        else:
            assert gain > 0.15, (fit, gain)


def test_phantom_cli_is_deterministic_and_idempotent(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["prepare", "phantom_seeg", "--preset", "tiny", "--n_electrodes", "8", "--movie_minutes", "1.5"]
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    assert cli_main([*args, "--out", str(a)]) == 0
    mtime = os.stat(a).st_mtime_ns
    assert cli_main([*args, "--out", str(a)]) == 0
    assert "up to date" in capsys.readouterr().out and os.stat(a).st_mtime_ns == mtime
    assert cli_main([*args, "--out", str(b), "--null_phantom", "true"]) == 0
    sa, sb = EventStore(a), EventStore(b)
    assert all((phantom_seeg.site_truth(sb, s) == "null").all() for s in sb.subject_names)
    assert not all((phantom_seeg.site_truth(sa, s) == "null").all() for s in sa.subject_names)
    c = phantom_seeg.prepare(tmp_path / "c.h5", preset="tiny", n_electrodes=8, movie_minutes=1.5)
    np.testing.assert_array_equal(EventStore(c).targets("sub_2", "vision"), sa.targets("sub_2", "vision"))
    assert cli_main([*args, "--out", str(tmp_path / "d.h5"), "--vision_fraction", "0.9"]) == 2
    assert "fractions" in capsys.readouterr().err
