"""``neurovision sweep <sweep.yaml>``: reproducible ablation sweeps (grid x runs x seeds) of LightningCLI runs.

Sweep YAML (every key optional; an unknown key is an error naming the file and the key)::

    configs: [experiments/stage1_vit3d.yaml, experiments/presets/stage1_vit3d_tiny.yaml]  # the -c files, in order
    commands: [fit, test]     # default; fit first, each later command gets --ckpt_path=<the fit's latest.ckpt>;
                              # without fit ([test], [validate, test]) pass ckpt_path in args/grid/runs
    args: ["--data.init_args.store=data/phantom_tiny.h5"]        # extra CLI args for every run
    grid:                     # cartesian product of dotted overrides (each value a list)
      model.init_args.dim: [32, 64]
    runs:                     # explicit override dicts, each combined with every grid point (default [{}])
      - {model.init_args.contrastive: none}
      - {model.init_args.contrastive: infonce, model.init_args.contrastive_weight: 0.1}
    seeds: [0, 1]             # -> --seed_everything=<seed>; absent: the config's seed (no flag)
    out: runs/sweeps/stage1_tiny     # default runs/sweeps/<sweep file stem>; --out wins
    metrics: ["test/*", "!test/*/sub-*"]   # fnmatch globs of metric names (* also matches /); !glob excludes
    aggregate_only: false     # true: only rebuild the tables (like --aggregate_only)
    after: [neurovision.runs.beta_figures.figures]   # registered functions called with the out folder after the tables
    devices_per_run: 8        # each run is one multi-GPU job: --trainer.devices=8 (--trainer.strategy=ddp when > 1)

``configs`` paths are taken relative to the working directory, else to the sweep file's folder; ``args`` and
override values are passed as they are (relative paths in them are relative to the working directory, where
every run is started). Override keys are LightningCLI's dotted keys (``model.init_args.dim``, ``trainer.max_epochs``,
``ckpt_path``); a key may not be in both ``grid`` and a ``runs`` entry; seeds go in ``seeds``, not
``seed_everything``. Runs are ordered runs x grid x seeds (seeds innermost).

``devices_per_run: n`` makes every run one job on ``n`` devices, ``--trainer.devices=n`` (and
``--trainer.strategy=ddp`` when n > 1) after ``args``: the runs then go one after another, each using all
``n`` GPUs (e.g. a stage-3 β-sweep cell sharded over the node's 8 GPUs), instead of one run per GPU. With
``--parallel p`` the visible GPUs are split into p groups of n (``CUDA_VISIBLE_DEVICES`` per run; p·n must not
exceed the GPUs). ``trainer.devices``/``trainer.strategy`` may then not be set in ``args``, ``grid`` or ``runs``.
The device count is not part of a run's recorded settings (a run's numbers must not depend on it), so a sweep
started on one GPU per run resumes with ``devices_per_run``.

Before anything runs, every run still to do is parsed by the real LightningCLI parser (nothing instantiated): an
override the config does not accept stops the sweep with LightningCLI's message and the run's name.

Layout (``<run>`` = ``<out>/<name>``, the name built from the overrides and the seed, e.g. ``dim=32__seed=0``:
each key by its last dotted component, ``init_args`` skipped, longer when that is ambiguous; characters unsafe in
a file name become ``-`` and then a hash of the full mapping is appended)::

    <out>/sweep.yaml                  copy of the sweep file
    <out>/results.csv                 run, seed, <override columns...>, metric, value   (one row per run x metric;
                                      a metric-name component ``<key>=<value>``, e.g. ``test/average/beta=0.93/ssim``
                                      of a multi-β stage-3 run, becomes the column ``<key>`` of that row, the
                                      override's value replaced, and leaves the name: ``test/average/ssim``)
    <out>/summary.csv                 <override columns...>, metric, mean, sd, n         (over seeds; sd ddof=1)
    <out>/results.parquet             when pyarrow is importable
    <run>/overrides.json              {dotted key: value, ..., seed_everything: seed}
    <run>/status.json                 state (pending|running|done|failed|interrupted), per-command record, metrics
    <run>/config.yaml                 the resolved config of the run's first command (LightningCLI's own)
    <run>/metrics_table.csv           the commands' MetricsTable rows, in command order (epoch, step, stage, ...)
    <run>/<cmd>.log                   stdout + stderr of each command (appended on a retry)
    <run>/<cmd>/                      the command's log dir (default_root_dir and logger dir): config.yaml,
                                      metrics_table.csv, TensorBoard events, checkpoints/ (fit)
    <run>/fit/checkpoints/latest.ckpt the end of the latest finished epoch (resumed from, tested)

Each command is ``[sys.executable, "-m", "neurovision.cli", cmd, -c ..., *args, *overrides, --seed_everything=S,
--trainer.default_root_dir=<run>/<cmd>, <logger>, --ckpt_path=...]`` started in the working directory. The logger
is pointed at ``<run>/<cmd>``: a TensorBoardLogger/CSVLogger gets ``save_dir=<run>, name=null, version=<cmd>``
(a fixed version: a resumed fit writes into the same dir), another logger class ``save_dir=<run>/<cmd>``; a
config with ``logger: true`` (Lightning's default) gets the logger Lightning would make, explicitly; ``logger:
false`` stays false (everything then goes to ``default_root_dir``). The fit also gets a
:class:`LatestCheckpoint` callback (``--trainer.callbacks+=``): ``latest.ckpt``, rewritten at the end of every
training epoch, is what an interrupted fit resumes from and what later commands evaluate -- the weights at the
end of the fit, whatever the config's ModelCheckpoint monitors (its ``last.ckpt`` is kept but not used: since
Lightning 2.6 it follows the top-k saves, and it differs between an interrupted and an uninterrupted fit). A
config ModelCheckpoint must not set ``dirpath`` (runs would share it).

Re-running a sweep skips runs whose commands are all done (no process started) and resumes the others: a fit
that is not done restarts with ``--ckpt_path=<its latest.ckpt>`` when there is one (from scratch, its dir
cleared, when not); a done fit is not redone when only later commands are missing; a later command is rerun
whole. Failed runs are retried the same way. A run recorded with other settings (configs, args, overrides,
seed) is an error (remove its dir or use another ``--out``). A run's metric value is the last row of that metric
in ``<run>/metrics_table.csv`` (test metrics come from the test command); only done runs are aggregated. Then
each ``after`` function is called with the out folder (also with ``--aggregate_only``; not with ``--dry_run``).

A sweep file is data, not code: ``after`` names are looked up in :data:`AFTER_HOOKS`, the registry of the
project's own summary/figure functions; any other name stops the sweep (exit 2, naming the file and the key)
before anything runs, and its module is never imported (importing runs code). A new hook is added to
:data:`AFTER_HOOKS` in code (or, from Python, :func:`register_after`), never by a sweep file.

An unreadable checkpoint does not keep a run failing on every re-run: before a fit is resumed (or a later command
evaluates it) its ``latest.ckpt`` is checked (:func:`checkpoint_problem`: the torch zip's structure and its pickle
record, not the tensor data, so it costs a few reads whatever the size). An unreadable one (truncated, garbage)
is set aside as ``<run>/latest.ckpt.corrupt-<n>`` (one line on stderr and in ``fit.log``, recorded in
status.json) and the fit restarts from the newest other readable checkpoint of ``<run>/fit/checkpoints``
(e.g. the config's ModelCheckpoint's) if there is one, else from scratch in a clean dir; commands after the fit
are then rerun on the new fit. ``latest.ckpt`` itself is written to a hidden ``.latest.ckpt.partial`` and renamed
over the old one, so a process killed mid-write leaves the previous epoch's file whole.

Exit status: 0 all runs done, 1 a run or an ``after`` function failed (the summary names it and its log), 2 a bad
sweep or override (nothing is started).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import fnmatch
import hashlib
import io
import itertools
import json
import logging
import math
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neurovision.data.atomic import atomic_path, write_json

log = logging.getLogger(__name__)

TRAINER_COMMANDS = ("fit", "validate", "test", "predict")
SWEEP_KEYS = ("configs", "commands", "args", "grid", "runs", "seeds", "out", "metrics", "aggregate_only", "after",
              "devices_per_run")
DEVICE_KEYS = ("trainer.devices", "trainer.strategy")  # set by devices_per_run
RESERVED_COLUMNS = {"run", "seed", "metric", "value", "mean", "sd", "std", "n"}
TABLE_FIELDS = ["epoch", "step", "stage", "metric", "value"]
MAX_NAME = 120


class SweepError(ValueError):
    """A sweep that cannot run: a bad sweep file, an override the config rejects, a conflicting run dir."""


AfterHook = Callable[[Path], Any]
# The functions a sweep file's ``after`` may name: name -> "module:function" (imported only when it is called,
# so loading a sweep imports nothing) or the function itself (:func:`register_after`). A sweep file is shared
# data; were ``after`` any dotted name, ``after: [os.system]`` with a crafted ``out`` would run a shell command.
AFTER_HOOKS: dict[str, str | AfterHook] = {
    "neurovision.runs.beta_figures.figures": "neurovision.runs.beta_figures:figures",
}


def register_after(fn: AfterHook, name: str | None = None) -> AfterHook:
    """Allow ``fn`` as an ``after`` hook under ``name`` (default ``<module>.<qualname>``); returns ``fn``, so it
    also works as a decorator. Code that calls this is trusted (it already runs); a sweep file cannot."""
    AFTER_HOOKS[name or f"{fn.__module__}.{fn.__qualname__}"] = fn
    return fn


def _after_function(name: str) -> AfterHook:
    """The registered function of an ``after`` name (the caller checked that it is registered)."""
    target = AFTER_HOOKS[name]
    if callable(target):
        return target
    import importlib

    mod, _, attr = target.partition(":")
    return getattr(importlib.import_module(mod), attr)


# ---------------------------------------------------------------------------------------------- sweep file
@dataclass
class Sweep:
    path: Path
    configs: list[str] = field(default_factory=list)  # resolved, absolute
    commands: list[str] = field(default_factory=lambda: ["fit", "test"])
    args: list[str] = field(default_factory=list)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=lambda: [{}])
    seeds: list[int | None] = field(default_factory=lambda: [None])
    out: str | None = None
    metrics: list[str] = field(default_factory=lambda: ["test/*"])
    aggregate_only: bool = False
    after: list[str] = field(default_factory=list)
    devices_per_run: int | None = None


@dataclass
class Run:
    name: str
    overrides: dict[str, Any]  # dotted key -> value (grid point, then the runs entry)
    seed: int | None
    dir: Path = Path()

    @property
    def mapping(self) -> dict[str, Any]:
        """The full override mapping (written to ``overrides.json``)."""
        m = dict(self.overrides)
        if self.seed is not None:
            m["seed_everything"] = self.seed
        return m


def _str_list(path: Path, key: str, value: Any) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SweepError(f"{path}: {key}: expected a list of strings, got {value!r}")
    return list(value)


def _key(path: Path, where: str, key: Any) -> str:
    if not isinstance(key, str) or not key.strip("-"):
        raise SweepError(f"{path}: {where}: override keys are dotted strings, got {key!r}")
    key = key.lstrip("-")
    if key in ("seed_everything", "config", "c"):
        raise SweepError(f"{path}: {where}: {key!r} cannot be an override (use seeds: / configs:)")
    return key


def load_sweep(path: str | os.PathLike[str]) -> Sweep:
    """Read and validate a sweep YAML (see the module docstring)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise SweepError(f"{path}: sweep file does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SweepError(f"{path}: not valid YAML: {e}") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: expected a mapping of {', '.join(SWEEP_KEYS)}")
    unknown = [k for k in raw if k not in SWEEP_KEYS]
    if unknown:
        raise SweepError(f"{path}: unknown key {unknown[0]!r} (allowed: {', '.join(SWEEP_KEYS)})")
    sw = Sweep(path=path)
    for c in _str_list(path, "configs", raw.get("configs", [])):
        p = Path(c)
        cands = [p] if p.is_absolute() else [Path.cwd() / p, path.parent / p]
        found = next((q for q in cands if q.is_file()), None)
        if found is None:
            raise SweepError(f"{path}: configs: {c} does not exist (relative to the working directory or the sweep file)")
        sw.configs.append(str(found.resolve()))
    if "commands" in raw:
        sw.commands = _str_list(path, "commands", raw["commands"])
    bad = [c for c in sw.commands if c not in TRAINER_COMMANDS]
    if bad or not sw.commands or len(set(sw.commands)) != len(sw.commands):
        raise SweepError(f"{path}: commands: expected distinct commands among {', '.join(TRAINER_COMMANDS)}, "
                         f"got {sw.commands!r}")
    if "fit" in sw.commands and sw.commands[0] != "fit":
        raise SweepError(f"{path}: commands: fit must come first (later commands use its checkpoint)")
    sw.args = _str_list(path, "args", raw.get("args", []))
    grid = raw.get("grid") or {}
    if not isinstance(grid, dict):
        raise SweepError(f"{path}: grid: expected a mapping of dotted key -> list of values")
    for k, vals in grid.items():
        key = _key(path, "grid", k)
        if not isinstance(vals, list) or not vals:
            raise SweepError(f"{path}: grid: {k}: expected a non-empty list of values, got {vals!r}")
        sw.grid[key] = vals
    runs = raw.get("runs")
    if runs is not None:
        if not isinstance(runs, list) or not runs or not all(isinstance(r, dict) for r in runs):
            raise SweepError(f"{path}: runs: expected a non-empty list of mappings (dotted key: value)")
        sw.runs = []
        for i, r in enumerate(runs):
            entry = {_key(path, f"runs[{i}]", k): v for k, v in r.items()}
            both = sorted(set(entry) & set(sw.grid))
            if both:
                raise SweepError(f"{path}: runs[{i}]: {both[0]!r} is also a grid key")
            sw.runs.append(entry)
    if "seeds" in raw:
        seeds = raw["seeds"]
        seeds = [seeds] if isinstance(seeds, int) and not isinstance(seeds, bool) else seeds
        if (not isinstance(seeds, list) or not seeds
                or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
                or len(set(seeds)) != len(seeds)):
            raise SweepError(f"{path}: seeds: expected a list of distinct integers, got {seeds!r}")
        sw.seeds = list(seeds)
    if raw.get("out") is not None:
        if not isinstance(raw["out"], str):
            raise SweepError(f"{path}: out: expected a path, got {raw['out']!r}")
        sw.out = raw["out"]
    if "metrics" in raw:
        sw.metrics = _str_list(path, "metrics", raw["metrics"])
    if "aggregate_only" in raw:
        if not isinstance(raw["aggregate_only"], bool):
            raise SweepError(f"{path}: aggregate_only: expected true or false")
        sw.aggregate_only = raw["aggregate_only"]
    sw.after = _str_list(path, "after", raw.get("after", []))
    refused = [a for a in sw.after if a not in AFTER_HOOKS]  # looked up by name only: nothing is imported
    if refused:
        raise SweepError(f"{path}: after: {refused[0]!r} is not an allowed after function (a sweep file is data, "
                         f"not code; allowed: {', '.join(sorted(AFTER_HOOKS))}; new ones are registered in "
                         "neurovision.runs.sweep.AFTER_HOOKS)")
    if raw.get("devices_per_run") is not None:
        n = raw["devices_per_run"]
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise SweepError(f"{path}: devices_per_run: expected a positive integer (devices per run), got {n!r}")
        sw.devices_per_run = n
        keys = [*sw.grid, *(k for r in sw.runs for k in r),
                *(a.lstrip("-").split("=", 1)[0] for a in sw.args if a.startswith("--"))]
        clash = next((k for k in keys if k in DEVICE_KEYS), None)
        if clash is not None:
            raise SweepError(f"{path}: devices_per_run: {clash!r} is also set in args/grid/runs (devices_per_run "
                             "sets trainer.devices and trainer.strategy)")
    return sw


