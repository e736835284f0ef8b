"""A finished sweep as TensorBoard HParams: ``tensorboard --logdir <sweep>`` then compares its runs side by side.

:func:`write_hparams` reads what ``neurovision sweep`` leaves in its out folder -- ``results.csv`` (``run, seed,
<override columns...>, metric, value``) and, per run folder, ``overrides.json`` (the run's dotted overrides and
``seed_everything``) and ``status.json`` (its state) -- and writes, under ``<sweep>/tensorboard/``:

- ``tensorboard/``: the experiment (every override key with the values the sweep gave it, every metric any run has);
- ``tensorboard/<run>/``: one session per run folder: its overrides as hparams, its final metrics (the rows of
  ``results.csv``, nothing recomputed) as scalars at step 0, and its state (done -> success, failed -> failure,
  interrupted -> aborted, pending/running -> running).

A metric name is the table's ``metric``; where a run has several rows of one metric (a multi-β stage-3 run: the
sweep moved ``beta=<b>`` from the name into the ``beta`` column), the columns that tell them apart go back into
the name before its last component (``test/average/beta=0.3/clip``), as the run logged it. Override values that
are not a number, string or bool (lists, null) are written as their JSON text. The folder is rebuilt whole on
every call (written beside, then swapped in), so re-aggregating a sweep does not duplicate its sessions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from datetime import datetime
from pathlib import Path
from typing import Any

from neurovision.data.atomic import atomic_dir
from neurovision.runs.report import read_json_object

log = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"
DIGEST_FILE = ".inputs.sha256"  # what the view was written from
TABLE_COLUMNS = {"run", "seed", "metric", "value"}
#: status.json state -> tensorboard.plugins.hparams.api_pb2.Status name
STATES = {"done": "STATUS_SUCCESS", "failed": "STATUS_FAILURE", "interrupted": "STATUS_ABORTED",
          "running": "STATUS_RUNNING", "pending": "STATUS_RUNNING"}

HParamValue = bool | float | str


def hparam_value(v: Any) -> HParamValue:
    """An override value as TensorBoard stores it: numbers, strings and bools as they are, anything else (a
    list, a mapping, null) as its JSON text."""
    if isinstance(v, bool | str):
        return v
    if isinstance(v, int | float):
        return float(v)
    return json.dumps(v)


def run_metrics(rows: Any) -> dict[str, float]:
    """A run's rows of ``results.csv`` -> {metric name: value} (see the module docstring for repeated names)."""
    if rows.empty:
        return {}
    extra = [c for c in rows.columns if c not in TABLE_COLUMNS]
    varying = [c for c in extra if rows[c].astype(str).nunique() > 1] if rows["metric"].duplicated().any() else []
    out: dict[str, float] = {}
    for rec in rows.to_dict("records"):
        name = str(rec["metric"])
        if varying:
            parts = name.split("/")
            parts[-1:-1] = [f"{c}={_label(rec[c])}" for c in varying]
            name = "/".join(parts)
        out[name] = float(rec["value"])
    return out


def _label(v: Any) -> str:
    if isinstance(v, float) and v.is_integer():
        return f"{v:g}"
    return str(v)


def _uniform(sessions: list[dict[str, HParamValue]]) -> list[dict[str, HParamValue]]:
    """One type per key across the runs (TensorBoard's domains are typed): a key whose values mix types gets
    them all as text."""
    types: dict[str, set[type]] = {}
    for overrides in sessions:
        for k, v in overrides.items():
            types.setdefault(k, set()).add(type(v))
    mixed = {k for k, ts in types.items() if len(ts) > 1}
    return [{k: (v if k not in mixed or isinstance(v, str) else json.dumps(v)) for k, v in o.items()}
            for o in sessions]


def _epoch(stamp: Any) -> float | None:
    try:
        return datetime.fromisoformat(str(stamp)).timestamp()
    except ValueError:
        return None


