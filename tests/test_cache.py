"""The one HDF5 entry cache (neurovision/data/cache.py) behind the teacher targets and the network features."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from test_integrity import MeanTeacher, _write_store, flip_byte

from neurovision.data import cache as cache_mod
from neurovision.data.cache import (
    EntryCache,
    checksum_problem,
    copy_checked,
    entry_problem,
    finish_entry,
    format_floats,
    json_digest,
    start_entry,
    store_key,
)
from neurovision.data.store import Store
from neurovision.pretrained.teachers import CACHE_SCHEMA, CACHE_SCHEMA_VERSION, TeacherCache

LOG = logging.getLogger("tests.cache")


def _cache(path: Path) -> EntryCache:
    return EntryCache(path, "test.entries", 3, kind="test cache", id_attr="thing", logger=LOG)


def _add(entries: h5py.Group, name: str, data: np.ndarray, *, fp: str = "fp", chunk: int = 2, **attrs: Any
         ) -> h5py.Dataset:
    ds = start_entry(entries.create_dataset(name, data=data, chunks=(chunk, *data.shape[1:]), fletcher32=True),
                     thing=name, store_fingerprint=fp)
    finish_entry(ds, **attrs)
    return ds


def _data(n: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3)).astype(np.float32)


def _read(c: EntryCache, name: str, **kw: Any) -> np.ndarray | None:
    return c.read(name, lambda ds: ds[()], **kw)


# --------------------------------------------------------------------------------------------- the file
def test_rewrite_keeps_the_other_entries_and_read_returns_them(tmp_path: Path) -> None:
    c = _cache(tmp_path / "sub" / "c.h5")
    assert _read(c, "a") is None and c.entries() == []  # no file yet
    with c.locked(), c.rewrite(attrs={"store": "s.h5"}) as entries:
        _add(entries, "a", _data(seed=1))
    assert (tmp_path / "sub" / "c.h5.lock").exists()
    with c.locked(), c.rewrite(replace={"b"}) as entries:
        _add(entries, "b", _data(seed=2))
    np.testing.assert_array_equal(_read(c, "a"), _data(seed=1))  # survived the rewrite
    np.testing.assert_array_equal(_read(c, "b"), _data(seed=2))
    assert _read(c, "nope") is None
    listed = {e["name"]: e for e in c.entries(lambda ds: {"shape": ds.shape})}
    assert set(listed) == {"a", "b"} and listed["a"]["thing"] == "a" and listed["a"]["shape"] == (10, 3)
    assert listed["a"]["complete"] is True and listed["a"]["created"]
    with h5py.File(c.path, "r") as f:
        assert f.attrs["schema"] == "test.entries" and f.attrs["schema_version"] == 3
        assert "store" not in f.attrs  # the root attributes of each write are its own
    with c.locked(), c.rewrite(replace={"a"}) as entries:  # replace drops the old entry of that name
        pass
    assert _read(c, "a") is None and _read(c, "b") is not None


def test_another_schema_version_is_not_read_and_is_rebuilt(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                                           ) -> None:
    c = _cache(tmp_path / "c.h5")
    with c.rewrite() as entries:
        _add(entries, "a", _data())
    with h5py.File(c.path, "r+") as f:
        f.attrs["schema_version"] = 2  # an older neurovision wrote it
    with caplog.at_level(logging.WARNING, logger="tests.cache"):
        assert _read(c, "a") is None
        assert _read(c, "a", quiet=True) is None
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and "schema version 3" in msgs[0] and "rebuilt" in msgs[0] and str(c.path) in msgs[0]
    with c.rewrite() as entries:  # the next write starts a new file: the old version's entries are not carried
        _add(entries, "b", _data())
    assert [e["name"] for e in c.entries()] == ["b"]
    with h5py.File(c.path, "r") as f:
        assert f.attrs["schema_version"] == 3
    other = EntryCache(c.path, "another.schema", 3, kind="x", id_attr="thing", logger=LOG)
    assert _read(other, "b", quiet=True) is None  # another schema, same version: not read either


def test_unreadable_file_is_rebuilt(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    c = _cache(tmp_path / "c.h5")
    c.path.write_bytes(b"not an hdf5 file")
    with caplog.at_level(logging.WARNING, logger="tests.cache"):
        assert _read(c, "a") is None
        with c.rewrite() as entries:
            _add(entries, "a", _data())
    assert any("unreadable test cache" in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(_read(c, "a"), _data())


def test_a_failed_write_leaves_the_cache_untouched(tmp_path: Path) -> None:
    c = _cache(tmp_path / "c.h5")
    with c.rewrite() as entries:
        _add(entries, "a", _data())
    before = c.path.read_bytes()
    with pytest.raises(RuntimeError, match="boom"), c.rewrite() as entries:
        entries.create_dataset("b", data=_data())
        raise RuntimeError("boom")
    assert c.path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.h5"]  # no temp file left


def test_rewrite_drops_incomplete_unchecksummed_and_pruned_entries(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    c = _cache(tmp_path / "c.h5")
    with c.rewrite() as entries:
        _add(entries, "keep", _data())
        _add(entries, "old", _data(), fp="an older store")
        start_entry(entries.create_dataset("half", data=_data(), chunks=(2, 3), fletcher32=True))
        finish_entry(entries.create_dataset("plain", data=_data(), chunks=(2, 3)), thing="plain")
    with caplog.at_level(logging.INFO, logger="tests.cache"), \
            c.rewrite(prune=lambda a: None if a["store_fingerprint"] == "fp" else "another fingerprint"):
        pass
    assert [e["name"] for e in c.entries()] == ["keep"]
    assert any("pruning old (another fingerprint)" in r.getMessage() for r in caplog.records)


def test_a_damaged_entry_is_dropped_not_copied(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    c = _cache(tmp_path / "c.h5")
    with c.rewrite() as entries:
        _add(entries, "good", _data(seed=1))
        g = start_entry(entries.create_group("group"), thing="group", store_fingerprint="fp")
        g.create_dataset("index", data=np.arange(10), fletcher32=True, chunks=(5,))
        layer = g.create_group("layers").create_dataset("x", data=_data(seed=2), chunks=(2, 3), fletcher32=True)
        layer.attrs["layer"] = "x"
        finish_entry(g)
    flip_byte(c.path, "entries/group/layers/x", (6, 0), offset=5)
    with caplog.at_level(logging.WARNING, logger="tests.cache"), c.rewrite() as entries:
        assert sorted(entries) == ["good"]  # the partial copy of the damaged entry is gone
    warned = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(warned) == 1 and "group" in warned[0] and "x: rows 6..7 fail their checksum" in warned[0]
    np.testing.assert_array_equal(_read(c, "good"), _data(seed=1))


def test_copy_reads_each_chunk_once_and_keeps_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The copy verifies and copies in one pass: every row of the old entry is read once through the checksum
    filter, no raw HDF5 copy (which would need a verifying read first), and the new entry keeps chunks, filters and
    attributes."""
    src_path, dst_path = tmp_path / "a.h5", tmp_path / "b.h5"
    with h5py.File(src_path, "w") as f:
        g = start_entry(f.create_group("e"), thing="e")
        ds = g.create_dataset("x", data=_data(n=100), chunks=(4, 3), fletcher32=True, compression="gzip")
        ds.attrs["unit"] = "a.u."
        g.create_dataset("s", data=np.float64(3.5))
        finish_entry(g)
    reads: list[tuple[int, int]] = []
    getitem = h5py.Dataset.__getitem__

    def spy(self: h5py.Dataset, key: Any) -> Any:
        if self.name == "/e/x":
            assert isinstance(key, slice)
            reads.append((key.start, key.stop))
        return getitem(self, key)

    def no_raw_copy(*a: Any, **k: Any) -> None:
        raise AssertionError("raw HDF5 copy")

    monkeypatch.setattr(h5py.Dataset, "__getitem__", spy)
    monkeypatch.setattr(h5py.Group, "copy", no_raw_copy)
    monkeypatch.setattr(cache_mod, "COPY_BYTES", 8 * 12)  # 8 rows of 12 bytes: blocks of 2 chunks
    with h5py.File(src_path, "r") as f, h5py.File(dst_path, "w") as out:
        assert copy_checked(f["e"], out, "e") == ""
    assert reads == [(r, min(r + 8, 100)) for r in range(0, 100, 8)]  # every row once, in blocks of whole chunks
    monkeypatch.undo()
    with h5py.File(dst_path, "r") as f:
        x = f["e/x"]
        np.testing.assert_array_equal(x[()], _data(n=100))
        assert x.chunks == (4, 3) and x.fletcher32 and x.compression == "gzip" and x.attrs["unit"] == "a.u."
        assert f["e/s"][()] == 3.5 and f["e"].attrs["complete"] and f["e"].attrs["thing"] == "e"