# ----------------------------------------------------------------------------------------------- expansion
def short_names(keys: list[str]) -> dict[str, str]:
    """Column/run-name label of each dotted key: its last component (``init_args`` skipped), longer suffixes
    while that is ambiguous or a reserved column name, the whole key as the last resort."""
    parts = {k: [p for p in k.split(".") if p != "init_args"] or [k] for k in keys}
    out: dict[str, str] = {}
    for k in keys:
        out[k] = k
        for n in range(1, len(parts[k]) + 1):
            cand = ".".join(parts[k][-n:])
            if cand in RESERVED_COLUMNS:
                continue
            if all(".".join(parts[o][-n:]) != cand for o in keys if o != k):
                out[k] = cand
                break
    return out


def _label(v: Any) -> tuple[str, bool]:
    """A value as it appears in a run name, and whether that rendering is lossy (then the name gets a hash): a
    path by its last component, a list of scalars comma-joined, anything else as compact JSON."""
    if isinstance(v, str):
        text = v.rstrip("/").rsplit("/", 1)[-1] if "/" in v.rstrip("/") else v
    elif isinstance(v, (list, tuple)) and all(isinstance(x, (str, int, float, bool)) or x is None for x in v):
        return ",".join(_label(x)[0] for x in v), True
    else:
        text = json.dumps(v, separators=(",", ":"), sort_keys=True)
    safe = re.sub(r"-{2,}", "-", re.sub(r"[^A-Za-z0-9._+,=-]", "-", text)).strip("-") or "-"
    return safe, safe != v if isinstance(v, str) else safe != text


