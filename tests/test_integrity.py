"""Data integrity (issue 19 §1): per-chunk checksums in every bulk dataset, found on read and by ``verify``; stale
stores rebuilt by ``prepare``; killed runs' temp files removed; a full disk is one line and no temp file.

Every damage here is done to a real file written by the code: a byte flipped inside one chunk, found with h5py's
``get_chunk_info_by_coord``.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from neurovision.data.atomic import remove_stale_partials
from neurovision.data.events import EventStore, EventStoreWriter, default_bins
from neurovision.data.preprocessing import active_patch_index
from neurovision.data.store import (
    DiskFullError,
    Store,
    StoreError,
    StoreWriter,
    verify,
)
from neurovision.pretrained.teachers import CACHE_SCHEMA_VERSION, TeacherCache, VAETeacher
from neurovision.sources import phantom, up_to_date

GRID, P = (10, 12, 9), 4


# --------------------------------------------------------------------------------------------- helpers
def _write_store(path: Path, n_trials: int = 12, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    union = np.zeros(GRID, np.uint8)
    union[1:6, 2:9, 1:5] = 1
    active = active_patch_index(union, P)
    with StoreWriter(path, source="handmade", converter_version="t", options={}, fingerprint="fp") as w:
        w.set_grid(GRID, P, active, union)
        w.set_stimuli(rng.integers(0, 256, (5, 8, 10, 3), dtype=np.uint8))
        w.add_subject("sub-a", affine=np.eye(4), grid_affine=np.eye(4), original_shape=GRID, roi=union)
        w.append_trials(subject=0, stimulus=np.arange(n_trials, dtype=np.int32) % 5,
                        repeat=(np.arange(n_trials) // 5).astype(np.int16), session=np.ones(n_trials, np.int16),
                        split=np.zeros(n_trials, np.uint8),
                        patches=rng.normal(0, 1, (n_trials, len(active), P**3)).astype(np.float32))
    return path


def flip_byte(path: Path, dataset: str, chunk: tuple[int, ...], offset: int = 37) -> None:
    """Flip one bit of the byte ``offset`` bytes into the chunk of ``dataset`` that holds element ``chunk``."""
    with h5py.File(path, "r") as f:
        info = f[dataset].id.get_chunk_info_by_coord(chunk)
        assert offset < info.size
        where = info.byte_offset + offset
    with open(path, "r+b") as fh:
        fh.seek(where)
        b = fh.read(1)[0]
        fh.seek(where)
        fh.write(bytes([b ^ 0x04]))


def _one_line(e: BaseException) -> str:
    text = str(e)
    assert "\n" not in text, text
    return text


# --------------------------------------------------------------------------------------------- store
def test_flipped_patch_byte_stops_the_read_naming_the_trial(tmp_path: Path) -> None:
    path = _write_store(tmp_path / "s.h5")
    good = Store(path).patches(5).copy()
    flip_byte(path, "trials/patches", (5, 0, 0))
    s = Store(path)  # the cheap checks pass: a data byte is only found by reading its chunk
    np.testing.assert_array_equal(s.patches(4), Store(path).patches(4))
    with pytest.raises(StoreError) as e:
        s.patches(5)
    msg = _one_line(e.value)
    assert str(path) in msg and "trials/patches" in msg and "trial 5 " in msg and "checksum" in msg
    assert "neurovision prepare handmade" in msg  # how to rebuild it
    unverified = Store(path)
    unverified.verify_checksums = False  # the read before checksums (benchmarks only) returns the damage
    assert not np.array_equal(unverified.patches(5), good)


def test_flipped_image_and_index_bytes_are_named(tmp_path: Path) -> None:
    path = _write_store(tmp_path / "s.h5")
    flip_byte(path, "stimuli/images", (3, 0, 0, 0))
    with pytest.raises(StoreError) as e:
        Store(path).image(3)
    assert "stimuli/images" in _one_line(e.value) and "stimulus 3 " in str(e.value)
    np.testing.assert_array_equal(Store(path).images(slice(0, 3)), Store(path).images([0, 1, 2]))
    with pytest.raises(StoreError, match="stimulus 3 "):  # batches (the teacher cache fill) name it too
        Store(path).images(slice(1, 5))
    with pytest.raises(StoreError, match="stimulus 3 "):
        TeacherCache(progress=False).get(path, MeanTeacher())
    path2 = _write_store(tmp_path / "t.h5")
    flip_byte(path2, "trials/stimulus", (0,), offset=4)
    with pytest.raises(StoreError) as e:  # the index arrays are read on open: a cheap check catches them
        Store(path2)
    assert "trials/stimulus" in _one_line(e.value) and "rows 0..11 fail their checksum" in str(e.value)


def test_verify_names_the_first_bad_trial(tmp_path: Path) -> None:
    path = _write_store(tmp_path / "s.h5")
    assert verify(path) == 12
    flip_byte(path, "trials/patches", (9, 0, 0))
    flip_byte(path, "trials/patches", (3, 0, 0), offset=200)
    with pytest.raises(StoreError) as e:
        verify(path)
    assert e.value.field == "trials/patches" and "trial 3 " in _one_line(e.value)
    path2 = _write_store(tmp_path / "t.h5")
    flip_byte(path2, "stimuli/images", (2, 0, 0, 0))
    with pytest.raises(StoreError) as e:
        verify(path2)
    assert e.value.field == "stimuli/images" and "stimulus 2 " in str(e.value)


def test_inspect_verify_exits_1_naming_the_first_bad_trial(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from tests.helpers import run_cli

    path = _write_store(tmp_path / "s.h5")
    assert run_cli(["inspect", str(path), "--verify=true"]) == 0
    assert "12 trials" in capsys.readouterr().out
    flip_byte(path, "trials/patches", (5, 0, 0))
    assert run_cli(["inspect", str(path), "--verify=true"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0] and "trial 5 " in err[0]


class _Trials(torch.utils.data.Dataset):
    """What ``FMRITrials`` does per item, without importing Lightning (the test stays fast)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.store.patches(i)).float()