def write_hparams(sweep_out: str | os.PathLike[str]) -> Path:
    """Write the HParams view of the finished sweep folder ``sweep_out``; returns ``<sweep_out>/tensorboard``.

    Raises:
        FileNotFoundError: ``sweep_out`` has no ``results.csv``.
        ValueError: a run's ``overrides.json`` / ``status.json`` is unreadable (the message names the file).
    """
    import pandas as pd
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
    from tensorboard.plugins.hparams import summary_v2 as hp
    from torch.utils.tensorboard import SummaryWriter

    out = Path(sweep_out)
    table = out / "results.csv"
    if not table.is_file():
        raise FileNotFoundError(f"{table}: no results table (run or aggregate the sweep first)")
    results = pd.read_csv(table, keep_default_na=False, na_values=[""])
    missing = {"run", "metric", "value"} - set(results.columns)
    if missing:
        raise ValueError(f"{table}: missing columns {', '.join(sorted(missing))}")
    run_dirs = sorted(p.parent for p in out.glob("*/overrides.json"))
    known = {d.name for d in run_dirs}
    stray = sorted(set(results["run"].astype(str)) - known)
    if stray:
        log.warning("%s: no run folder (overrides.json) for %s: left out of the HParams view", table, ", ".join(stray))

    statuses = [read_json_object(d / "status.json") or {"state": "pending"}
                for d in run_dirs]
    all_overrides = _uniform([{k: hparam_value(v) for k, v in (read_json_object(d / "overrides.json") or {}).items()}
                              for d in run_dirs])
    sessions = [(d.name, o, run_metrics(results[results["run"].astype(str) == d.name]), st)
                for d, o, st in zip(run_dirs, all_overrides, statuses, strict=True)]
    domains: dict[str, set[HParamValue]] = {}
    for o in all_overrides:
        for k, v in o.items():
            domains.setdefault(k, set()).add(v)
    hparams = {k: hp.HParam(k, hp.Discrete(sorted(vs, key=str))) for k, vs in domains.items()}
    metric_names = list(dict.fromkeys(m for _, _, metrics, _ in sessions for m in metrics))

    # the view is a function of these inputs: unchanged inputs leave the folder (and its files' times) as it is,
    # so re-running a finished sweep touches nothing
    digest = hashlib.sha256(json.dumps([[n, o, m, s.get("state"), s.get("started"), s.get("updated")]
                                        for n, o, m, s in sessions], sort_keys=True, default=str).encode()).hexdigest()
    target = out / TENSORBOARD_DIR
    stamp = target / DIGEST_FILE
    if stamp.is_file() and stamp.read_text().strip() == digest:
        return target
    with atomic_dir(target) as tmp:  # written whole, then renamed over the previous view
        with SummaryWriter(str(tmp)) as w:
            w.file_writer.add_summary(hp.hparams_config_pb(
                hparams=list(hparams.values()), metrics=[hp.Metric(m, display_name=m) for m in metric_names]))
        for name, overrides, metrics, status in sessions:
            with SummaryWriter(str(tmp / name)) as w:
                start = _epoch(status.get("started") or status.get("updated"))
                w.file_writer.add_summary(hp.hparams_pb({hparams[k]: v for k, v in overrides.items()},
                                                        trial_id=name, start_time_secs=start))
                for m, v in metrics.items():
                    if math.isfinite(v):
                        w.add_scalar(m, v, global_step=0)
                state = STATES.get(str(status.get("state")), "STATUS_UNKNOWN")
                end = plugin_data_pb2.HParamsPluginData(session_end_info=plugin_data_pb2.SessionEndInfo(
                    status=api_pb2.Status.Value(state), end_time_secs=_epoch(status.get("updated")) or 0.0))
                w.file_writer.add_summary(Summary(value=[Summary.Value(
                    tag=metadata.SESSION_END_INFO_TAG, metadata=metadata.create_summary_metadata(end))]))
        (tmp / DIGEST_FILE).write_text(digest + "\n")
    log.info("HParams of %d runs (%d metrics): tensorboard --logdir %s", len(sessions), len(metric_names), out)
    return target


__all__ = ["hparam_value", "run_metrics", "write_hparams"]