def _hash(overrides: dict[str, Any], seed: int | None) -> str:
    canon = json.dumps({"overrides": overrides, "seed": seed}, sort_keys=True, default=str)
    return hashlib.sha1(canon.encode()).hexdigest()[:8]


def run_name(overrides: dict[str, Any], seed: int | None, labels: dict[str, str]) -> str:
    """``<key>=<value>__...__seed=<seed>`` (``base`` when empty), filesystem-safe; a hash of the full mapping is
    appended when a value had to be altered (see :func:`_label`) or the name is too long."""
    parts, lossy = [], False
    for k, v in overrides.items():
        text, changed = _label(v)
        lossy |= changed
        parts.append(f"{re.sub(r'[^A-Za-z0-9._+-]', '-', labels[k])}={text}")
    if seed is not None:
        parts.append(f"seed={seed}")
    name = "__".join(parts) or "base"
    if lossy or len(name) > MAX_NAME or name.startswith("."):
        name = f"{name[:MAX_NAME - 10]}__{_hash(overrides, seed)}"
    return name


def override_keys(sweep: Sweep) -> list[str]:
    keys = list(sweep.grid)
    for r in sweep.runs:
        keys += [k for k in r if k not in keys]
    return keys


def expand(sweep: Sweep, out: Path | None = None) -> list[Run]:
    """The runs of a sweep, in order (runs x grid x seeds, seeds innermost)."""
    labels = short_names(override_keys(sweep))
    gkeys = list(sweep.grid)
    runs: list[Run] = []
    seen: dict[str, Run] = {}
    for entry in sweep.runs:
        for point in itertools.product(*(sweep.grid[k] for k in gkeys)):
            overrides = {**dict(zip(gkeys, point, strict=True)), **entry}
            for seed in sweep.seeds:
                r = Run(run_name(overrides, seed, labels), overrides, seed)
                if r.name in seen:
                    other = seen[r.name]
                    if json.dumps([other.overrides, other.seed], sort_keys=True, default=str) == \
                            json.dumps([overrides, seed], sort_keys=True, default=str):
                        raise SweepError(f"{sweep.path}: run {r.name} appears twice (same overrides and seed)")
                    r.name = f"{r.name}__{_hash(overrides, seed)}"  # another mapping, the same rendering
                seen[r.name] = r
                runs.append(r)
    for r in runs:
        if out is not None:
            r.dir = out / r.name
    return runs


# ------------------------------------------------------------------------------------------- command lines
def cli_value(v: Any) -> str:
    """An override value as LightningCLI (yaml parser mode) reads it back: strings as they are unless YAML would
    read them as something else (then JSON-quoted), everything else as JSON."""
    import yaml

    if isinstance(v, str):
        try:
            same = yaml.safe_load(v) == v
        except yaml.YAMLError:
            same = False
        return v if same else json.dumps(v)
    return json.dumps(v)


def base_argv(sweep: Sweep, run: Run, cmd: str) -> list[str]:
    """The command line of ``cmd`` for ``run`` without the run-dir/logger/checkpoint parts."""
    argv = [cmd]
    for c in sweep.configs:
        argv += ["-c", c]
    argv += sweep.args
    argv += device_args(sweep)
    argv += [f"--{k}={cli_value(v)}" for k, v in run.overrides.items()]
    if run.seed is not None:
        argv.append(f"--seed_everything={run.seed}")
    return argv


def device_args(sweep: Sweep) -> list[str]:
    """``--trainer.devices=n`` (and ``--trainer.strategy=ddp`` for n > 1) of ``devices_per_run``; [] without it."""
    n = sweep.devices_per_run
    if n is None:
        return []
    return [f"--trainer.devices={n}", *(["--trainer.strategy=ddp"] if n > 1 else [])]