def test_dataloader_worker_error_is_one_line(tmp_path: Path) -> None:
    """A bad chunk read in a DataLoader worker reaches the main process as one StoreError line, not a traceback."""
    path = _write_store(tmp_path / "s.h5")
    flip_byte(path, "trials/patches", (6, 0, 0))
    loader = torch.utils.data.DataLoader(_Trials(Store(path)), batch_size=4, num_workers=1)
    with pytest.raises(StoreError) as e:
        for _ in loader:
            pass
    assert e.value.path == str(path) and e.value.field == "trials/patches"
    assert "trial 6 " in _one_line(e.value)
    again = pickle.loads(pickle.dumps(e.value))  # rebuilt from its message (multiprocessing, torch)
    assert str(again) == str(e.value)


def test_older_schema_version_says_how_to_rebuild(tmp_path: Path) -> None:
    path = _write_store(tmp_path / "s.h5")
    with h5py.File(path, "r+") as f:
        f.attrs["schema_version"] = 1
    with pytest.raises(StoreError) as e:
        Store(path)
    msg = _one_line(e.value)
    assert "older version" in msg and f"neurovision prepare handmade --out {path}" in msg


# --------------------------------------------------------------------------------------------- prepare
def _prepare(out: Path, **kw: object) -> Path:
    return phantom.prepare(out, preset="tiny", n_subjects=1, n_train=6, n_test=2, **kw)  # type: ignore[arg-type]