# --------------------------------------------------------------------------------------------- entries, keys
def test_entry_problem_and_checksum_problem(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "x.h5", "w") as f:
        ds = start_entry(f.create_dataset("a", data=_data(), chunks=(2, 3), fletcher32=True), thing="t",
                         store_fingerprint="fp")
        kw = dict(id_attr="thing", id_value="t", fingerprint="fp")
        assert entry_problem(ds, **kw) == "incomplete"
        finish_entry(ds)
        assert entry_problem(ds, **kw) is None
        assert entry_problem(ds, **{**kw, "id_value": "u"}) == "thing 't' != 'u'"
        assert "another version of the store" in entry_problem(ds, **{**kw, "fingerprint": "fp2"})
        assert checksum_problem(ds) is None
        assert checksum_problem(f.create_dataset("b", data=_data())) == "no per-chunk checksum"
        assert checksum_problem(f.create_dataset("c", shape=(0, 3), dtype=np.float32)) is None  # nothing to check


def test_keys(tmp_path: Path) -> None:
    assert json_digest({"b": 1, "a": [1, 2]}) == json_digest({"a": [1, 2], "b": 1})
    assert json_digest({"a": 1}) != json_digest({"a": 2})
    assert format_floats([0.48145466, 0.4578275, 1]) == "(0.4815,0.4578,1)"
    store = Store(_write_store(tmp_path / "s.h5"))
    assert store_key(store) == "fp"

    class Bare:
        attrs: dict[str, Any] = {}
        path = tmp_path / "s.h5"

    st = Bare.path.stat()
    assert store_key(Bare()) == f"file:{st.st_size}:{st.st_mtime_ns}"