def gpu_groups(gpus: list[str], parallel: int, per_run: int | None) -> list[str]:
    """``CUDA_VISIBLE_DEVICES`` of each of the ``parallel`` slots: one GPU each (round robin) without
    ``per_run``; with it, disjoint groups of ``per_run`` GPUs (SweepError when there are too few). No GPUs: []."""
    if not gpus:
        return []
    if per_run is None:
        return [gpus[i % len(gpus)] for i in range(parallel)]
    if parallel * per_run > len(gpus):
        raise SweepError(f"devices_per_run: {per_run} x --parallel {parallel} needs {parallel * per_run} GPUs, "
                         f"{len(gpus)} visible ({','.join(gpus)})")
    return [",".join(gpus[i * per_run:(i + 1) * per_run]) for i in range(parallel)]


def _dir_logger(spec: dict[str, Any], run_dir: Path, cmd: str) -> dict[str, Any]:
    """``spec`` (class_path/init_args) pointed at ``<run_dir>/<cmd>``."""
    spec = json.loads(json.dumps(spec, default=str))
    init = spec.setdefault("init_args", {}) or {}
    spec["init_args"] = init
    if _is_dir_logger(spec.get("class_path", "")):
        init.update(save_dir=str(run_dir), name=None, version=cmd)
    elif "save_dir" in init:
        init["save_dir"] = str(run_dir / cmd)
    return spec


def _loaded_class(class_path: str) -> Any:
    """The object ``class_path`` names if its module is already imported (the LightningCLI parser imported it
    when it checked the config), else None: the sweep itself never imports a module a config names."""
    mod, _, name = class_path.rpartition(".")
    return getattr(sys.modules.get(mod), name, None) if mod else None


def _is_dir_logger(class_path: str) -> bool:
    """TensorBoardLogger / CSVLogger (or a subclass): log dir = save_dir/name/version."""
    cls = _loaded_class(class_path)
    try:
        from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
    except ImportError:
        cls = None
    if cls is None:
        return class_path.endswith(("TensorBoardLogger", "CSVLogger"))
    return isinstance(cls, type) and issubclass(cls, (TensorBoardLogger, CSVLogger))


def logger_args(logger: Any, run_dir: Path, cmd: str) -> list[str]:
    """CLI args pointing the parsed ``trainer.logger`` value at ``<run_dir>/<cmd>`` (see the module docstring)."""
    if logger is False:
        return []
    if logger is None or logger is True:
        try:
            from lightning.fabric.loggers.tensorboard import _TENSORBOARD_AVAILABLE, _TENSORBOARDX_AVAILABLE

            tb = bool(_TENSORBOARD_AVAILABLE or _TENSORBOARDX_AVAILABLE)
        except ImportError:
            tb = False
        cls = "lightning.pytorch.loggers.TensorBoardLogger" if tb else "lightning.pytorch.loggers.CSVLogger"
        spec = _dir_logger({"class_path": cls, "init_args": {}}, run_dir, cmd)
        return [f"--trainer.logger={json.dumps(spec)}"]
    if isinstance(logger, list):
        specs = [_dir_logger(_as_dict(x), run_dir, cmd) for x in logger]
        return [f"--trainer.logger={json.dumps(specs)}"]
    spec = _dir_logger(_as_dict(logger), run_dir, cmd)
    return [f"--trainer.logger.init_args.{k}={cli_value(v)}" for k, v in spec["init_args"].items()
            if k in ("save_dir", "name", "version")]