def test_prepare_rebuilds_an_older_version_store(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = _prepare(tmp_path / "p.h5")
    created = Store(out).attrs["created"]
    with h5py.File(out, "r+") as f:  # an older version's file (no checksums): stale, rebuilt without --force
        f.attrs["schema_version"] = 1
    capsys.readouterr()
    _prepare(out)
    printed = capsys.readouterr().out
    assert "stale, rebuilding" in printed and "older version" in printed
    assert Store(out).attrs["created"] != created and verify(out) == len(Store(out))


def test_up_to_date_is_the_cheap_checks(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """What ``prepare`` asks before it does anything: truncated or foreign files are stale; a flipped data byte is
    NOT found by the cheap checks (finding it reads the whole file): ``verify`` and the first read of the trial
    find it, and ``--force`` rebuilds it."""
    out = _write_store(tmp_path / "s.h5")
    assert up_to_date(out, "fp", False) and not up_to_date(out, "other", False) and not up_to_date(out, "fp", True)
    flip_byte(out, "trials/patches", (2, 0, 0))
    assert up_to_date(out, "fp", False)
    with pytest.raises(StoreError, match="trial 2 "):
        verify(out)
    with open(out, "r+b") as fh:  # truncated: stale
        fh.truncate(out.stat().st_size // 2)
    capsys.readouterr()
    assert not up_to_date(out, "fp", False)
    assert "stale, rebuilding" in capsys.readouterr().out
    (tmp_path / "foreign.h5").write_bytes(b"not hdf5" * 100)
    assert not up_to_date(tmp_path / "foreign.h5", "fp", False)
    assert "stale, rebuilding" in capsys.readouterr().out


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_partials_of_killed_runs_are_removed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "p.h5"
    host = socket.gethostname()
    dead = tmp_path / f".p.h5.{host}-{_dead_pid()}.abc123.partial"
    live = tmp_path / f".p.h5.{host}-{os.getppid()}.def456.partial"  # a running process: a live writer
    other = tmp_path / f".q.h5.{host}-{_dead_pid()}.zzz.partial"  # another output's
    for p in (dead, live, other):
        p.write_bytes(b"x" * 100)
    assert remove_stale_partials(out) == [dead]
    assert live.exists() and other.exists() and not dead.exists()
    dead2 = tmp_path / f".p.h5.{host}-{_dead_pid()}.k.partial"
    dead2.write_bytes(b"")
    assert not up_to_date(out, "fp", False)
    assert "left by a killed run" in capsys.readouterr().out and not dead2.exists()


def test_disk_full_is_one_line_and_removes_the_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = h5py.Dataset.__setitem__
    calls = {"n": 0}

    def full(self: h5py.Dataset, key: object, value: object) -> None:
        calls["n"] += 1
        if self.name == "/trials/patches" and calls["n"] > 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, key, value)

    monkeypatch.setattr(h5py.Dataset, "__setitem__", full)
    out = tmp_path / "s.h5"
    with pytest.raises(DiskFullError) as e:
        _write_store(out)
    assert _one_line(e.value) == f"no space left on device writing {out}" and e.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []  # no temp file, no target


@pytest.mark.slow
def test_disk_full_on_a_real_small_filesystem(tmp_path: Path) -> None:
    """``neurovision prepare`` on a 300 KB tmpfs (a private mount namespace): one line, no temp file, no crash."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = (f"mount -t tmpfs -o size=300k tmpfs {mnt} || exit 77; "
              f"{sys.executable} -m neurovision.cli prepare phantom --out {mnt}/s.h5 2>{tmp_path}/err; "
              f"echo $? > {tmp_path}/rc; ls -A {mnt} > {tmp_path}/ls")
    r = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
                       capture_output=True, text=True, timeout=120)
    if r.returncode == 77 or not (tmp_path / "rc").exists():
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()[:200]}")
    err = (tmp_path / "err").read_text()
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip() and "trial/s" not in ln
             and "trials:" not in ln]
    assert int((tmp_path / "rc").read_text()) in (1, 2), err[-2000:]
    assert len(lines) == 1 and "no space left on device" in lines[0] and "s.h5" in lines[0], err[-2000:]
    assert (tmp_path / "ls").read_text().strip() == ""  # no .partial left behind


# --------------------------------------------------------------------------------------------- caches
class MeanTeacher:
    """A cheap teacher: per-image channel means, 24 values per image; counts its calls."""

    id = "test:mean"
    output_shape = (24,)
    batch_size = 2

    def __init__(self) -> None:
        self.calls = 0

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return images.float().mean((2, 3)).repeat(1, 8)


def test_flipped_teacher_cache_byte_is_detected_and_recomputed(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                                               ) -> None:
    path = _write_store(tmp_path / "s.h5")
    t = MeanTeacher()
    good = TeacherCache(progress=False).get(path, t)
    cache = TeacherCache.default_path(path)
    with h5py.File(cache, "r") as f:
        (name,) = list(f["entries"])
        assert f["entries"][name].fletcher32 and f.attrs["schema_version"] == CACHE_SCHEMA_VERSION
    flip_byte(cache, f"entries/{name}", (0, 0), offset=13)
    calls = t.calls
    with caplog.at_level(logging.WARNING, logger="neurovision.teachers"):
        again = TeacherCache(progress=False).get(path, t)
    assert t.calls > calls  # recomputed, not the damaged values
    np.testing.assert_array_equal(again, good)
    warned = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(warned) == 1 and "rows 0.." in warned[0] and str(cache) in warned[0]


def test_older_teacher_cache_is_rebuilt_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _write_store(tmp_path / "s.h5")
    t = MeanTeacher()
    TeacherCache(progress=False).get(path, t)
    cache = TeacherCache.default_path(path)
    with h5py.File(cache, "r+") as f:
        f.attrs["schema_version"] = 1
    calls = t.calls
    with caplog.at_level(logging.WARNING, logger="neurovision.teachers"):
        TeacherCache(progress=False).get(path, t)
    assert t.calls > calls
    assert sum("rebuilt" in r.getMessage() for r in caplog.records) == 1
    with h5py.File(cache, "r") as f:
        assert f.attrs["schema_version"] == CACHE_SCHEMA_VERSION


def test_vae_path_not_found_even_when_a_config_is_set(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        VAETeacher(path=str(tmp_path / "nope"), config="tiny")


# --------------------------------------------------------------------------------------------- events store
def _write_events(path: Path) -> Path:
    with EventStoreWriter(path, source="phantom_seeg", converter_version="t", options={}, fingerprint="fp") as w:
        w.set_bins(default_bins(5, -0.5, 0.5), 0.2, 2048)
        w.set_stimuli(np.zeros((3, 4, 4, 3), np.uint8), ["m@0", "m@1", "m@2"], ["one", "two"])
        w.add_subject("sub_1", electrodes=["A1", "A2"], coords=np.arange(6).reshape(2, 3))
        w.add_events("sub_1", "language", time=np.arange(130.0), trial=np.zeros(130), movie=["m"] * 130,
                     frame=np.arange(130) % 3, sentence=np.arange(130) % 2,
                     targets=np.random.default_rng(0).normal(size=(130, 2, 5)).astype(np.float32))
        w.set_annotations("frame_concepts", [[0.1, 0.2, 0.3]] * 3)
        w.set_annotations("sentence_concepts", [[1.0, 0.0, 1.0], [0.0, 1.0, 0.5]])
    return path


def test_flipped_events_target_byte_names_the_events(tmp_path: Path) -> None:
    path = _write_events(tmp_path / "e.h5")
    assert verify(path) == 130
    flip_byte(path, "subjects/sub_1/targets/language", (70, 0, 0))
    es = EventStore(path)  # cheap checks pass
    with pytest.raises(StoreError) as e:
        es.targets("sub_1", "language")
    msg = _one_line(e.value)
    assert e.value.field == "subjects/sub_1/targets/language" and "events 64..127" in msg
    with pytest.raises(StoreError, match="events 64..127"):
        verify(path)


def test_prepare_treats_an_older_events_store_as_stale(tmp_path: Path) -> None:
    path = _write_events(tmp_path / "e.h5")
    with h5py.File(path, "r+") as f:
        f.attrs["schema_version"] = 1
    with pytest.raises(StoreError, match="older version.*neurovision prepare phantom_seeg"):
        EventStore(path)
    assert not up_to_date(path, "fp", False)


def test_store_error_survives_a_worker_traceback() -> None:
    text = ("Caught StoreError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
            '  File "x.py", line 1, in f\n    raise StoreError(...)\n'
            "neurovision.data.store.StoreError: /d/s.h5: field 'trials/patches': trial 7 fails its checksum: x\n")
    e = StoreError(text)
    assert (e.path, e.field, e.problem) == ("/d/s.h5", "trials/patches", "trial 7 fails its checksum: x")
    assert json.dumps(str(e)).count("\\n") == 0


def counted_feature_cache(tmp_path: Path, batch_size: int) -> tuple[type, Path, Path, dict, np.ndarray]:
    """An events store and a feature cache filled once by the phantom's language oracle, whose class counts its
    ``extract`` calls: (oracle class, store, cache, ``extract_features`` keywords, the cached features)."""
    from neurovision.encoding.features import extract_features
    from neurovision.pretrained.feature_networks import PhantomOracle

    class Counting(PhantomOracle):
        calls = 0

        def extract(self, batch: dict) -> dict:
            Counting.calls += 1
            return super().extract(batch)

    store = _write_events(tmp_path / "e.h5")
    cache = tmp_path / "features.h5"
    kw: dict = dict(batch_size=batch_size, accelerator="cpu", progress=False)
    good = extract_features(store, Counting("language"), cache, **kw)["concepts"]
    return Counting, store, cache, kw, good


def test_flipped_feature_cache_byte_is_detected_and_recomputed(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                                               ) -> None:
    from neurovision.encoding.features import cache_entries, extract_features

    Counting, store, cache, kw, good = counted_feature_cache(tmp_path, batch_size=1)
    (entry,) = [e["name"] for e in cache_entries(cache)]
    flip_byte(cache, f"entries/{entry}/layers/concepts", (0, 0), offset=5)
    calls = Counting.calls
    with caplog.at_level(logging.WARNING, logger="neurovision.encoding.features"):
        again = extract_features(store, Counting("language"), cache, **kw)["concepts"]
    assert Counting.calls > calls  # recomputed, not the damaged values
    np.testing.assert_array_equal(again, good)
    assert any("'concepts'" in r.getMessage() and "fail their checksum" in r.getMessage() for r in caplog.records)
