"""The neurovision HDF5 store: the one contract every stage reads.

One file per dataset, written once by ``neurovision prepare <source>`` through :class:`StoreWriter`
(temp file + atomic rename) and read by :class:`Store`, which validates the schema on open and names the
offending file and field on any mismatch. Layout (``SCHEMA_VERSION`` 2)::

    /                       attrs: schema="neurovision.store", schema_version, source, converter_version,
                                   options (JSON), fingerprint, created, complete
    /grid                   attrs: shape (3,), padded_shape (3,), patch_size
      active_index          int64 (A,)    flat index of each active patch in the padded patch grid (C order)
      active_coords         int32 (A, 3)  patch-grid coordinates of each active patch
      union_mask            uint8 grid    union of all subjects' ROI masks on the common grid
    /subjects/<name>        attrs: index, original_shape (3,), affine (4,4) subject voxel -> world (mm),
                                   grid_affine (4,4) common-grid voxel -> world for this subject
      roi                   uint8 original_shape   the subject's ROI in its own space
    /trials
      subject               int16 (T,)   index into the subject list (attr ``names``)
      stimulus              int32 (T,)   row of /stimuli
      repeat                int16 (T,)   0-based repeat of this stimulus for this subject
      session               int16 (T,)
      split                 uint8 (T,)   0 train, 1 val, 2 test (attr ``names``)
      patches               float16 (T, A, P**3)  active patches, one chunk per trial, uncompressed
    /stimuli
      images                uint8 (S, H, W, 3), one chunk per image
      ids                   int64 (S,)   the source's own stimulus id (e.g. NSD 73k index)
    /annotations/<kind>     variable-length UTF-8 JSON, one entry per stimulus (captions, concepts, ...)
    /extras/...             source-specific arrays (e.g. the phantom's planted concept maps)

Readers open the file lazily per process (a forked DataLoader worker reopens its own handle).

Integrity (schema version 2): every numeric dataset is chunked with HDF5's Fletcher32 filter, so each chunk (one
trial's patches, one image, ...) carries a checksum that HDF5 verifies when it reads the chunk; a flipped bit in a
finished file is an error naming the file, the dataset and the trial, never silently wrong data. Variable-length
string datasets (``/annotations``) cannot carry HDF5 filters and are not checksummed. Two levels of checking:

- *cheap* checks, on every open (:class:`Store`, and ``prepare``'s "is it up to date?"): the file opens, the header
  (schema, version, ``complete``) is valid, the datasets are there with the right shapes and the checksum filter;
  a file that fails them (truncated, foreign, unfinished, older version) is rebuilt by the next ``prepare``;
- the *full* check, :func:`verify` (``neurovision inspect --verify``): every chunk is read and its checksum
  verified. A flipped data byte passes the cheap checks (finding it means reading the whole file); it is caught by
  :func:`verify` or by the first read of its chunk (a training run stops with one line naming the trial).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
import json
import os
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from neurovision.data.atomic import atomic_path, remove_stale_partials

SCHEMA = "neurovision.store"  # the file format's name (not the module's: files written before the layout change keep it)
#: 2: every numeric dataset chunked with a Fletcher32 checksum (version 1 files had none)
SCHEMA_VERSION = 2
#: ``create_dataset`` keywords of a checksummed dataset (HDF5 verifies the checksum of every chunk it reads)
CHECKSUM: dict[str, Any] = {"fletcher32": True}
SPLITS: tuple[str, ...] = ("train", "val", "test")
_STR = h5py.string_dtype(encoding="utf-8")


class StoreError(ValueError):
    """A store file is missing, foreign, truncated, of another schema version, internally inconsistent or
    corrupted (a chunk failing its checksum)."""

    def __init__(self, path: str | os.PathLike[str], field: str | None = None, problem: str | None = None) -> None:
        if field is None and problem is None:
            # rebuilt from a message alone: a DataLoader worker's error is re-raised in the main process as
            # ``type(e)("Caught StoreError in DataLoader worker process 0.\nOriginal Traceback ...")`` (and
            # pickling rebuilds it from its args); keep the one line of the original error, not the traceback
            path, field, problem = _parse_store_error(str(path))
        self.path = str(path)
        self.field = str(field)
        self.problem = str(problem)
        super().__init__(f"{self.path}: field '{self.field}': {self.problem}")


_STORE_ERROR_LINE = re.compile(r"(?:^|\.)StoreError: (.*)$")
_STORE_ERROR_TEXT = re.compile(r"^(.*?): field '(.*?)': (.*)$", re.S)


def _parse_store_error(message: str) -> tuple[str, str, str]:
    """(path, field, problem) of a StoreError's message, or of the last ``...StoreError: <message>`` line of a
    traceback text (what torch's DataLoader re-raises)."""
    lines = [ln.strip() for ln in message.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        m = _STORE_ERROR_LINE.search(ln)
        if m:
            message = m.group(1)
            break
    m = _STORE_ERROR_TEXT.match(message.strip())
    if m:
        return m.group(1), m.group(2), m.group(3)
    return "<store>", "<file>", message.strip().splitlines()[-1] if message.strip() else "unknown error"


class DiskFullError(OSError):
    """No space left on the device while writing a file (one line naming it; the temp file is removed)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(errno.ENOSPC, f"no space left on device writing {path}", str(path))

    def __str__(self) -> str:
        return str(self.strerror)


def is_disk_full(e: BaseException) -> bool:
    """An OSError (or HDF5's error text) saying the device is full (ENOSPC) or the quota is exceeded."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    return "No space left on device" in text or "errno = 28," in text or "Disk quota exceeded" in text


def is_corrupt(e: BaseException) -> bool:
    """An HDF5 read error from a damaged chunk: a failed checksum (Fletcher32) or an undecodable chunk."""
    text = str(e).lower()
    return isinstance(e, OSError) and any(k in text for k in ("fletcher32", "checksum", "filter returned failure",
                                                             "can't read data", "can't synchronously read data"))


def corrupt_problem(what: str, source: str | None, path: str | os.PathLike[str], detail: BaseException | None = None
                    ) -> str:
    """The one-line problem of a chunk that fails its checksum, with the command that rebuilds the file."""
    how = f"`neurovision prepare {source or '<source>'} --out {path} --force true` (same options)"
    plural = ".." in what  # "rows 0..63"
    why = ("fail their checksum" if plural else "fails its checksum") if detail is None or is_corrupt(detail) \
        else f"{'are' if plural else 'is'} unreadable ({_first_line(detail)})"
    return f"{what} {why}: the file is damaged (disk or copy error); rebuild it with {how}"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# --------------------------------------------------------------------------------------------- writing
class AtomicH5Writer:
    """Base of the store writers: an HDF5 file written to a temp file beside ``path`` and renamed over it only
    when the ``with`` block and :meth:`_finalise` succeed (``complete`` is set right before the rename), with the
    root attributes every neurovision file carries (``schema``, ``schema_version``, ``source``,
    ``converter_version``, ``options``, ``fingerprint``, ``created``, ``complete``).

    Temp files of killed writers of the same ``path`` are removed on entry
    (:func:`neurovision.data.atomic.remove_stale_partials`). A full disk ends the write with one
    :class:`DiskFullError` ("no space left on device writing <path>") and the temp file removed: the file is opened
    without a chunk cache, so a failed chunk write raises where it happens (with a cache it surfaced later, in
    dozens of ignored errors from h5py's object deallocation, and closing the damaged file crashed the process),
    and before closing a file that hit a full disk the temp file is truncated, so HDF5's last metadata writes fit.
    """

    schema: str = ""
    schema_version: int = 0

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        source: str,
        converter_version: str,
        options: dict[str, Any],
        fingerprint: str = "",
    ) -> None:
        self.path = Path(path)
        self.source = source
        self.converter_version = converter_version
        self.options = options
        self.fingerprint = fingerprint
        self._tmp: Path | None = None
        self.h5: h5py.File | None = None

    # context management -------------------------------------------------------------------------
    def __enter__(self) -> Any:
        remove_stale_partials(self.path)
        self._atomic = atomic_path(self.path)
        self._tmp = self._atomic.__enter__()
        try:
            self.h5 = h5py.File(self._tmp, "w", libver="latest", rdcc_nbytes=0)
        except BaseException as e:
            self._atomic.__exit__(type(e), e, e.__traceback__)
            if is_disk_full(e):
                raise DiskFullError(self.path) from None
            raise
        a = self.h5.attrs
        a["schema"] = self.schema
        a["schema_version"] = self.schema_version
        a["source"] = self.source
        a["converter_version"] = self.converter_version
        a["options"] = json.dumps(self.options, sort_keys=True, default=str)
        a["fingerprint"] = self.fingerprint
        a["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat()
        a["complete"] = False
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        assert self.h5 is not None and self._tmp is not None
        full = exc is not None and is_disk_full(exc)
        try:
            if exc_type is None:
                self._finalise()
                self.h5.attrs["complete"] = True
                self.h5.flush()
        except BaseException as e:
            exc_type, exc, tb = type(e), e, e.__traceback__
            full = is_disk_full(e)
            if not full:
                raise
        finally:
            try:
                self._close(discard=exc_type is not None)
            except BaseException as e:  # the last writes of a kept file failed (e.g. the disk filled up)
                if exc_type is None:
                    exc_type, exc, tb = type(e), e, e.__traceback__
                self._close(discard=True)  # truncate, then let HDF5 finish closing (never a half-closed file)
                full = full or is_disk_full(e)
                if not full:
                    raise
            finally:
                self._atomic.__exit__(exc_type, exc, tb)  # renames over the target only when all went well
        if full:
            raise DiskFullError(self.path) from None

    def _close(self, discard: bool) -> None:
        """Close the file; one being abandoned is truncated first (it is removed anyway), which frees its space, so
        HDF5's closing metadata writes succeed even on a full disk and the library is left in a sane state.
        h5py's "Exception ignored" reports of a failed close are silenced: the caller raises one error."""
        assert self.h5 is not None and self._tmp is not None
        if not discard:
            self.h5.close()
            return
        with contextlib.suppress(OSError):
            os.truncate(self._tmp, 0)
        hook = sys.unraisablehook
        sys.unraisablehook = lambda _: None
        try:
            with contextlib.suppress(Exception):
                self.h5.close()
        finally:
            sys.unraisablehook = hook

    @property
    def _f(self) -> h5py.File:
        if self.h5 is None:
            raise RuntimeError(f"{type(self).__name__} must be used as a context manager")
        return self.h5

    def _finalise(self) -> None:
        """Check the content and write the last attributes (raise to abandon the file)."""


class StoreWriter(AtomicH5Writer):
    """Write a store atomically: everything goes to a temp file in the target folder, renamed on success.

    Use as a context manager; an exception (or a killed process) leaves the target untouched and no file
    that opens as a valid store (``complete`` is set only right before the rename).
    """

    schema = SCHEMA
    schema_version = SCHEMA_VERSION

    def __init__(self, path: str | os.PathLike[str], **kwargs: Any) -> None:
        super().__init__(path, **kwargs)
        self._n_trials = 0
        self._subjects: list[str] = []

    # content ------------------------------------------------------------------------------------
    def set_grid(
        self,
        shape: Sequence[int],
        patch_size: int,
        active_index: np.ndarray,
        union_mask: np.ndarray,
    ) -> None:
        from neurovision.data.preprocessing import padded_shape, patch_grid_shape

        g = self._f.create_group("grid")
        shape = tuple(int(s) for s in shape)
        pshape = padded_shape(shape, patch_size)
        g.attrs["shape"] = np.asarray(shape, dtype=np.int64)
        g.attrs["padded_shape"] = np.asarray(pshape, dtype=np.int64)
        g.attrs["patch_size"] = int(patch_size)
        active_index = np.asarray(active_index, dtype=np.int64)
        g.create_dataset("active_index", data=active_index, **CHECKSUM)
        coords = np.stack(np.unravel_index(active_index, patch_grid_shape(shape, patch_size)), axis=1)
        g.create_dataset("active_coords", data=coords.astype(np.int32), **CHECKSUM)
        g.create_dataset("union_mask", data=np.asarray(union_mask, dtype=np.uint8), compression="gzip", **CHECKSUM)
        n_active, p3 = len(active_index), int(patch_size) ** 3
        t = self._f.create_group("trials")
        t.create_dataset(
            "patches", shape=(0, n_active, p3), maxshape=(None, n_active, p3), dtype=np.float16,
            chunks=(1, n_active, p3), **CHECKSUM,
        )
        for name, dt in (("subject", np.int16), ("stimulus", np.int32), ("repeat", np.int16),
                         ("session", np.int16), ("split", np.uint8)):
            t.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dt, chunks=(4096,), **CHECKSUM)
        t["split"].attrs["names"] = json.dumps(list(SPLITS))

    def add_subject(
        self,
        name: str,
        *,
        affine: np.ndarray,
        grid_affine: np.ndarray,
        original_shape: Sequence[int],
        roi: np.ndarray,
    ) -> int:
        if name in self._subjects:
            raise ValueError(f"subject {name!r} added twice")
        s = self._f.require_group("subjects").create_group(name)
        s.attrs["index"] = len(self._subjects)
        s.attrs["original_shape"] = np.asarray(original_shape, dtype=np.int64)
        s.attrs["affine"] = np.asarray(affine, dtype=np.float64)
        s.attrs["grid_affine"] = np.asarray(grid_affine, dtype=np.float64)
        s.create_dataset("roi", data=np.asarray(roi, dtype=np.uint8), compression="gzip", **CHECKSUM)
        self._subjects.append(name)
        return len(self._subjects) - 1

    def append_trials(
        self,
        *,
        subject: int | np.ndarray,
        stimulus: np.ndarray,
        repeat: np.ndarray,
        session: np.ndarray,
        split: np.ndarray,
        patches: np.ndarray,
    ) -> None:
        """Append a batch of trials; ``patches`` is (B, A, P**3), cast to float16 (must be finite)."""
        t = self._f["trials"]
        n = len(stimulus)
        patches = np.asarray(patches)
        expected = t["patches"].shape[1:]
        if patches.shape != (n, *expected):
            raise ValueError(f"patches shape {patches.shape} != {(n, *expected)}")
        p16 = patches.astype(np.float16)
        if not np.isfinite(p16).all():
            raise ValueError("patches contain NaN/inf (after float16 cast): z-score or clip the input first")
        cols = {
            "subject": np.broadcast_to(np.asarray(subject), (n,)),
            "stimulus": stimulus, "repeat": repeat, "session": session, "split": split,
        }
        for name, values in cols.items():
            if np.shape(values) != (n,):
                raise ValueError(f"trial column {name!r} has shape {np.shape(values)}, expected ({n},)")
        start = self._n_trials
        for name, values in cols.items():
            ds = t[name]
            ds.resize((start + n,))
            ds[start:] = np.asarray(values)
        ds = t["patches"]
        ds.resize((start + n, *expected))
        for i in range(n):  # one chunk per trial: direct chunk-sized writes
            ds[start + i] = p16[i]
        self._n_trials += n

    def create_stimuli(self, n: int, image_shape: Sequence[int], ids: np.ndarray | None = None) -> h5py.Dataset:
        """Allocate /stimuli for ``n`` uint8 images of ``image_shape`` (H, W, 3), to be filled in batches."""
        shape = tuple(int(s) for s in image_shape)
        if len(shape) != 3 or shape[-1] != 3:
            raise ValueError(f"image_shape must be (H, W, 3), got {shape}")
        ids = np.arange(n) if ids is None else np.asarray(ids)
        if len(ids) != n:
            raise ValueError(f"{len(ids)} stimulus ids for {n} images")
        g = self._f.require_group("stimuli")
        ds = g.create_dataset("images", shape=(n, *shape), dtype=np.uint8, chunks=(1, *shape), **CHECKSUM)
        g.create_dataset("ids", data=ids.astype(np.int64), **CHECKSUM)
        return ds

    def set_stimuli(self, images: np.ndarray, ids: np.ndarray | None = None) -> None:
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"stimuli must be uint8 (S, H, W, 3), got {images.dtype} {images.shape}")
        self.create_stimuli(len(images), images.shape[1:], ids)[:] = images

    def set_annotations(self, kind: str, per_stimulus: Sequence[Any]) -> None:
        """One JSON-serialisable entry per stimulus (a list of captions, a dict of QA pairs, ...)."""
        g = self._f.require_group("annotations")
        data = np.array([json.dumps(x) for x in per_stimulus], dtype=object)
        g.create_dataset(kind, data=data, dtype=_STR)

    def set_extra(self, name: str, data: np.ndarray, **attrs: Any) -> None:
        data = np.asarray(data)
        kw = {"compression": "gzip", **CHECKSUM} if data.ndim else {}  # a scalar cannot be chunked
        ds = self._f.require_group("extras").create_dataset(name, data=data, **kw)
        for k, v in attrs.items():
            ds.attrs[k] = v

    def _finalise(self) -> None:
        f = self._f
        for required in ("grid", "trials", "subjects", "stimuli"):
            if required not in f:
                raise ValueError(f"store incomplete: group '{required}' was never written")
        f["trials/subject"].attrs["names"] = json.dumps(self._subjects)
        n_stim = len(f["stimuli/images"])
        if self._n_trials and int(f["trials/stimulus"][:].max()) >= n_stim:
            raise ValueError("trials reference stimuli beyond /stimuli/images")


def fingerprint(payload: Any, files: Iterable[str | os.PathLike[str]] = ()) -> str:
    """Hash of the converter's options and its input files' (path, size, mtime): same inputs -> same id."""
    h = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode())
    for p in sorted(str(f) for f in files):
        st = os.stat(p)
        h.update(f"{os.path.abspath(p)}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()


def existing_fingerprint(path: str | os.PathLike[str]) -> str | None:
    """The fingerprint of a valid store at ``path``, or None when absent or invalid."""
    try:
        return Store(path).attrs["fingerprint"]
    except (StoreError, FileNotFoundError):
        return None


# --------------------------------------------------------------------------------------------- reading
@contextlib.contextmanager
def open_checked(path: Path, what: str = "store file") -> Iterator[h5py.File]:
    """Open ``path`` read-only; missing -> FileNotFoundError, unreadable / unfinished -> :class:`StoreError`."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: {what} does not exist (run `neurovision prepare`)")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        if "already open for write" in str(e):  # a writer was killed before closing the file
            raise StoreError(path, "/.complete", "the file was not finished (interrupted `prepare`?)") from e
        raise StoreError(path, "<file>", f"not a readable HDF5 file (foreign or truncated): {e}") from e
    try:
        yield f
    finally:
        f.close()


def check_header(f: h5py.File, path: Path, schema: str, version: int, what: str) -> None:
    """The root attributes every neurovision file carries: its schema, its version, and ``complete``.

    A file of an older schema version names the command that rebuilds it (``prepare`` treats it as stale, so no
    ``--force`` is needed); a newer one asks for a newer neurovision."""
    found = plain(f.attrs.get("schema"))
    if found != schema:
        raise StoreError(path, "/.schema", f"expected {schema!r}, found {found!r} (not {what})")
    v = plain(f.attrs.get("schema_version"))
    if v != version:
        if isinstance(v, int) and v > version:
            raise StoreError(path, "/.schema_version", f"written by a newer version of neurovision (schema "
                             f"version {v}; this version reads {version}): update neurovision to read it")
        source = plain(f.attrs.get("source")) or "<source>"
        raise StoreError(path, "/.schema_version",
                         f"written by an older version of neurovision (schema version {v}; this version reads "
                         f"{version}, with per-chunk checksums): rebuild it with `neurovision prepare {source} "
                         f"--out {path}` (same options)")
    if not bool(f.attrs.get("complete", False)):
        raise StoreError(path, "/.complete", "the file was not finished (interrupted `prepare`?)")


@dataclass(frozen=True)
class Grid:
    shape: tuple[int, int, int]
    padded_shape: tuple[int, int, int]
    patch_size: int
    active_index: np.ndarray
    active_coords: np.ndarray

    @property
    def n_active(self) -> int:
        return len(self.active_index)

    @property
    def n_patches(self) -> int:
        return int(np.prod(self.padded_shape)) // self.patch_size**3


@dataclass(frozen=True)
class Subject:
    name: str
    index: int
    original_shape: tuple[int, int, int]
    affine: np.ndarray
    grid_affine: np.ndarray


_TRIAL_FIELDS = {"subject": "i", "stimulus": "i", "repeat": "i", "session": "i", "split": "u"}


class Store:
    """Validated, lazily opened read access to a store file. Safe to pickle into DataLoader workers."""

    #: read each trial through HDF5's filter pipeline, which verifies its chunk's Fletcher32 checksum (False: the
    #: unverified direct chunk read of stores before checksums; for benchmarks pricing the check, never for use)
    verify_checksums: bool = True

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._h5: h5py.File | None = None
        self._pid: int | None = None
        self._patches_ds: h5py.Dataset | None = None
        self._images_ds: h5py.Dataset | None = None
        self._direct = False
        with open_checked(self.path) as f:
            self._validate(f)
            self.attrs: dict[str, Any] = {k: plain(v) for k, v in f.attrs.items()}
            g = f["grid"]
            self.grid = Grid(
                shape=tuple(int(x) for x in g.attrs["shape"]),  # type: ignore[arg-type]
                padded_shape=tuple(int(x) for x in g.attrs["padded_shape"]),  # type: ignore[arg-type]
                patch_size=int(g.attrs["patch_size"]),
                active_index=self._array(f, "grid/active_index"),
                active_coords=self._array(f, "grid/active_coords"),
            )
            names = json.loads(f["trials/subject"].attrs["names"])
            self.subjects: list[Subject] = []
            for name in names:
                s = f["subjects"][name]
                self.subjects.append(Subject(
                    name=name, index=int(s.attrs["index"]),
                    original_shape=tuple(int(x) for x in s.attrs["original_shape"]),  # type: ignore[arg-type]
                    affine=np.asarray(s.attrs["affine"]), grid_affine=np.asarray(s.attrs["grid_affine"]),
                ))
            self.trials: dict[str, np.ndarray] = {k: self._array(f, f"trials/{k}") for k in _TRIAL_FIELDS}
            self.stimulus_ids = self._array(f, "stimuli/ids")
            self.image_shape = tuple(f["stimuli/images"].shape[1:])
            self.annotation_kinds = sorted(f["annotations"].keys()) if "annotations" in f else []
            self.extras = sorted(f["extras"].keys()) if "extras" in f else []

    @contextlib.contextmanager
    def _reading(self, field: str, what: str) -> Iterator[None]:
        """Turn an HDF5 read error (a chunk failing its checksum) into one :class:`StoreError` naming ``what``."""
        try:
            yield
        except OSError as e:
            raise StoreError(self.path, field, corrupt_problem(what, self._source(), self.path, e)) from None

    def _source(self) -> str | None:
        attrs = getattr(self, "attrs", None)
        if attrs is None and self._h5 is None:
            return None
        return (attrs or {k: plain(v) for k, v in self.h5.attrs.items()}).get("source")

    def _array(self, f: h5py.File, name: str) -> np.ndarray:
        """A whole (small) dataset; a damaged chunk is a :class:`StoreError` naming its rows."""
        try:
            return f[name][()]
        except OSError:
            verify_rows(f[name], self.path, "row", plain(f.attrs.get("source")))
            raise

    # opening ------------------------------------------------------------------------------------
    def _validate(self, f: h5py.File) -> None:
        def need(cond: bool, field: str, problem: str) -> None:
            if not cond:
                raise StoreError(self.path, field, problem)

        check_header(f, self.path, SCHEMA, SCHEMA_VERSION, "a neurovision store")
        for path in ("grid/active_index", "grid/active_coords", "grid/union_mask", "trials/patches",
                     "stimuli/images", "stimuli/ids", *(f"trials/{k}" for k in _TRIAL_FIELDS)):
            need(path in f, path, "missing")
        for attr in ("shape", "padded_shape", "patch_size"):
            need(attr in f["grid"].attrs, f"grid.{attr}", "missing attribute")
        need("names" in f["trials/subject"].attrs, "trials/subject.names", "missing attribute")
        p = int(f["grid"].attrs["patch_size"])
        n_active = len(f["grid/active_index"])
        pt = f["trials/patches"]
        for name in ("trials/patches", "stimuli/images", "stimuli/ids", *(f"trials/{k}" for k in _TRIAL_FIELDS)):
            need(bool(f[name].fletcher32), name, "no per-chunk checksum (Fletcher32 filter): not written by "
                 "this version of `neurovision prepare`; rebuild it")
        need(pt.dtype == np.float16, "trials/patches", f"dtype {pt.dtype}, expected float16")
        need(pt.ndim == 3 and pt.shape[1:] == (n_active, p**3), "trials/patches",
             f"shape {pt.shape}, expected (T, {n_active}, {p ** 3})")
        n = pt.shape[0]
        for k in _TRIAL_FIELDS:
            ds = f["trials"][k]
            need(ds.shape == (n,), f"trials/{k}", f"shape {ds.shape}, expected ({n},) like trials/patches")
            need(ds.dtype.kind in "iu", f"trials/{k}", f"dtype {ds.dtype}, expected an integer type")
        img = f["stimuli/images"]
        need(img.dtype == np.uint8 and img.ndim == 4, "stimuli/images",
             f"dtype {img.dtype} shape {img.shape}, expected uint8 (S, H, W, 3)")
        need(f["stimuli/ids"].shape == (img.shape[0],), "stimuli/ids", "length differs from stimuli/images")
        names = json.loads(f["trials/subject"].attrs["names"])
        for name in names:
            need(f"subjects/{name}/roi" in f, f"subjects/{name}", "missing (named in trials/subject.names)")
            for attr in ("affine", "grid_affine", "original_shape", "index"):
                need(attr in f["subjects"][name].attrs, f"subjects/{name}.{attr}", "missing attribute")
        if n:
            subj = self._array(f, "trials/subject")
            need(int(subj.min()) >= 0 and int(subj.max()) < len(names), "trials/subject",
                 f"values outside 0..{len(names) - 1}")
            stim = self._array(f, "trials/stimulus")
            need(int(stim.min()) >= 0 and int(stim.max()) < img.shape[0], "trials/stimulus",
                 f"values outside 0..{img.shape[0] - 1}")
            split = self._array(f, "trials/split")
            need(int(split.max()) < len(SPLITS), "trials/split", f"values outside 0..{len(SPLITS) - 1}")

    @property
    def h5(self) -> h5py.File:
        """The per-process file handle, opened on first use (and again after a fork)."""
        if self._h5 is None or self._pid != os.getpid():
            self._h5 = h5py.File(self.path, "r")
            self._pid = os.getpid()
            ds = self._h5["trials/patches"]
            self._patches_ds = ds
            self._images_ds = self._h5["stimuli/images"]  # kept: a dataset lookup costs ~200 µs per item
            # one uncompressed chunk per trial (as StoreWriter writes it) could be read directly, skipping h5py's
            # selection machinery (about 2x faster per trial), but a direct chunk read bypasses HDF5's checksum
            # check: trials are read through the filter pipeline (a vectorised check of the raw chunk in
            # torch/numpy measured slower than HDF5's own; see benchmarks/bench_datamodule.py)
            self._direct = not self.verify_checksums and ds.chunks == (1, *ds.shape[1:]) \
                and ds.compression is None and not ds.scaleoffset and not ds.shuffle
        return self._h5

    def close(self) -> None:
        if self._h5 is not None and self._pid == os.getpid():
            self._h5.close()
        self._h5 = None
        self._patches_ds = None
        self._images_ds = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_h5"] = None
        state["_pid"] = None
        state["_patches_ds"] = None
        state["_images_ds"] = None
        return state

    # access -------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.trials["stimulus"])

    @property
    def subject_names(self) -> list[str]:
        return [s.name for s in self.subjects]

    def subject(self, name_or_index: str | int) -> Subject:
        for s in self.subjects:
            if name_or_index in (s.name, s.index):
                return s
        raise KeyError(f"{self.path}: field 'subjects': no subject {name_or_index!r}; "
                       f"available: {self.subject_names}")

    def _datasets(self) -> tuple[h5py.Dataset, h5py.Dataset]:
        """The open (patches, images) datasets; opening the file (:attr:`h5`) sets them."""
        _ = self.h5
        if self._patches_ds is None or self._images_ds is None:
            raise RuntimeError(f"{self.path}: the store's datasets are not open")
        return self._patches_ds, self._images_ds

    def patches(self, index: int) -> np.ndarray:
        """Active patches of one trial, float16 (A, P**3); a chunk failing its checksum is a :class:`StoreError`
        naming the trial."""
        ds, _images = self._datasets()
        n = ds.shape[0]
        i = int(index)
        if not -n <= i < n:
            raise IndexError(f"{self.path}: field 'trials/patches': trial {i} out of range 0..{n - 1}")
        i %= n
        if self._direct:  # unverified (benchmarks only): the raw chunk, without its 4-byte checksum
            shape = ds.shape[1:]
            _, raw = ds.id.read_direct_chunk((i, 0, 0))
            return np.frombuffer(bytearray(raw), dtype=np.float16, count=int(np.prod(shape))).reshape(shape)
        with self._reading("trials/patches", f"trial {i}"):
            return ds[i]

    def image(self, stimulus: int) -> np.ndarray:
        _patches, ds = self._datasets()
        with self._reading("stimuli/images", f"stimulus {int(stimulus)}"):
            return ds[int(stimulus)]

    def images(self, index: slice | np.ndarray | Sequence[int]) -> np.ndarray:
        """Several stimuli, uint8 (N, H, W, 3): a slice, or increasing indices (h5py's selection); a chunk failing
        its checksum is a :class:`StoreError` naming the first bad stimulus (every reader of images in batches
        should use this rather than ``h5["stimuli/images"]``)."""
        _patches, ds = self._datasets()
        try:
            return ds[index]
        except OSError as e:
            rows = range(*index.indices(ds.shape[0])) if isinstance(index, slice) else \
                [int(j) for j in np.asarray(index).reshape(-1)]
            for j in rows:
                with self._reading("stimuli/images", f"stimulus {j}"):
                    ds[j]
            raise StoreError(self.path, "stimuli/images", corrupt_problem("a chunk", self._source(), self.path, e)
                             ) from None

    def roi(self, subject: str | int) -> np.ndarray:
        name = self.subject(subject).name
        with self._reading(f"subjects/{name}/roi", f"the ROI of subject {name}"):
            return self.h5[f"subjects/{name}/roi"][:]

    def union_mask(self) -> np.ndarray:
        with self._reading("grid/union_mask", "the union mask"):
            return self.h5["grid/union_mask"][:].astype(bool)

    def annotations(self, kind: str, stimulus: int | None = None) -> Any:
        if kind not in self.annotation_kinds:
            raise KeyError(f"{self.path}: field 'annotations/{kind}': missing; available: "
                           f"{self.annotation_kinds}")
        ds = self.h5[f"annotations/{kind}"]  # variable-length strings: no checksum (HDF5 filters cannot apply)
        if stimulus is None:
            return [json.loads(x) for x in ds.asstr()[:]]
        return json.loads(ds.asstr()[int(stimulus)])

    def extra(self, name: str) -> np.ndarray:
        if name not in self.extras:
            raise KeyError(f"{self.path}: field 'extras/{name}': missing; available: {self.extras}")
        with self._reading(f"extras/{name}", f"extras/{name}"):
            return self.h5[f"extras/{name}"][()]

    def grid_spec(self):  # -> neurovision.data.preprocessing.GridSpec
        """The store's grid, patch size and active patches, with the forward and inverse maps."""
        from neurovision.data.preprocessing import GridSpec

        return GridSpec(self.grid.shape, self.grid.patch_size, self.grid.active_index)

    def to_subject_nifti(self, patches: Any, subject: str | int):  # -> nibabel.Nifti1Image
        """A map over the active patches (A, P**3) -> a NIfTI image in the subject's own space."""
        from neurovision.data.preprocessing import to_nifti

        s = self.subject(subject)
        shape = np.shape(patches)
        if shape != (self.grid.n_active, self.grid.patch_size**3):
            raise ValueError(f"{self.path}: field 'grid/active_index': patches of shape {shape}, expected "
                             f"({self.grid.n_active}, {self.grid.patch_size ** 3})")
        vol = self.grid_spec().to_subject(patches, s.affine, s.grid_affine, s.original_shape)
        return to_nifti(vol, s.affine)

    def split_mask(self, split: str) -> np.ndarray:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return self.trials["split"] == SPLITS.index(split)

    # summary ------------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        g = self.grid
        per_subject = {}
        for s in self.subjects:
            m = self.trials["subject"] == s.index
            per_subject[s.name] = {
                "original_shape": list(s.original_shape),
                **{sp: int((m & self.split_mask(sp)).sum()) for sp in SPLITS},
                "images": int(len(np.unique(self.trials["stimulus"][m]))),
            }
        bytes_trial = g.n_active * g.patch_size**3 * 2
        return {
            "file": str(self.path),
            "source": self.attrs.get("source"),
            "converter_version": self.attrs.get("converter_version"),
            "schema_version": self.attrs.get("schema_version"),
            "created": self.attrs.get("created"),
            "grid": list(g.shape),
            "padded_grid": list(g.padded_shape),
            "patch_size": g.patch_size,
            "active_patches": g.n_active,
            "total_patches": g.n_patches,
            "trials": len(self),
            "splits": {sp: int(self.split_mask(sp).sum()) for sp in SPLITS},
            "stimuli": len(self.stimulus_ids),
            "image_shape": list(self.image_shape),
            "subjects": per_subject,
            "annotations": self.annotation_kinds,
            "extras": self.extras,
            "bytes_per_trial_stored": bytes_trial,
            "bytes_per_trial_full_grid_float16": int(np.prod(g.shape)) * 2,  # the common grid, unpadded
            "bytes_per_trial_padded_grid_float16": int(np.prod(g.padded_shape)) * 2,
            "file_bytes": self.path.stat().st_size,
        }


def plain(v: Any) -> Any:
    """An HDF5 attribute value as plain Python (bytes -> str, numpy scalar -> Python scalar, array -> list)."""
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


# --------------------------------------------------------------------------------------------- integrity
def verify(path: str | os.PathLike[str]) -> int:
    """Read every chunk of a store (or an events store) through HDF5's checksum filter: the number of trials (events)
    checked, or a :class:`StoreError` naming the file, the dataset and the first bad trial (event row, stimulus).

    The full check behind ``neurovision inspect --verify``: it reads the whole file (the cheap checks of opening a
    :class:`Store` do not: a flipped data byte passes them). Trials are checked in index order, so the trial named is
    the first bad one; then the stimuli and every other checksummed dataset.
    """
    path = Path(path)
    with open_checked(path) as f:
        schema = plain(f.attrs.get("schema"))
    if schema != SCHEMA:
        from neurovision.data.events import EVENTS_SCHEMA, verify_events

        if schema == EVENTS_SCHEMA:
            return verify_events(path)
    store = Store(path)  # the cheap checks: header, layout, checksum filters
    source = store.attrs.get("source")
    with open_checked(path) as f:
        pt = f["trials/patches"]
        buf = np.empty(pt.shape[1:], dtype=pt.dtype)
        for i in range(pt.shape[0]):
            try:
                pt.read_direct(buf, np.s_[i])
            except OSError as e:
                raise StoreError(path, "trials/patches", corrupt_problem(f"trial {i}", source, path, e)) from None
        verify_rows(f["stimuli/images"], path, "stimulus", source)
        for name, ds in _datasets(f):
            if name not in ("trials/patches", "stimuli/images"):
                verify_rows(ds, path, "row", source)
    return len(store)


def verify_rows(ds: h5py.Dataset, path: str | os.PathLike[str], unit: str, source: str | None) -> None:
    """Read a dataset chunk row by chunk row (through HDF5's filters); the first failing row range is a
    :class:`StoreError` naming the dataset and the ``unit`` index (row ``i`` or rows ``i..j`` of one chunk)."""
    if ds.dtype.kind == "O" or not ds.shape or ds.size == 0:  # strings (no filters), scalars, empty
        return
    step = ds.chunks[0] if ds.chunks else ds.shape[0]
    name = ds.name.lstrip("/")
    for r0 in range(0, ds.shape[0], step):
        r1 = min(r0 + step, ds.shape[0])
        try:
            ds[r0:r1]
        except OSError as e:
            what = f"{unit} {r0}" if r1 - r0 == 1 else f"{unit}s {r0}..{r1 - 1}"
            raise StoreError(path, name, corrupt_problem(what, source, path, e)) from None


def _datasets(f: h5py.File) -> list[tuple[str, h5py.Dataset]]:
    out: list[tuple[str, h5py.Dataset]] = []
    f.visititems(lambda name, obj: out.append((name, obj)) if isinstance(obj, h5py.Dataset) else None)
    return out


def first_bad_rows(ds: h5py.Dataset) -> str:
    """The first chunk of rows of ``ds`` failing its checksum ("rows i..j fail their checksum"), or "" when every
    chunk reads back intact (HDF5 raises OSError on a Fletcher32 mismatch)."""
    if ds.size == 0:
        return ""
    step = ds.chunks[0] if ds.chunks else max(1, ds.shape[0])
    for r0 in range(0, ds.shape[0], step):
        r1 = min(r0 + step, ds.shape[0])
        try:
            ds[r0:r1]
        except OSError:
            return f"rows {r0}..{r1 - 1} fail their checksum"
    return ""