def _as_dict(x: Any) -> Any:
    if hasattr(x, "as_dict"):
        return x.as_dict()
    if isinstance(x, dict):
        return {k: _as_dict(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_as_dict(v) for v in x]
    return x


# ---------------------------------------------------------------------------------------- resume checkpoint
LATEST = "latest"  # <run>/fit/checkpoints/latest.ckpt (callbacks.latest_checkpoint)


def resume_ckpt(run_dir: Path) -> Path | None:
    """The fit's ``latest.ckpt`` (see :class:`LatestCheckpoint`), if any."""
    p = run_dir / "fit" / "checkpoints" / f"{LATEST}.ckpt"
    return p if p.is_file() else None


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` is not a readable torch checkpoint (None when it is).

    A checkpoint is a zip (``torch.save``'s format): a truncated file has lost the zip's central directory (at
    its end), garbage has none. Checked here: the central directory, every record's local header and extent
    within the file, and the pickle record (``data.pkl``, CRC-checked). The tensor records' bytes are not read,
    so the check costs a few small reads whatever the checkpoint's size, and nothing is unpickled (no code
    runs); what it cannot see (a flipped bit inside a tensor) only ``torch.load`` of the whole file would."""
    import struct
    import zipfile
    import zlib

    try:
        size = path.stat().st_size
        if size == 0:
            return "empty file"
        with zipfile.ZipFile(path) as z, open(path, "rb") as f:
            infos = z.infolist()
            pkl = next((i for i in infos if i.filename == "data.pkl" or i.filename.endswith("/data.pkl")), None)
            if pkl is None:
                return "no data.pkl record: not a torch checkpoint"
            for i in infos:
                f.seek(i.header_offset)
                head = f.read(30)
                if len(head) < 30 or head[:4] != b"PK\x03\x04":
                    return f"record {i.filename}: no local header at offset {i.header_offset}"
                name_len, extra_len = struct.unpack("<HH", head[26:30])
                if i.header_offset + 30 + name_len + extra_len + i.compress_size > size:
                    return f"record {i.filename}: extends past the end of the file ({size} bytes)"
            z.read(pkl)  # raises on a bad CRC
    except zipfile.BadZipFile as e:
        return f"not a complete zip archive, truncated or not a checkpoint ({e})"
    except (OSError, EOFError, zlib.error, ValueError, NotImplementedError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def older_checkpoint(run_dir: Path) -> Path | None:
    """The newest readable checkpoint of the fit other than ``latest.ckpt`` (e.g. the config's ModelCheckpoint's
    ``last.ckpt`` or best one): the last good state of a fit whose ``latest.ckpt`` is unreadable."""
    folder = run_dir / "fit" / "checkpoints"
    if not folder.is_dir():
        return None
    cands = [p for p in folder.glob("*.ckpt") if p.is_file() and p.name != f"{LATEST}.ckpt"]
    for p in sorted(cands, key=lambda q: (q.stat().st_mtime_ns, q.name), reverse=True):
        if checkpoint_problem(p) is None:
            return p
    return None


@dataclass
class ResumePoint:
    """Where the fit of a run starts: ``ckpt`` (None: from scratch), and when ``latest.ckpt`` is unreadable
    (``problem``), that file (``bad``), which is to be set aside."""
    ckpt: Path | None
    problem: str | None = None
    bad: Path | None = None


def resume_point(run_dir: Path) -> ResumePoint:
    """Where the run's fit would start (see :class:`ResumePoint`); changes nothing (``--dry_run`` uses it)."""
    ck = resume_ckpt(run_dir)
    if ck is None:
        return ResumePoint(None)
    problem = checkpoint_problem(ck)
    if problem is None:
        return ResumePoint(ck)
    return ResumePoint(older_checkpoint(run_dir), problem, ck)


def set_aside(run: Run, point: ResumePoint) -> Path:
    """Move an unreadable ``latest.ckpt`` to ``<run>/latest.ckpt.corrupt-<n>`` (outside ``fit/``, which a restart
    from scratch clears) and say so on one stderr line and in ``fit.log``; the new path."""
    assert point.bad is not None
    n = 1
    while (run.dir / f"{point.bad.name}.corrupt-{n}").exists():
        n += 1
    dest = run.dir / f"{point.bad.name}.corrupt-{n}"
    os.replace(point.bad, dest)
    restart = f"resuming from {point.ckpt.relative_to(run.dir)}" if point.ckpt else "restarting the fit from scratch"
    msg = (f"neurovision sweep: run {run.name}: {point.bad.relative_to(run.dir)} is unreadable ({point.problem}); "
           f"set aside as {dest.name}, {restart}")
    from tqdm.auto import tqdm

    tqdm.write(msg, file=sys.stderr)
    with open(run.dir / "fit.log", "a") as f:
        f.write(f"\n===== {_now()} {msg}\n")
    return dest


def checkpoint_args(run_dir: Path) -> list[str]:
    spec = {"class_path": "callbacks.LatestCheckpoint", "init_args": {"dirpath": str(run_dir / "fit" / "checkpoints")}}
    return [f"--trainer.callbacks+={json.dumps(spec)}"]


# ------------------------------------------------------------------------------------------------ validation
class _Parser(Exception):
    pass


_PARSER: Any = None
_PARSER_LOCK = threading.Lock()


def lightning_parser() -> Any:
    """The ``neurovision`` LightningCLI parser (built once; nothing instantiated)."""
    global _PARSER
    with _PARSER_LOCK:
        if _PARSER is None:
            from neurovision.cli.lightning import NeuroVisionCLI

            class _ParseOnly(NeuroVisionCLI):
                def parse_arguments(self, parser: Any, args: Any) -> None:
                    raise _Parser(parser)

            try:
                _ParseOnly(args=["fit"])
            except _Parser as e:
                _PARSER = e.args[0]
        return _PARSER


def parse(argv: list[str]) -> Any:
    """``argv`` parsed by the LightningCLI parser: the subcommand's namespace; SweepError with the parser's
    message when it is rejected."""
    parser = lightning_parser()
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            cfg = parser.parse_args(argv)
    except SystemExit:
        msg = err.getvalue()
        msg = msg[msg.find("error:"):] if "error:" in msg else msg
        raise SweepError(msg.strip() or "rejected by the LightningCLI parser") from None
    return cfg[argv[0]]


@dataclass
class Plan:
    """What the parsed config decides for a run: its logger, its effective seed, the override columns' values."""
    logger: Any
    seed: Any
    resolved: dict[str, Any]
    checkpointing: bool = True


def plan_run(sweep: Sweep, run: Run, keys: list[str], check: bool = False) -> Plan:
    """Parse the run's first command with the real parser (SweepError naming the run when rejected); ``check``:
    also the whole command line the sweep will run (its run-dir, logger and checkpoint arguments)."""
    cmd = sweep.commands[0]
    try:
        cfg = parse(base_argv(sweep, run, cmd))
    except SweepError as e:
        raise SweepError(f"run {run.name}: `neurovision {cmd}` rejects its arguments:\n{e}") from None
    resolved: dict[str, Any] = {}
    for k in keys:
        try:
            resolved[k] = _as_dict(cfg[k])
        except (KeyError, TypeError, AttributeError):
            resolved[k] = None
    resolved = json.loads(json.dumps(resolved, default=str))
    _check_checkpointing(sweep, run, cfg)
    plan = Plan(logger=cfg.get("trainer.logger"), seed=cfg.get("seed_everything"), resolved=resolved,
                checkpointing=cfg.get("trainer.enable_checkpointing") is not False)
    if check:
        try:
            parse(command_argv(sweep, run, plan, cmd))
        except SweepError as e:
            raise SweepError(f"run {run.name}: `neurovision {cmd}` rejects the sweep's run-dir/logger/checkpoint "
                             f"arguments:\n{e}") from None
    return plan


def command_argv(sweep: Sweep, run: Run, plan: Plan, cmd: str, ckpt_path: Path | None = None) -> list[str]:
    """The full command line of ``cmd`` for ``run`` (after ``python -m neurovision.cli``)."""
    argv = [*base_argv(sweep, run, cmd), f"--trainer.default_root_dir={run.dir / cmd}",
            *logger_args(plan.logger, run.dir, cmd)]
    if cmd == "fit" and plan.checkpointing:
        argv += checkpoint_args(run.dir)
    if ckpt_path is not None:
        argv.append(f"--ckpt_path={ckpt_path}")
    return argv


def _check_checkpointing(sweep: Sweep, run: Run, cfg: Any) -> None:
    if "fit" not in sweep.commands:
        return
    if cfg.get("trainer.enable_checkpointing") is False and len(sweep.commands) > 1:
        raise SweepError(f"run {run.name}: {sweep.commands[1]} after fit needs the fit's checkpoint, but "
                         "trainer.enable_checkpointing is false")
    from lightning.pytorch.callbacks import ModelCheckpoint

    for cb in cfg.get("trainer.callbacks") or []:
        cb = _as_dict(cb)
        if not isinstance(cb, dict) or "class_path" not in cb:
            continue
        cls = _loaded_class(str(cb["class_path"]))
        dirpath = (cb.get("init_args") or {}).get("dirpath")
        if isinstance(cls, type) and issubclass(cls, ModelCheckpoint) and dirpath:
            raise SweepError(f"run {run.name}: ModelCheckpoint dirpath={dirpath!r} would be shared by all runs; "
                             "leave it unset (checkpoints then go to <run>/fit/checkpoints)")


# ------------------------------------------------------------------------------------------------ run state
def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def spec_of(sweep: Sweep, run: Run) -> dict[str, Any]:
    """What a run's results depend on (compared with the recorded one on a re-run)."""
    return json.loads(json.dumps({"configs": sweep.configs, "args": sweep.args, "overrides": run.overrides,
                                  "seed": run.seed}, default=str))


def read_status(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / "status.json").read_text())
    except (OSError, ValueError):
        return None


def cmd_done(status: dict[str, Any] | None, cmd: str) -> bool:
    return status is not None and (status.get("commands") or {}).get(cmd, {}).get("state") == "done"


def run_done(sweep: Sweep, status: dict[str, Any] | None) -> bool:
    return all(cmd_done(status, c) for c in sweep.commands)


def describe(sweep: Sweep, run: Run, status: dict[str, Any] | None) -> tuple[str, str]:
    """(state, next action) of a run."""
    if status is None:
        return "pending", " -> ".join(sweep.commands)
    if run_done(sweep, status):
        return "done", "skip"
    state = status.get("state", "pending")
    todo = [c for c in sweep.commands if not cmd_done(status, c)]
    if "fit" in sweep.commands:
        point = resume_point(run.dir)
        if point.bad is not None:  # the fit and everything after it are redone
            todo = list(sweep.commands)
            start = f"resume from {point.ckpt.relative_to(run.dir)}" if point.ckpt else "from scratch"
            todo[0] = f"fit ({point.bad.name} unreadable: set aside, {start})"
        elif todo[0] == "fit" and point.ckpt is not None:
            todo[0] = f"fit (resume from {point.ckpt.relative_to(run.dir)})"
    state = {"running": "interrupted", "done": "partial"}.get(state, state)  # done: commands were added since
    return state, " -> ".join(todo)


def combine_tables(run_dir: Path, commands: list[str]) -> list[dict[str, str]]:
    """The commands' MetricsTable rows in command order (rows repeated from a restored checkpoint dropped)."""
    rows: list[dict[str, str]] = []
    seen: set[tuple[str, ...]] = set()
    for cmd in commands:
        folder = run_dir / cmd
        table = folder / "metrics_table.csv"
        if not table.is_file():
            found = sorted(folder.rglob("metrics_table.csv"), key=lambda p: p.stat().st_mtime_ns) if folder.is_dir() else []
            if not found:
                continue
            table = found[-1]
        with open(table, newline="") as f:
            for r in csv.DictReader(f):
                key = tuple(str(r.get(k, "")) for k in TABLE_FIELDS)
                if key not in seen:
                    seen.add(key)
                    rows.append({k: r.get(k, "") for k in TABLE_FIELDS})
    return rows


def final_metrics(rows: list[dict[str, str]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for r in rows:
        try:
            out[r["metric"]] = float(r["value"])
        except (TypeError, ValueError):
            continue
    return out


def write_table(path: Path, rows: list[dict[str, Any]], fields: list[str]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


# ------------------------------------------------------------------------------------------------- launching
_ACTIVE: set[subprocess.Popen] = set()
_ACTIVE_LOCK = threading.Lock()
_STOP = threading.Event()  # set when the sweep is interrupted: no new process, the running ones terminated


def _launch(argv: list[str], log: Path, env: dict[str, str]) -> int:
    """Run ``argv`` with stdout+stderr appended to ``log``; its exit status (the one place a process starts)."""
    with open(log, "a") as f:
        f.write(f"\n===== {_now()} {shlex.join(argv)}\n")
        f.flush()
        p = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        with _ACTIVE_LOCK:
            _ACTIVE.add(p)
            if _STOP.is_set():  # interrupted while starting: the interrupt handler may not have seen it
                p.terminate()
        try:
            return p.wait()
        finally:
            with _ACTIVE_LOCK:
                _ACTIVE.discard(p)


def _gpus() -> list[str]:
    """The CUDA devices runs can be spread over (``CUDA_VISIBLE_DEVICES`` entries, else all)."""
    vis = os.environ.get("CUDA_VISIBLE_DEVICES")
    if vis is not None:
        return [d.strip() for d in vis.split(",") if d.strip() and d.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001  (no torch / no driver: no GPUs)
        return []


def _tail(log: Path, n: int = 12) -> str:
    try:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return "\n".join(lines[-n:])


class Runner:
    def __init__(self, sweep: Sweep, plans: dict[str, Plan]) -> None:
        self.sweep, self.plans = sweep, plans

    def execute(self, run: Run, env: dict[str, str]) -> dict[str, Any]:
        """Do what is left of ``run``; its final status."""
        sweep, plan = self.sweep, self.plans[run.name]
        run.dir.mkdir(parents=True, exist_ok=True)
        st = read_status(run.dir) or {}
        st.update(run=run.name, overrides=run.overrides, seed=run.seed if run.seed is not None else plan.seed,
                  spec=spec_of(sweep, run), resolved=plan.resolved, state="running", error=None,
                  failed_command=None, updated=_now())
        st.setdefault("commands", {})
        st.setdefault("metrics", {})
        point = resume_point(run.dir) if "fit" in sweep.commands else ResumePoint(None)
        if point.bad is not None:  # unreadable: set aside, and the fit (and what evaluates it) is redone
            dest = set_aside(run, point)
            st["set_aside"] = [*st.get("set_aside", []), {"file": dest.name, "problem": point.problem,
                                                          "resume_from": str(point.ckpt) if point.ckpt else None}]
            for cmd in sweep.commands:
                if cmd in st["commands"]:
                    st["commands"][cmd]["state"] = "pending"
        write_json(run.dir / "status.json", st)
        partial = run.dir / "fit" / "checkpoints" / f".{LATEST}.ckpt.partial"
        if partial.is_file():  # left by a fit killed while writing latest.ckpt (the sweep holds the folder's lock)
            partial.unlink()
        for cmd in sweep.commands:
            if cmd_done(st, cmd):
                continue
            if _STOP.is_set():
                return self._interrupted(run, st)
            rec = dict(st["commands"].get(cmd) or {})
            ck = (point.ckpt if cmd == "fit" else resume_ckpt(run.dir)) if "fit" in sweep.commands else None
            if cmd == "fit":
                if ck is None:  # nothing to resume from: start clean
                    shutil.rmtree(run.dir / "fit", ignore_errors=True)
            else:
                shutil.rmtree(run.dir / cmd, ignore_errors=True)
                if "fit" in sweep.commands and ck is None:
                    return self._fail(run, st, cmd, rec, None, f"the fit left no {LATEST}.ckpt to {cmd}")
            resumed = str(ck) if cmd == "fit" and ck is not None else None
            full = [sys.executable, "-m", "neurovision.cli", *command_argv(sweep, run, plan, cmd, ck)]
            log = run.dir / f"{cmd}.log"
            rec.update(state="running", attempts=int(rec.get("attempts", 0)) + 1, started=_now(), finished=None,
                       returncode=None, resumed_from=resumed, log=log.name, argv=full)
            st["commands"][cmd] = rec
            write_json(run.dir / "status.json", st)
            t0 = time.monotonic()
            rc = _launch(full, log, env)
            rec.update(returncode=rc, finished=_now(), seconds=round(time.monotonic() - t0, 1))
            self._keep_config(run)
            if _STOP.is_set():  # stopped by the sweep (Lightning exits 0 on SIGTERM): not done, resume later
                rec["state"] = "interrupted"
                return self._interrupted(run, st)
            if rc != 0:
                return self._fail(run, st, cmd, rec, rc, _tail(log))
            rec["state"] = "done"
            write_json(run.dir / "status.json", st)
        rows = combine_tables(run.dir, sweep.commands)
        write_table(run.dir / "metrics_table.csv", rows, TABLE_FIELDS)
        st.update(state="done", metrics=final_metrics(rows), updated=_now())
        write_json(run.dir / "status.json", st)
        return st

    def _interrupted(self, run: Run, st: dict[str, Any]) -> dict[str, Any]:
        st.update(state="interrupted", updated=_now())
        write_json(run.dir / "status.json", st)
        return st

    def _keep_config(self, run: Run) -> None:
        src = run.dir / self.sweep.commands[0] / "config.yaml"
        if src.is_file():
            with atomic_path(run.dir / "config.yaml") as tmp:
                shutil.copyfile(src, tmp)

    def _fail(self, run: Run, st: dict[str, Any], cmd: str, rec: dict[str, Any], rc: int | None,
              error: str) -> dict[str, Any]:
        rec.update(state="failed", returncode=rc)
        st["commands"][cmd] = rec
        st.update(state="failed", error=error, failed_command=cmd, updated=_now())
        write_json(run.dir / "status.json", st)
        return st


# ------------------------------------------------------------------------------------------------ aggregation
def metric_selected(name: str, patterns: list[str]) -> bool:
    inc = [p for p in patterns if not p.startswith("!")]
    exc = [p[1:] for p in patterns if p.startswith("!")]
    return any(fnmatch.fnmatchcase(name, p) for p in inc) and not any(fnmatch.fnmatchcase(name, p) for p in exc)


def _cell(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float, str)):
        return v
    return json.dumps(v, separators=(",", ":"), sort_keys=True)


def aggregate(sweep: Sweep, runs: list[Run], out: Path) -> dict[str, Any]:
    """Write ``results.csv``/``summary.csv`` (and ``results.parquet``) from the done runs; the tables."""
    keys = override_keys(sweep)
    labels = short_names(keys)
    cols = [labels[k] for k in keys]
    results: list[dict[str, Any]] = []
    missing: list[str] = []
    for run in runs:
        st = read_status(run.dir)
        if not run_done(sweep, st):
            continue
        assert st is not None
        rows = combine_tables(run.dir, sweep.commands)
        if not rows and (run.dir / "metrics_table.csv").is_file():
            with open(run.dir / "metrics_table.csv", newline="") as f:
                rows = list(csv.DictReader(f))
        values = final_metrics(rows) if rows else dict(st.get("metrics") or {})
        chosen = {m: v for m, v in sorted(values.items()) if metric_selected(m, sweep.metrics)}
        if not chosen:
            missing.append(run.name)
        resolved = st.get("resolved") or {}
        base = {"run": run.name, "seed": _cell(run.seed if run.seed is not None else st.get("seed"))}
        for k in keys:
            base[labels[k]] = _cell(run.overrides[k] if k in run.overrides else resolved.get(k))
        split = [(*metric_columns(m), v) for m, v in chosen.items()]
        split.sort(key=lambda t: (tuple((isinstance(x, str), x) for x in t[1].values()), t[0]))  # numeric order
        for name, extra, v in split:
            for c in extra:
                if c not in cols:
                    cols.append(c)
            results.append({**base, **extra, "metric": name, "value": v})
    for r in results:
        for c in cols:
            r.setdefault(c, "")
    rfields = ["run", "seed", *cols, "metric", "value"]
    write_table(out / "results.csv", results, rfields)
    groups: dict[tuple[Any, ...], list[float]] = {}
    for r in results:
        groups.setdefault((*(str(r[c]) for c in cols), r["metric"]), []).append(float(r["value"]))
    firsts: dict[tuple[Any, ...], dict[str, Any]] = {}
    summary = []
    for r in results:
        firsts.setdefault((*(str(r[c]) for c in cols), r["metric"]), r)
    for key, vals in groups.items():
        n = len(vals)
        row = {c: firsts[key][c] for c in cols}
        row.update(metric=key[-1], mean=statistics.fmean(vals), sd=statistics.stdev(vals) if n > 1 else math.nan,
                   n=n)
        summary.append(row)
    write_table(out / "summary.csv", summary, [*cols, "metric", "mean", "sd", "n"])
    _write_parquet(out / "results.parquet", results, rfields)
    return {"results": results, "summary": summary, "columns": cols, "no_metrics": missing}


def metric_columns(name: str) -> tuple[str, dict[str, Any]]:
    """``test/average/beta=0.93/ssim`` -> (``test/average/ssim``, {"beta": 0.93}): path components ``<key>=<value>``
    (key an identifier, not a reserved column) become columns; numbers are read as numbers."""
    parts, extra = [], {}
    for comp in name.split("/"):
        m = re.fullmatch(r"([A-Za-z_][\w.]*)=([^=]+)", comp)
        if m is None or m.group(1) in RESERVED_COLUMNS or m.group(1) in extra:
            parts.append(comp)
            continue
        try:
            value: Any = float(m.group(2))
        except ValueError:
            value = m.group(2)
        extra[m.group(1)] = value
    return "/".join(parts), extra


def _write_parquet(path: Path, rows: list[dict[str, Any]], fields: list[str]) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return
    columns: dict[str, list[Any]] = {}
    for f in fields:
        col = [r[f] for r in rows]
        types = {type(v) for v in col if v != ""}
        if f == "value":
            col = [float(v) for v in col]
        elif len(types) != 1 or "" in col:
            col = [str(v) for v in col]
        columns[f] = col
    try:
        with atomic_path(path) as tmp:
            pq.write_table(pa.table(columns), tmp)
    except Exception as e:  # noqa: BLE001  (the CSVs are the contract; Parquet is a convenience)
        log.warning("neurovision sweep: results.parquet not written: %s", e)


def _fmt(x: float) -> str:
    return "nan" if isinstance(x, float) and math.isnan(x) else f"{x:.4g}"


def format_summary(tables: dict[str, Any]) -> str:
    cols = tables["columns"]
    rows = [[str(r[c]) for c in cols] + [r["metric"], f"{_fmt(r['mean'])} ± {_fmt(r['sd'])}" if r["n"] > 1
                                          else _fmt(r["mean"]), str(r["n"])] for r in tables["summary"]]
    head = [*cols, "metric", "mean ± sd", "n"]
    if not rows:
        return "no results (no run is done, or no metric matches)"
    width = [max(len(x) for x in col) for col in zip(head, *rows, strict=True)]
    line = lambda xs: "  ".join(x.ljust(w) for x, w in zip(xs, width, strict=True)).rstrip()  # noqa: E731
    return "\n".join([line(head), *(line(r) for r in rows)])


# ------------------------------------------------------------------------------------------------------ main
def _parser() -> argparse.ArgumentParser:
    from neurovision.cli.habits import argparse_parser

    p = argparse_parser(prog="neurovision sweep", description="reproducible ablation sweeps of "
                        "LightningCLI runs: grid x runs x seeds, resumable, aggregated to CSV",
                        epilog="The sweep file format: see `python -c 'import neurovision.runs.sweep as s; "
                        "help(s)'` or neurovision/runs/sweep.py.")
    p.add_argument("sweep", help="sweep YAML")
    p.add_argument("--out", default=None, help="output folder (default: the sweep's out, else runs/sweeps/<stem>)")
    p.add_argument("--parallel", type=int, default=1, help="runs at once (default 1); with CUDA GPUs each gets its "
                   "own CUDA_VISIBLE_DEVICES, round robin (with the sweep's devices_per_run: n GPUs each)")
    p.add_argument("--dry_run", "--dry-run", action="store_true", help="list the runs and their state; run nothing")
    p.add_argument("--aggregate_only", "--aggregate-only", action="store_true", help="only rebuild the tables")
    return p


