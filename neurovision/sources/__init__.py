"""Data sources: each one converts its own layout into a neurovision store (see :mod:`neurovision.store`).

A source module exposes ``prepare(out, ..., force=False) -> Path``; its keyword arguments (typed, with
defaults) become the options of ``neurovision prepare <source>``. ``prepare`` must:

- compute a :func:`neurovision.store.fingerprint` of its options and input files and return early (a no-op)
  when a valid store with the same fingerprint already sits at ``out`` (unless ``force``);
- write through :class:`neurovision.store.StoreWriter` (atomic: temp file + rename);
- raise one clear error naming the input file and the field on bad input.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from neurovision.store import existing_fingerprint

log = logging.getLogger("neurovision.prepare")


def up_to_date(out: str | Path, fp: str, force: bool) -> bool:
    """True (and a log line) when ``out`` is a valid store made from the same inputs and options."""
    from neurovision.encoding.events import existing_events_fingerprint

    if not force and fp in (existing_fingerprint(out), existing_events_fingerprint(out)):
        log.info("%s is up to date (same inputs and options); nothing to do", out)
        print(f"{out}: up to date (same inputs and options), nothing to do")
        return True
    return False


def registry() -> dict[str, Callable[..., Any]]:
    """Source name -> its ``prepare`` function (imported lazily)."""
    from neurovision.sources import braintreebank, nsd, phantom, phantom_seeg

    return {"phantom": phantom.prepare, "nsd": nsd.prepare,
            "braintreebank": braintreebank.prepare, "phantom_seeg": phantom_seeg.prepare}