# --------------------------------------------------------------------------------------------- on-disk formats
def test_a_teacher_cache_of_the_documented_layout_is_read_as_is(tmp_path: Path) -> None:
    """The teacher cache layout did not change with the shared implementation: a file written by hand after the
    layout in neurovision/pretrained/teachers.py is read without encoding anything."""
    path = _write_store(tmp_path / "s.h5")
    t = MeanTeacher()
    want = np.arange(5 * 24, dtype=np.float32).reshape(5, 24)
    name = hashlib.sha256(f"{t.id}|float32".encode()).hexdigest()[:32]
    with h5py.File(TeacherCache.default_path(path), "w") as f:
        f.attrs["schema"], f.attrs["schema_version"], f.attrs["store"] = CACHE_SCHEMA, CACHE_SCHEMA_VERSION, str(path)
        ds = f.create_group("entries").create_dataset(name, data=want, chunks=(2, 24), fletcher32=True)
        ds.attrs.update(teacher_id=t.id, store_fingerprint="fp", n_stimuli=5, image_shape=np.array([8, 10, 3]),
                        complete=True, created="2026-01-01T00:00:00+00:00")
    np.testing.assert_array_equal(TeacherCache(progress=False).get(path, t), want)
    assert t.calls == 0


def test_a_feature_cache_of_an_older_version_is_rebuilt(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from test_integrity import counted_feature_cache

    from neurovision.encoding.features import FEATURES_SCHEMA_VERSION, extract_features

    Counting, store, cache, kw, good = counted_feature_cache(tmp_path, batch_size=8)
    with h5py.File(cache, "r+") as f:
        f.attrs["schema_version"] = 1
    calls = Counting.calls
    with caplog.at_level(logging.WARNING, logger="neurovision.encoding.features"):
        again = extract_features(store, Counting("language"), cache, **kw)["concepts"]
    assert Counting.calls > calls
    np.testing.assert_array_equal(again, good)
    assert sum("rebuilt" in r.getMessage() for r in caplog.records) == 1
    with h5py.File(cache, "r") as f:
        assert f.attrs["schema_version"] == FEATURES_SCHEMA_VERSION