def main(args: list[str]) -> int:
    ns = _parser().parse_args(args)
    try:
        return _main(ns)
    except SweepError as e:
        print(f"neurovision sweep: error: {e}", file=sys.stderr)
        return 2


def _main(ns: argparse.Namespace) -> int:
    sweep = load_sweep(ns.sweep)
    if ns.parallel < 1:
        raise SweepError("--parallel must be at least 1")
    out = Path(ns.out or sweep.out or Path("runs") / "sweeps" / sweep.path.stem).resolve()
    runs = expand(sweep, out)
    keys = override_keys(sweep)
    if ns.aggregate_only or sweep.aggregate_only:
        tables = aggregate(sweep, runs, out)
        print(format_summary(tables))
        print(f"tables: {out / 'results.csv'}, {out / 'summary.csv'}")
        return 0 if run_after(sweep, out) else 1
    statuses = {r.name: read_status(r.dir) for r in runs}
    changed = [r.name for r in runs if (st := statuses[r.name]) and st.get("spec") not in (None, spec_of(sweep, r))]
    if changed:
        raise SweepError(f"{out}: run(s) {', '.join(changed)} were made with other settings (configs, args, "
                         "overrides or seed); remove their directories or use another --out")
    todo = [r for r in runs if not run_done(sweep, statuses[r.name])]
    plans: dict[str, Plan] = {}
    errors: list[str] = []
    for i, r in enumerate(todo):
        try:
            plans[r.name] = plan_run(sweep, r, keys, check=i == 0)
        except SweepError as e:
            errors.append(str(e))
    if errors:
        raise SweepError("\n".join(errors[:3]) + (f"\n(and {len(errors) - 3} more runs)" if len(errors) > 3 else ""))
    if ns.dry_run:
        print(f"sweep {sweep.path} -> {out}: {len(runs)} runs, {len(todo)} to run")
        if sweep.devices_per_run is not None:
            print(f"  each run one job on {sweep.devices_per_run} devices ({' '.join(device_args(sweep))}), "
                  f"{ns.parallel} at a time")
        width = max(len(r.name) for r in runs)
        for r in runs:
            state, action = describe(sweep, r, statuses[r.name])
            print(f"  {r.name.ljust(width)}  {state:<11}  {action}")
        return 0

    gpus = _gpus() if ns.parallel > 1 or sweep.devices_per_run is not None else []
    groups = gpu_groups(gpus, ns.parallel, sweep.devices_per_run)  # SweepError before anything starts
    out.mkdir(parents=True, exist_ok=True)
    import fcntl

    lock = open(out / ".sweep.lock", "a")  # noqa: SIM115  (held for the sweep's lifetime)
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SweepError(f"{out}: another sweep is running in this folder") from None
    try:
        return _run_all(sweep, runs, todo, plans, out, ns.parallel, groups)
    finally:
        lock.close()


