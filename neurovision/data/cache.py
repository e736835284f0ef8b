"""One HDF5 entry cache: named entries computed once, checksummed, replaced atomically, shared by processes.

The teacher targets of stage 1 (:class:`neurovision.pretrained.teachers.TeacherCache`) and the network features of the
encoding stage (:func:`neurovision.encoding.features.extract_features`) are both :class:`EntryCache` files; each
user keeps its own key scheme (the entry name), its entry layout and its own validation of an entry's contents.
What they share lives here:

- *Keys*: :func:`file_digest`, :func:`dir_digest`, :func:`json_digest` and :func:`format_floats` (the parts of a
  teacher or network id), :func:`store_key` (what an entry must match of its store).
- *File*: a root with ``schema`` and ``schema_version`` attributes and an ``/entries`` group. A file of another
  schema or version (an older neurovision wrote it; version 1 had no checksums) is not read: one warning that
  it will be rebuilt, and the next write replaces it.
- *Entries*: an HDF5 dataset or group under ``/entries`` with attributes ``complete`` (false until
  :func:`finish_entry`), ``created``, the user's id attribute and ``store_fingerprint``; every non-empty dataset
  carries HDF5's Fletcher32 checksum per chunk (:func:`entry_problem`, :func:`checksum_problem`).
- *Write protocol* (:meth:`EntryCache.rewrite`): a writer holds an exclusive ``flock`` on ``<cache>.lock``
  (:meth:`EntryCache.locked`), re-checks its entry (another process may have written it), then builds a *new*
  file (``neurovision.data.atomic.atomic_path``) holding a copy of every other still-valid entry plus its own, and
  ``os.replace``-s it over the cache. Readers never lock: they see the old or the new complete file. An
  exception or a killed process leaves the old cache untouched. The copy reads each chunk of an old entry once,
  through the checksum filter, and writes it into the new file (an entry with a damaged chunk is dropped with a
  warning, never carried over); memory stays at one block of rows (:data:`COPY_BYTES`).
- *DDP*: :func:`dist_context` and :func:`shard_bounds` for fills split over the ranks of a process group.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Callable, Collection, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeAlias, TypeVar

import h5py
import numpy as np

from neurovision.data.atomic import atomic_path, remove_stale_partials
from neurovision.data.store import plain

log = logging.getLogger("neurovision.data.cache")

T = TypeVar("T")
#: an entry: an HDF5 group (of datasets) or a dataset
Node: TypeAlias = "h5py.Group | h5py.Dataset"

#: bytes per block of rows when an entry is copied into a new cache file
COPY_BYTES = 16 << 20


# --------------------------------------------------------------------------------------------- keys
_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_digest(path: str | os.PathLike[str]) -> str:
    """sha256 of a file's content (memoised per process by path, size and mtime)."""
    p = os.path.realpath(path)
    st = os.stat(p)
    key = (p, st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def dir_digest(path: str | os.PathLike[str]) -> str:
    """Digest of a ``from_pretrained`` folder: its config and weight files (names and contents)."""
    h = hashlib.sha256()
    for f in sorted(Path(path).iterdir()):
        if f.is_file() and (f.suffix in {".json", ".safetensors", ".bin", ".pt", ".pth", ".ckpt"}):
            h.update(f.name.encode())
            h.update(file_digest(f).encode())
    return h.hexdigest()


def json_digest(obj: Any) -> str:
    """sha256 of ``obj`` as JSON with sorted keys (non-JSON values by ``str``)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def format_floats(values: Any) -> str:
    """``(a,b,c)`` with 4 significant digits: a float tuple (normalisation mean, std) as part of an id."""
    return "(" + ",".join(f"{float(x):.4g}" for x in values) + ")"


def store_key(store: Any) -> str:
    """What a cache entry must match of its store (a ``Store`` or ``EventStore``): the store's fingerprint, else the
    file's size and mtime."""
    fp = str(store.attrs.get("fingerprint") or "")
    if fp:
        return fp
    st = store.path.stat()
    return f"file:{st.st_size}:{st.st_mtime_ns}"


# --------------------------------------------------------------------------------------------- entries
def entry_problem(entry: Node, *, id_attr: str, id_value: str, fingerprint: str) -> str | None:
    """Why ``entry`` is not a usable entry for (``id_value``, store ``fingerprint``): incomplete, another id,
    another version of the store; None when the shared checks pass (the user checks the contents)."""
    a = entry.attrs
    if not bool(a.get("complete", False)):
        return "incomplete"
    if plain(a.get(id_attr)) != id_value:
        return f"{id_attr} {plain(a.get(id_attr))!r} != {id_value!r}"
    if plain(a.get("store_fingerprint")) != fingerprint:
        return "written for another version of the store (fingerprint differs)"
    return None


def checksum_problem(ds: h5py.Dataset) -> str | None:
    """"no per-chunk checksum" for a non-empty dataset without HDF5's Fletcher32 filter, else None."""
    return "no per-chunk checksum" if ds.size and not ds.fletcher32 else None


def start_entry(entry: Node, **attrs: Any) -> Node:
    """Mark a new entry incomplete and set its attributes (``json`` for dicts and lists of strings is the user's)."""
    entry.attrs["complete"] = False
    for k, v in attrs.items():
        entry.attrs[k] = v
    return entry


def finish_entry(entry: Node, **attrs: Any) -> None:
    """Set the last attributes, ``created`` (UTC, ISO 8601) and ``complete``: from now on the entry is read."""
    for k, v in attrs.items():
        entry.attrs[k] = v
    entry.attrs["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat()
    entry.attrs["complete"] = True


def _datasets(node: Node) -> list[h5py.Dataset]:
    if isinstance(node, h5py.Dataset):
        return [node]
    out: list[h5py.Dataset] = []
    node.visititems(lambda _, obj: out.append(obj) if isinstance(obj, h5py.Dataset) else None)
    return out


def copy_checked(src: Node, dst: h5py.Group, name: str) -> str:
    """Copy ``src`` (a dataset or a group of them, with attributes) to ``dst[name]``, reading each block of rows
    once through HDF5's filters (the checksum is verified) and writing it (the checksum recomputed). Returns "" when
    the copy is complete, else what failed (``"<dataset>: rows i..j fail their checksum"``); the partial copy is
    then removed. A raw HDF5 copy would carry a damaged chunk over unverified; verifying first, then copying, read
    every entry twice."""
    try:
        _copy_node(src, dst, name)
    except _Damaged as e:
        del dst[name]
        return str(e)
    return ""


class _Damaged(Exception):
    pass


def _copy_node(src: Node, dst: h5py.Group, name: str) -> None:
    if isinstance(src, h5py.Group):
        g = dst.create_group(name)
        for k, v in src.attrs.items():
            g.attrs[k] = v
        for k, child in src.items():
            _copy_node(child, g, k)
        return
    out = dst.create_dataset_like(name, src)
    for k, v in src.attrs.items():
        out.attrs[k] = v
    if src.size == 0:
        return
    if not src.shape or src.dtype.kind == "O" or not src.chunks:
        out[()] = src[()]  # scalars, strings, contiguous data: unfiltered, read once
        return
    per_row = max(1, int(np.prod(src.shape[1:], dtype=np.int64)) * src.dtype.itemsize)
    chunk = src.chunks[0]
    step = max(chunk, COPY_BYTES // per_row // chunk * chunk)  # whole chunks per block
    for r0 in range(0, src.shape[0], step):
        r1 = min(r0 + step, src.shape[0])
        try:
            block = src[r0:r1]
        except OSError:
            raise _Damaged(f"{src.name.rsplit('/', 1)[-1]}: {_first_bad_in(src, r0, r1)}") from None
        out[r0:r1] = block


def _first_bad_in(ds: h5py.Dataset, r0: int, r1: int) -> str:
    """The first chunk of rows of ``ds[r0:r1]`` failing its checksum (as ``neurovision.data.store.first_bad_rows``)."""
    step = ds.chunks[0]
    for c0 in range(r0, r1, step):
        c1 = min(c0 + step, ds.shape[0])
        try:
            ds[c0:c1]
        except OSError:
            return f"rows {c0}..{c1 - 1} fail their checksum"
    return f"rows {r0}..{r1 - 1} are unreadable"


# --------------------------------------------------------------------------------------------- the file
class EntryCache:
    """An HDF5 file of named entries under ``/entries`` of one ``schema`` and ``version``.

    Args:
        path: the cache file.
        schema: the root ``schema`` attribute (``"neurovision.teachers"``, ``"neurovision.features"``).
        version: the root ``schema_version``; a file of another version is rebuilt (one warning).
        kind: what the file is, in messages ("teacher cache", "feature cache").
        id_attr: the entry attribute that names what the entry holds (``teacher_id``, ``model_id``), in messages.
        logger: where warnings go (the user's logger, so a user's messages stay under its name).
    """

    def __init__(self, path: str | os.PathLike[str], schema: str, version: int, *, kind: str, id_attr: str,
                 logger: logging.Logger | None = None) -> None:
        self.path = Path(path)
        self.schema, self.version, self.kind, self.id_attr = schema, int(version), kind, id_attr
        self.log = logger or log

    def __repr__(self) -> str:
        return f"EntryCache({str(self.path)!r}, {self.schema!r}, version {self.version})"

    def is_current(self, f: h5py.File) -> bool:
        """The open file has this cache's schema and version."""
        try:
            return plain(f.attrs.get("schema")) == self.schema and \
                int(plain(f.attrs.get("schema_version", -1))) == self.version
        except (TypeError, ValueError):
            return False

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """An exclusive advisory lock on ``<path>.lock`` (created with the cache's folder; left in place)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = self.path.with_name(self.path.name + ".lock")
        with open(lock, "a") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def read(self, name: str, use: Callable[[Node], T | None], *, quiet: bool = False) -> T | None:
        """``use(entry)`` for the entry ``name`` while the file is open, or None: no file, no such entry, a file of
        another schema or version, or an unreadable file (the last two with a warning unless ``quiet``).
        ``use`` validates the entry (warning on its own) and returns what the caller needs, or None."""
        if not self.path.exists():
            return None
        try:
            with h5py.File(self.path, "r") as f:
                if not self.is_current(f):
                    if not quiet:
                        self.log.warning("%s: not a neurovision %s of schema version %d (an older version of "
                                         "neurovision wrote it?); it will be rebuilt", self.path, self.kind,
                                         self.version)
                    return None
                entries = f.get("entries")
                if entries is None or name not in entries:
                    return None
                return use(entries[name])
        except (OSError, KeyError, ValueError) as e:
            if not quiet:
                self.log.warning("%s: unreadable %s (%s); it will be rebuilt", self.path, self.kind, e)
            return None

    def entries(self, describe: Callable[[Node], Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
        """Attributes of every entry (plain values) plus ``name`` and what ``describe(entry)`` adds; empty when there
        is no file. Lists any schema version (what is there, not what is usable)."""
        out: list[dict[str, Any]] = []
        if not self.path.exists():
            return out
        with h5py.File(self.path, "r") as f:
            for name, node in f.get("entries", {}).items():
                a = {k: plain(v) for k, v in node.attrs.items()}
                a["name"] = name
                if describe is not None:
                    a.update(describe(node))
                out.append(a)
        return out

    @contextlib.contextmanager
    def rewrite(self, *, replace: Collection[str] = (), prune: Callable[[Mapping[str, Any]], str | None] | None = None,
                attrs: Mapping[str, Any] | None = None) -> Iterator[h5py.Group]:
        """A new cache file, written atomically over :attr:`path` when the block succeeds (untouched when it
        raises), that yields its ``/entries`` group for the block to add entries to. The root carries the schema,
        version and ``attrs``; every entry of the old file (same schema and version) is copied unless its name is in
        ``replace``, it is incomplete or lacks checksums, ``prune(attrs)`` gives a reason (logged at INFO), or a
        chunk fails its checksum (a warning: dropped). The caller holds :meth:`locked`."""
        remove_stale_partials(self.path)  # temp files of killed writers
        with atomic_path(self.path) as tmp, h5py.File(tmp, "w") as out:
            out.attrs["schema"], out.attrs["schema_version"] = self.schema, self.version
            for k, v in (attrs or {}).items():
                out.attrs[k] = v
            entries = out.create_group("entries")
            self._copy_valid(entries, set(replace), prune)
            yield entries

    def _copy_valid(self, entries: h5py.Group, replace: set[str],
                    prune: Callable[[Mapping[str, Any]], str | None] | None) -> None:
        if not self.path.exists():
            return
        try:
            with h5py.File(self.path, "r") as f:
                if not self.is_current(f):
                    return
                for name, node in f.get("entries", {}).items():
                    a = {k: plain(v) for k, v in node.attrs.items()}
                    if name in replace or not bool(a.get("complete", False)) or \
                            any(checksum_problem(ds) for ds in _datasets(node)):
                        continue
                    why = prune(a) if prune is not None else None
                    if why:
                        self.log.info("%s: pruning %s (%s)", self.path, a.get(self.id_attr), why)
                        continue
                    bad = copy_checked(node, entries, name)
                    if bad:
                        self.log.warning("%s: dropping damaged entry %s (%s)", self.path, a.get(self.id_attr), bad)
        except OSError as e:
            self.log.warning("%s: unreadable %s (%s); starting a new one", self.path, self.kind, e)


# --------------------------------------------------------------------------------------------- DDP
def shard_bounds(n: int, world_size: int, rank: int, align: int = 1) -> tuple[int, int]:
    """Rows ``[i0, i1)`` of ``rank``'s contiguous shard of ``n`` rows over ``world_size`` ranks: the shards
    cover every row once, in rank order, and the first shards hold one unit more. The unit is ``align`` rows
    (a shard starts at a multiple of ``align``): with the fill's batch size, every batch holds the same rows as
    in a one-process fill, so the cache does not depend on the number of ranks."""
    if world_size < 1 or not 0 <= rank < world_size or n < 0 or align < 1:
        raise ValueError(f"no shard {rank} of {n} rows over {world_size} ranks (align {align})")
    units = -(-n // align)
    base, extra = divmod(units, world_size)
    u0 = rank * base + min(rank, extra)
    u1 = u0 + base + (1 if rank < extra else 0)
    return min(n, u0 * align), min(n, u1 * align)


def dist_context() -> tuple[int, int] | None:
    """``(global rank, world size)`` under a ``torch.distributed`` process group of more than one rank, else None."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return None


__all__ = [
    "COPY_BYTES", "EntryCache", "checksum_problem", "copy_checked", "dir_digest", "dist_context", "entry_problem",
    "file_digest", "finish_entry", "format_floats", "json_digest", "plain", "shard_bounds", "start_entry",
    "store_key",
]
