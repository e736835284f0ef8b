"""The neurovision *events* store: neural targets around stimulus events, the contract of the encoding stage.

Written once by ``neurovision prepare braintreebank|phantom_seeg`` through :class:`EventStoreWriter` (temp file
+ atomic rename) and read by :class:`EventStore`, which validates the schema on open and names the file and the
field on any mismatch. Layout (``EVENTS_SCHEMA_VERSION`` 2: every non-empty numeric dataset carries HDF5's
Fletcher32 checksum per chunk, verified on every read, as in :mod:`neurovision.data.store`)::

    /                         attrs: schema="neurovision.events", schema_version, source, converter_version,
                                     options (JSON), fingerprint, created, complete
    /bins                     attrs: centers (B,) seconds relative to the event, window (s), sampling_rate (Hz)
    /stimuli
      frames                  uint8 (F, H, W, 3)  movie frames referenced by events, one chunk per frame
      frame_keys              str (F,)            "<movie>@<seconds>" (unique)
      sentences               str (S,)            sentence text (unique)
    /subjects/<name>          attrs: index
      sites/electrode         str (N,)            electrode label
      sites/coords            float32 (N, 3)      electrode position in mm (attr ``space``, e.g. "LIP" or "MNI")
      sites/region            str (N,)            anatomical label ("" when unknown)
      events/<set>/time       float64 (E,)        event time in the movie (s)
      events/<set>/trial      int16 (E,)          the subject's trial (recording) index
      events/<set>/movie      str (E,)            movie name
      events/<set>/frame      int32 (E,)          row of /stimuli/frames
      events/<set>/sentence   int32 (E,)          row of /stimuli/sentences
      targets/<set>           float32 (E, N, B)   neural target of each event x site x time bin
    /annotations/<kind>       variable-length UTF-8 JSON per frame or sentence (e.g. the phantom's concepts)
    /extras/...               source-specific arrays (e.g. the phantom's planted site kinds)

``<set>`` is an event set: ``language`` (sentence/word onsets with the nearest following frame) or ``vision``
(scene cuts with the closest preceding sentence). Readers open the file lazily per process.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from neurovision.data.store import (
    CHECKSUM,
    AtomicH5Writer,
    StoreError,
    check_header,
    corrupt_problem,
    open_checked,
    plain,
    verify_rows,
)

EVENTS_SCHEMA = "neurovision.events"
#: 2: Fletcher32 checksums on every non-empty numeric dataset (version 1 files had none)
EVENTS_SCHEMA_VERSION = 2
EVENT_SETS: tuple[str, ...] = ("language", "vision")
_STR = h5py.string_dtype(encoding="utf-8")
_EVENT_FIELDS = {"time": "f", "trial": "i", "frame": "i", "sentence": "i"}


def _checked(data: np.ndarray) -> dict[str, Any]:
    """``create_dataset`` keywords adding the checksum to a non-empty array (HDF5 filters need chunks; an empty
    dataset has none to check)."""
    return dict(CHECKSUM) if np.asarray(data).size else {}


def default_bins(n_bins: int = 161, start: float = -2.0, stop: float = 2.0) -> np.ndarray:
    """Centres of ``n_bins`` evenly spaced time bins from ``start`` to ``stop`` s (161 bins = 25 ms steps)."""
    return np.linspace(start, stop, n_bins)


# --------------------------------------------------------------------------------------------- writing
class EventStoreWriter(AtomicH5Writer):
    """Write an events store atomically (use as a context manager; a failure leaves the target untouched)."""

    schema = EVENTS_SCHEMA
    schema_version = EVENTS_SCHEMA_VERSION

    def __init__(self, path: str | os.PathLike[str], **kwargs: Any) -> None:
        super().__init__(path, **kwargs)
        self._subjects: list[str] = []

    def set_bins(self, centers: np.ndarray, window: float, sampling_rate: float) -> None:
        g = self._f.require_group("bins")
        g.attrs["centers"] = np.asarray(centers, dtype=np.float64)
        g.attrs["window"] = float(window)
        g.attrs["sampling_rate"] = float(sampling_rate)

    def set_stimuli(self, frames: np.ndarray, frame_keys: Sequence[str], sentences: Sequence[str]) -> None:
        frames = np.asarray(frames)
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames: expected uint8 (F, H, W, 3), got {frames.dtype} {frames.shape}")
        if len(frame_keys) != len(frames):
            raise ValueError("frame_keys: need one unique key per frame")
        ds = self.create_stimuli(frame_keys, sentences, frames.shape[1:3])
        if len(frames):
            ds[...] = frames

    def create_stimuli(self, frame_keys: Sequence[str], sentences: Sequence[str],
                       frame_shape: Sequence[int]) -> h5py.Dataset:
        """Write the keys and sentences and return the empty (F, H, W, 3) frames dataset (one chunk per frame) to
        fill frame by frame (a whole movie's frames need not fit in memory)."""
        if len(set(frame_keys)) != len(frame_keys):
            raise ValueError("frame_keys: need one unique key per frame")
        g = self._f.require_group("stimuli")
        h, w = (int(x) for x in frame_shape)
        ds = g.create_dataset("frames", shape=(len(frame_keys), h, w, 3), dtype=np.uint8,
                              chunks=(1, h, w, 3) if len(frame_keys) else None,
                              **(CHECKSUM if len(frame_keys) else {}))
        g.create_dataset("frame_keys", data=np.array(list(frame_keys), dtype=object), dtype=_STR)
        g.create_dataset("sentences", data=np.array(list(sentences), dtype=object), dtype=_STR)
        return ds

    def add_subject(self, name: str, *, electrodes: Sequence[str], coords: np.ndarray,
                    regions: Sequence[str] | None = None, space: str = "LIP") -> None:
        coords = np.asarray(coords, dtype=np.float32)
        if coords.shape != (len(electrodes), 3):
            raise ValueError(f"subject {name}: coords shape {coords.shape}, expected ({len(electrodes)}, 3)")
        g = self._f.require_group("subjects").create_group(name)
        g.attrs["index"] = len(self._subjects)
        self._subjects.append(name)
        s = g.create_group("sites")
        s.create_dataset("electrode", data=np.array(list(electrodes), dtype=object), dtype=_STR)
        ds = s.create_dataset("coords", data=coords, **_checked(coords))
        ds.attrs["space"] = space
        regions = list(regions) if regions is not None else [""] * len(electrodes)
        s.create_dataset("region", data=np.array(regions, dtype=object), dtype=_STR)

    def add_events(self, subject: str, event_set: str, *, time: np.ndarray, trial: np.ndarray,
                   movie: Sequence[str], frame: np.ndarray, sentence: np.ndarray, targets: np.ndarray) -> None:
        """Events of one set for one subject with their targets (E, N sites, B bins)."""
        g = self._f["subjects"][subject]
        e = g.require_group("events").create_group(event_set)
        for name, values, dt in (("time", time, np.float64), ("trial", trial, np.int16), ("frame", frame, np.int32),
                                 ("sentence", sentence, np.int32)):
            arr = np.asarray(values, dtype=dt)
            e.create_dataset(name, data=arr, **_checked(arr))
        e.create_dataset("movie", data=np.array(list(movie), dtype=object), dtype=_STR)
        targets = np.asarray(targets, dtype=np.float32)
        g.require_group("targets").create_dataset(
            event_set, data=targets, chunks=(min(len(targets), 64) or 1, *targets.shape[1:]) if targets.size else None,
            **_checked(targets))

    def set_annotations(self, kind: str, per_item: Sequence[Any]) -> None:
        data = np.array([json.dumps(x) for x in per_item], dtype=object)
        self._f.require_group("annotations").create_dataset(kind, data=data, dtype=_STR)

    def set_extra(self, name: str, data: np.ndarray, **attrs: Any) -> None:
        data = np.asarray(data)
        ds = self._f.require_group("extras").create_dataset(name, data=data, **(_checked(data) if data.ndim else {}))
        for k, v in attrs.items():
            ds.attrs[k] = v

    def _finalise(self) -> None:
        f = self._f
        for required in ("bins", "stimuli", "subjects"):
            if required not in f:
                raise ValueError(f"events store incomplete: group '{required}' was never written")
        f["subjects"].attrs["names"] = json.dumps(self._subjects)


# --------------------------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class Events:
    """One subject's events of one set (arrays of length E)."""

    time: np.ndarray
    trial: np.ndarray
    movie: np.ndarray
    frame: np.ndarray
    sentence: np.ndarray

    def __len__(self) -> int:
        return len(self.time)


@dataclass(frozen=True)
class Sites:
    electrode: list[str]
    coords: np.ndarray
    region: list[str]
    space: str

    def __len__(self) -> int:
        return len(self.electrode)


class EventStore:
    """Validated read access to an events store; targets are read lazily (per process)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._h5: h5py.File | None = None
        self._pid: int | None = None
        with open_checked(self.path, "events store") as f:
            try:
                self._validate(f)
                self.attrs: dict[str, Any] = {k: plain(v) for k, v in f.attrs.items()}
                self.bin_centers = np.asarray(f["bins"].attrs["centers"], dtype=np.float64)
                self.bin_window = float(f["bins"].attrs["window"])
                self.subject_names: list[str] = json.loads(f["subjects"].attrs["names"])
                self.frame_keys = [_s(x) for x in f["stimuli/frame_keys"][:]]
                self.sentences = [_s(x) for x in f["stimuli/sentences"][:]]
                self.frame_shape = tuple(f["stimuli/frames"].shape[1:])
                self._sites: dict[str, Sites] = {}
                self._events: dict[tuple[str, str], Events] = {}
                for name in self.subject_names:
                    s = f["subjects"][name]["sites"]
                    self._sites[name] = Sites(
                        electrode=[_s(x) for x in s["electrode"][:]], coords=s["coords"][:],
                        region=[_s(x) for x in s["region"][:]], space=plain(s["coords"].attrs.get("space", "")))
                    for es in f["subjects"][name].get("events", {}):
                        e = f["subjects"][name]["events"][es]
                        self._events[(name, es)] = Events(
                            time=e["time"][:], trial=e["trial"][:], movie=np.array([_s(x) for x in e["movie"][:]]),
                            frame=e["frame"][:], sentence=e["sentence"][:])
                self.annotation_kinds = sorted(f["annotations"].keys()) if "annotations" in f else []
                self.extras = sorted(f["extras"].keys()) if "extras" in f else []
            except OSError as e:  # a small dataset (events, sites, keys) failing its checksum: name its rows
                for _name, ds in _small_datasets(f):
                    verify_rows(ds, self.path, "row", plain(f.attrs.get("source")))
                raise StoreError(self.path, "<file>", corrupt_problem("a chunk", plain(f.attrs.get("source")),
                                                                      self.path, e)) from None

    def _validate(self, f: h5py.File) -> None:
        def need(cond: bool, field: str, problem: str) -> None:
            if not cond:
                raise StoreError(self.path, field, problem)

        check_header(f, self.path, EVENTS_SCHEMA, EVENTS_SCHEMA_VERSION, "a neurovision events store")
        for path in ("bins", "stimuli/frames", "stimuli/frame_keys", "stimuli/sentences", "subjects"):
            need(path in f, path, "missing")
        for attr in ("centers", "window", "sampling_rate"):
            need(attr in f["bins"].attrs, f"bins.{attr}", "missing attribute")
        need("names" in f["subjects"].attrs, "subjects.names", "missing attribute")
        frames = f["stimuli/frames"]
        need(frames.dtype == np.uint8 and frames.ndim == 4, "stimuli/frames",
             f"dtype {frames.dtype} shape {frames.shape}, expected uint8 (F, H, W, 3)")
        need(len(f["stimuli/frame_keys"]) == len(frames), "stimuli/frame_keys", "length differs from stimuli/frames")
        need(frames.size == 0 or bool(frames.fletcher32), "stimuli/frames", "no per-chunk checksum (Fletcher32 "
             "filter): not written by this version of `neurovision prepare`; rebuild it")
        n_frames, n_sent = len(frames), len(f["stimuli/sentences"])
        n_bins = len(f["bins"].attrs["centers"])
        for name in json.loads(f["subjects"].attrs["names"]):
            base = f"subjects/{name}"
            need(base in f, base, "missing (named in subjects.names)")
            for k in ("electrode", "coords", "region"):
                need(f"{base}/sites/{k}" in f, f"{base}/sites/{k}", "missing")
            n_sites = len(f[f"{base}/sites/electrode"])
            need(f[f"{base}/sites/coords"].shape == (n_sites, 3), f"{base}/sites/coords",
                 f"shape {f[f'{base}/sites/coords'].shape}, expected ({n_sites}, 3)")
            for es in f[base].get("events", {}):
                e = f[f"{base}/events/{es}"]
                for k in (*_EVENT_FIELDS, "movie"):
                    need(k in e, f"{base}/events/{es}/{k}", "missing")
                n = len(e["time"])
                for k, kind in _EVENT_FIELDS.items():
                    need(e[k].shape == (n,), f"{base}/events/{es}/{k}", f"shape {e[k].shape}, expected ({n},)")
                    need(e[k].dtype.kind in ("f" if kind == "f" else "iu"), f"{base}/events/{es}/{k}",
                         f"dtype {e[k].dtype}")
                if n:
                    need(0 <= int(e["frame"][:].min()) and int(e["frame"][:].max()) < n_frames,
                         f"{base}/events/{es}/frame", f"values outside 0..{n_frames - 1}")
                    need(0 <= int(e["sentence"][:].min()) and int(e["sentence"][:].max()) < n_sent,
                         f"{base}/events/{es}/sentence", f"values outside 0..{n_sent - 1}")
                t = f"{base}/targets/{es}"
                need(t in f, t, "missing (events without targets)")
                need(f[t].shape == (n, n_sites, n_bins), t, f"shape {f[t].shape}, expected ({n}, {n_sites}, {n_bins})")
                need(f[t].dtype == np.float32, t, f"dtype {f[t].dtype}, expected float32")
                need(f[t].size == 0 or bool(f[t].fletcher32), t, "no per-chunk checksum (Fletcher32 filter): not "
                     "written by this version of `neurovision prepare`; rebuild it")

    @property
    def h5(self) -> h5py.File:
        if self._h5 is None or self._pid != os.getpid():
            self._h5 = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._h5

    def close(self) -> None:
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_h5"] = state["_pid"] = None
        return state

    # access -------------------------------------------------------------------------------------
    def event_sets(self, subject: str) -> list[str]:
        return sorted(es for (s, es) in self._events if s == subject)

    def events(self, subject: str, event_set: str) -> Events:
        self._check_subject(subject)
        if (subject, event_set) not in self._events:
            raise KeyError(f"{self.path}: subject {subject!r} has no event set {event_set!r} "
                           f"(has {self.event_sets(subject)})")
        return self._events[(subject, event_set)]

    def sites(self, subject: str) -> Sites:
        self._check_subject(subject)
        return self._sites[subject]

    def targets(self, subject: str, event_set: str) -> np.ndarray:
        """(E, N, B) float32 targets; checked for NaN/inf (names the field)."""
        self.events(subject, event_set)
        field = f"subjects/{subject}/targets/{event_set}"
        y = self._read(field, "event", lambda ds: ds[:])
        if not np.isfinite(y).all():
            raise StoreError(self.path, field, f"{int((~np.isfinite(y)).sum())} non-finite values")
        return y

    def frames(self, index: np.ndarray | Sequence[int] | None = None) -> np.ndarray:
        ds = self.h5["stimuli/frames"]
        if index is None:
            return self._read("stimuli/frames", "frame", lambda d: d[:])
        index = np.asarray(index)
        order = np.argsort(index)
        out = np.empty((len(index), *ds.shape[1:]), dtype=np.uint8)
        if len(index):
            uniq, inv = np.unique(index[order], return_inverse=True)
            out[order] = self._read("stimuli/frames", "frame", lambda d: d[uniq])[inv]
        return out

    def _read(self, field: str, unit: str, read: Any) -> np.ndarray:
        """``read(dataset)``; a chunk failing its checksum is one :class:`StoreError` naming the dataset and the
        first bad ``unit`` (row) index."""
        ds = self.h5[field]
        try:
            return read(ds)
        except OSError as e:
            verify_rows(ds, self.path, unit, self.attrs.get("source"))  # names the first bad rows
            raise StoreError(self.path, field, corrupt_problem("a chunk", self.attrs.get("source"), self.path, e)
                             ) from None

    def annotations(self, kind: str) -> list[Any]:
        if kind not in self.annotation_kinds:
            raise KeyError(f"{self.path}: no annotations of kind {kind!r} (has {self.annotation_kinds})")
        return [json.loads(_s(x)) for x in self.h5["annotations"][kind][:]]

    def extra(self, name: str) -> np.ndarray:
        if name not in self.extras:
            raise KeyError(f"{self.path}: no extra {name!r} (has {self.extras})")
        return self.h5["extras"][name][()]

    def _check_subject(self, subject: str) -> None:
        if subject not in self._sites:
            raise KeyError(f"{self.path}: no subject {subject!r} (has {self.subject_names})")


def _small_datasets(f: h5py.File) -> list[tuple[str, h5py.Dataset]]:
    """Every dataset but the targets and frames (what opening an events store reads)."""
    out: list[tuple[str, h5py.Dataset]] = []
    f.visititems(lambda name, obj: out.append((name, obj)) if isinstance(obj, h5py.Dataset)
                 and "/targets/" not in f"/{name}" and name != "stimuli/frames" else None)
    return out


def _s(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def existing_events_fingerprint(path: str | os.PathLike[str]) -> str | None:
    try:
        return EventStore(path).attrs["fingerprint"]
    except (StoreError, FileNotFoundError):
        return None


def verify_events(path: str | os.PathLike[str]) -> int:
    """Read every chunk of an events store through HDF5's checksum filter (``neurovision inspect --verify``): the
    number of events checked, or a :class:`StoreError` naming the dataset and the first bad event row (frame,
    row). See :func:`neurovision.data.store.verify`."""
    import h5py as _h5py

    store = EventStore(path)  # the cheap checks
    source = store.attrs.get("source")
    n_events = 0
    with open_checked(store.path, "events store") as f:
        datasets: list[tuple[str, _h5py.Dataset]] = []
        f.visititems(lambda name, obj: datasets.append((name, obj)) if isinstance(obj, _h5py.Dataset) else None)
        for name, ds in sorted(datasets, key=lambda x: ("/targets/" not in x[0], x[0])):  # targets first
            unit = "event" if "/targets/" in name or "/events/" in name else \
                "frame" if name == "stimuli/frames" else "row"
            verify_rows(ds, store.path, unit, source)
            if "/targets/" in name:
                n_events += ds.shape[0]
    return n_events