def _run_all(sweep: Sweep, runs: list[Run], todo: list[Run], plans: dict[str, Plan], out: Path,
             parallel: int, groups: list[str] | None = None) -> int:
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    from tqdm.auto import tqdm

    with atomic_path(out / "sweep.yaml") as tmp:
        shutil.copyfile(sweep.path, tmp)
    for r in runs:
        r.dir.mkdir(parents=True, exist_ok=True)
        try:
            same = json.loads((r.dir / "overrides.json").read_text()) == json.loads(json.dumps(r.mapping))
        except (OSError, ValueError):
            same = False
        if not same:  # a finished run's folder is left untouched
            write_json(r.dir / "overrides.json", r.mapping)
        if read_status(r.dir) is None:
            write_json(r.dir / "status.json", {"run": r.name, "state": "pending", "overrides": r.overrides,
                                               "seed": r.seed, "spec": spec_of(sweep, r), "commands": {},
                                               "metrics": {}, "updated": _now()})
    skipped = len(runs) - len(todo)
    print(f"sweep {sweep.path} -> {out}: {len(runs)} runs, {skipped} done (skipped), {len(todo)} to run",
          file=sys.stderr)
    runner = Runner(sweep, plans)
    _STOP.clear()
    groups = groups or []
    slots = list(range(parallel))
    slot_lock = threading.Lock()
    finals: dict[str, dict[str, Any]] = {}

    def work(run: Run) -> dict[str, Any]:
        with slot_lock:
            slot = slots.pop(0)
        try:
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            if groups:
                env["CUDA_VISIBLE_DEVICES"] = groups[slot]
            return runner.execute(run, env)
        finally:
            with slot_lock:
                slots.append(slot)

    def _terminate(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    bar = tqdm(total=len(todo), desc="sweep", unit="run", file=sys.stderr, dynamic_ncols=True)
    pool = ThreadPoolExecutor(max_workers=parallel)
    futures = {pool.submit(work, r): r for r in todo}
    previous = None
    if threading.current_thread() is threading.main_thread():  # SIGTERM: stop the runs like Ctrl-C, not orphan them
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
            for fut in done:
                run = futures[fut]
                try:
                    st = fut.result()
                except Exception as e:  # noqa: BLE001  (a sweep bug in one run must not lose the others)
                    st = {"run": run.name, "state": "failed", "error": f"{type(e).__name__}: {e}"}
                    prev = read_status(run.dir) or {}
                    write_json(run.dir / "status.json", {**prev, **st, "updated": _now()})
                finals[run.name] = st
                secs = sum((c.get("seconds") or 0) for c in (st.get("commands") or {}).values())
                bar.write(f"{st['state']:<6} {run.name}" + (f"  ({secs:.0f} s)" if secs else ""))
                bar.update(1)
    except KeyboardInterrupt:
        _STOP.set()
        for f in futures:
            f.cancel()
        with _ACTIVE_LOCK:
            procs = list(_ACTIVE)
        for p in procs:
            p.terminate()
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
        log.error("neurovision sweep: interrupted; run it again to resume")
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    pool.shutdown(wait=True)
    bar.close()

    tables = aggregate(sweep, runs, out)
    print(format_summary(tables))
    print(f"tables: {out / 'results.csv'}, {out / 'summary.csv'}")
    for name in tables["no_metrics"]:
        log.warning("warning: run %s logged no metric matching %s", name, sweep.metrics)
    after_ok = run_after(sweep, out)
    failed = [r for r in runs if (finals.get(r.name) or {}).get("state") == "failed"]
    ndone = sum(run_done(sweep, read_status(r.dir)) for r in runs)
    print(f"{ndone} of {len(runs)} runs done ({skipped} skipped), {len(failed)} failed", file=sys.stderr)
    for r in failed:
        st = finals[r.name]
        cmd = st.get("failed_command", "")
        log_file = r.dir / f"{cmd}.log" if cmd else r.dir
        log.error("FAILED %s: %s (exit %s); log: %s", r.name, cmd,
                  ((st.get("commands") or {}).get(cmd) or {}).get("returncode"), log_file)
        if st.get("error"):
            log.error("  %s", str(st["error"]).replace("\n", "\n  "))
    return 1 if failed or not after_ok else 0


def run_after(sweep: Sweep, out: Path) -> bool:
    """Call each ``after`` function with the out folder; False when one failed (reported, the others still run).
    Only registered functions (:data:`AFTER_HOOKS`) are called, whatever ``sweep.after`` holds."""
    import traceback

    ok = True
    for name in sweep.after:
        try:
            if name not in AFTER_HOOKS:  # load_sweep refuses it; a Sweep built in code must not bypass that
                raise SweepError(f"{sweep.path}: after: {name!r} is not an allowed after function")
            result = _after_function(name)(out)
        except Exception:  # noqa: BLE001  (the tables are written; report the hook's error and go on)
            log.error("neurovision sweep: after: %s failed:\n%s", name, traceback.format_exc())
            ok = False
            continue
        log.info("after: %s%s", name, f" -> {len(result)} files" if isinstance(result, (list, tuple)) else "")
    return ok


if __name__ == "__main__":
    from neurovision.cli import setup_process

    setup_process()  # the torchvision fix (where needed) and console logging, before anything imports torchvision
    sys.exit(main(sys.argv[1:]))
