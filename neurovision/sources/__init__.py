"""Data sources: each one converts its own layout into a neurovision store (see :mod:`neurovision.data.store`).

A source module exposes ``prepare(out, ..., force=False) -> Path``; its keyword arguments (typed, with
defaults) become the options of ``neurovision prepare <source>``. ``prepare`` must:

- compute a :func:`neurovision.data.store.fingerprint` of its options and input files and return early (a no-op)
  when a valid store with the same fingerprint already sits at ``out`` (unless ``force``), through
  :func:`up_to_date`: "valid" means the store passes its *cheap* checks (opens, header, layout, checksum filters;
  see :mod:`neurovision.data.store`), so a truncated, foreign, unfinished or older-version file is rebuilt. Damaged
  data bytes inside a valid file are not found without reading it all (``neurovision inspect --verify``);
  ``--force true`` rebuilds such a store;
- write through :class:`neurovision.data.store.StoreWriter` (atomic: temp file + rename);
- raise one clear error naming the input file and the field on bad input.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from neurovision.data.atomic import remove_stale_partials
from neurovision.data.store import StoreError

log = logging.getLogger("neurovision.prepare")


def existing_store(out: str | Path) -> tuple[str | None, str | None]:
    """``(fingerprint, None)`` of a store or events store at ``out`` that passes its cheap checks, else ``(None,
    why)`` (``why`` None when there is no file)."""
    import h5py

    from neurovision.data.events import EVENTS_SCHEMA, EventStore
    from neurovision.data.store import Store, plain

    out = Path(out)
    if not out.exists():
        return None, None
    try:
        with h5py.File(out, "r") as f:
            schema = plain(f.attrs.get("schema"))
    except OSError:
        schema = None  # the reader below says why
    try:
        opened = EventStore(out) if schema == EVENTS_SCHEMA else Store(out)
        return str(opened.attrs.get("fingerprint", "")), None
    except (StoreError, FileNotFoundError, OSError) as e:
        return None, str(e)


def up_to_date(out: str | Path, fp: str, force: bool) -> bool:
    """True (and a log line) when ``out`` is a store that passes its cheap checks, made from the same inputs and
    options. Temp files of killed runs writing ``out`` are removed first; a file at ``out`` that fails its checks
    (truncated, foreign, unfinished, written by an older version) is stale: this says so and returns False."""
    for p in remove_stale_partials(out):
        log.info("%s: removed %s (left by a killed run)", out, p.name)
    if force:
        return False
    found, why = existing_store(out)
    if found is not None and found == fp:
        log.info("%s: up to date (same inputs and options), nothing to do", out)
        return True
    if why is not None:
        log.info("%s: stale, rebuilding (%s)", out, why)
    return False


def registry() -> dict[str, Callable[..., Any]]:
    """Source name -> its ``prepare`` function (imported lazily)."""
    from neurovision.sources import braintreebank, nsd, phantom, phantom_seeg

    return {"phantom": phantom.prepare, "nsd": nsd.prepare,
            "braintreebank": braintreebank.prepare, "phantom_seeg": phantom_seeg.prepare}
