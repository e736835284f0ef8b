"""Atomic file writes: write to a temp file beside the target, then rename it over the target.

A reader sees the old file or the new one, never half of one; a failed write leaves the old file as it was,
and a killed process leaves at most a hidden ``.<name>.<host>-<pid>.*.partial`` file (never a valid target), which
:func:`remove_stale_partials` (called by the next writer of the same target) removes once its process is gone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

log = logging.getLogger("neurovision.data.atomic")

#: a temp file of the old naming (no host and pid in it) is taken for a killed run's once this old (seconds)
LEGACY_PARTIAL_AGE_S = 3600


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:64] or "host"


def _owner_tag() -> str:
    """``<host>-<pid>``: who writes a temp file, so a later writer can tell a killed run's file from a live one."""
    return f"{_host()}-{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_partials(path: str | os.PathLike[str], suffixes: tuple[str, ...] = (".partial",)) -> list[Path]:
    """Remove the temp files of writers of ``path`` that were killed (``.<name>.<host>-<pid>.*.partial`` whose
    process no longer runs on this host); returns the paths removed.

    A file of a live writer (its pid runs here), of another host (a shared file system: this host cannot tell) or of
    this process is kept. A temp file of the older naming, without host and pid, is removed once it has not been
    modified for :data:`LEGACY_PARTIAL_AGE_S`.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    host, removed = _host(), []
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(?:(?P<host>[A-Za-z0-9_-]+)-(?P<pid>\d+)\.)?[^/]*$")
    for p in path.parent.glob(f".{_glob_escape(path.name)}.*"):
        if not p.name.endswith(suffixes):
            continue
        m = pattern.match(p.name)
        if m is None:
            continue
        try:
            if m.group("pid") is not None:
                pid = int(m.group("pid"))
                if m.group("host") != host or pid == os.getpid() or _alive(pid):
                    continue
            elif time.time() - p.stat().st_mtime < LEGACY_PARTIAL_AGE_S:
                continue
            if p.is_dir():
                import shutil

                shutil.rmtree(p)
            else:
                p.unlink()
        except FileNotFoundError:
            continue
        removed.append(p)
        log.info("removed %s (left by a killed run writing %s)", p, path)
    return removed


def _glob_escape(name: str) -> str:
    """``name`` with glob's special characters escaped."""
    import glob

    return glob.escape(name)


def shared_mode(mode: int = 0o666) -> int:
    """``mode`` with this process's umask applied (what ``open`` would have created)."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str = ".partial") -> Iterator[Path]:
    """Yield a fresh temp path in ``path``'s folder (created if needed) to write to.

    When the block succeeds the temp file gets the umask's permissions (``mkstemp`` makes it 0600) and
    replaces ``path``; when it raises, the temp file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.{_owner_tag()}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, shared_mode())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str], suffix: str = ".partial") -> Iterator[Path]:
    """Like :func:`atomic_path` for a directory: yield a fresh empty temp directory beside ``path``; on success
    it replaces ``path`` (an existing directory is moved aside first and removed after), on failure it is
    removed and ``path`` is untouched."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{_owner_tag()}.", suffix=suffix, dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, shared_mode(0o777))
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _json_default(o: object) -> object:
    """numpy scalars/arrays and torch tensors as plain JSON values, paths as strings."""
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray) or type(o).__name__ == "Tensor":
        return o.tolist()  # type: ignore[attr-defined]
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    raise TypeError(type(o).__name__)


def write_json(path: str | os.PathLike[str], obj: object) -> None:
    """``obj`` as indented JSON (keys sorted), written atomically."""
    import json

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def write_jsonl(path: str | os.PathLike[str], rows: Iterable[object]) -> None:
    """One JSON object per line, written atomically."""
    import json

    with atomic_path(path) as tmp, open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r, default=_json_default) + "\n")
