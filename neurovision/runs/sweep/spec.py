"""The sweep file: :class:`Sweep` (what ``load_sweep`` reads and checks), its runs (:func:`expand`: grid x runs x
seeds, each :class:`Run` named by its overrides) and its ``launcher`` block (:class:`Launcher`). Nothing here starts a
process or imports a module a sweep file names (see :mod:`neurovision.runs.sweep` for the format)."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TRAINER_COMMANDS = ("fit", "validate", "test", "predict")
SWEEP_KEYS = ("configs", "commands", "args", "grid", "runs", "seeds", "out", "metrics", "aggregate_only", "after",
              "devices_per_run", "launcher")
DEVICE_KEYS = ("trainer.devices", "trainer.strategy")  # set by devices_per_run
RESERVED_COLUMNS = {"run", "seed", "metric", "value", "mean", "sd", "std", "n"}
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


def after_function(name: str) -> AfterHook:
    """The registered function of an ``after`` name (the caller checked that it is registered)."""
    target = AFTER_HOOKS[name]
    if callable(target):
        return target
    import importlib

    mod, _, attr = target.partition(":")
    return getattr(importlib.import_module(mod), attr)


# -------------------------------------------------------------------------------------------- launcher block
LAUNCHERS = ("local", "slurm")
# the slurm launcher's settings and their types (submitit's SlurmExecutor parameters by their usual names)
SLURM_KEYS: dict[str, tuple[type, ...]] = {
    "partition": (str,), "account": (str,), "qos": (str,), "constraint": (str,), "job_name": (str,),
    "gpus_per_node": (int,), "cpus_per_task": (int,), "mem_gb": (int, float), "timeout_min": (int,),
    "array_parallelism": (int,), "max_num_timeout": (int,), "setup": (list,), "slurm_additional_parameters": (dict,),
}


@dataclass
class Launcher:
    """Where a sweep's runs execute: ``local`` (this machine, ``--parallel`` at a time) or ``slurm`` (one submitit
    job array per command). The fields besides ``name`` are the slurm launcher's."""

    name: str = "local"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    job_name: str | None = None  # default nv-<sweep file stem>-<command>
    gpus_per_node: int | None = None  # default devices_per_run (1 without it)
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    timeout_min: int = 120
    array_parallelism: int = 256  # tasks of one array running at once (submitit's default)
    max_num_timeout: int = 3  # requeues after a time-out (a preemption requeues without counting)
    setup: list[str] = field(default_factory=list)  # shell lines run before the job (module load, venv ...)
    slurm_additional_parameters: dict[str, Any] = field(default_factory=dict)  # any other #SBATCH --key=value

    def executor_parameters(self, job_name: str) -> dict[str, Any]:
        """The ``SlurmExecutor.update_parameters`` keywords (submitit's native names) of this block."""
        params: dict[str, Any] = {"job_name": self.job_name or job_name, "time": self.timeout_min,
                                  "array_parallelism": self.array_parallelism, "gpus_per_node": self.gpus_per_node or 0,
                                  "ntasks_per_node": 1}
        for k in ("partition", "account", "qos", "constraint", "cpus_per_task"):
            if getattr(self, k) is not None:
                params[k] = getattr(self, k)
        if self.mem_gb is not None:
            params["mem"] = f"{int(self.mem_gb)}GB" if self.mem_gb == int(self.mem_gb) else f"{int(self.mem_gb * 1024)}MB"
        if self.setup:
            params["setup"] = list(self.setup)
        if self.slurm_additional_parameters:
            params["additional_parameters"] = dict(self.slurm_additional_parameters)
        return params


def load_launcher(path: Path, raw: Any, devices_per_run: int | None) -> Launcher:
    """The ``launcher`` block of the sweep file ``path`` (absent: local): ``local``, ``slurm`` or a mapping with
    ``name`` and the slurm settings. An unknown key or a value of the wrong type is one SweepError naming both."""
    if raw is None:
        return Launcher()
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: launcher: expected local, slurm or a mapping with name: slurm and its settings, "
                         f"got {raw!r}")
    name = raw.get("name", "local")
    if name not in LAUNCHERS:
        raise SweepError(f"{path}: launcher: name: expected one of {', '.join(LAUNCHERS)}, got {name!r}")
    unknown = [k for k in raw if k != "name" and k not in SLURM_KEYS]
    if unknown:
        raise SweepError(f"{path}: launcher: unknown key {unknown[0]!r} (allowed: name, {', '.join(SLURM_KEYS)})")
    if name == "local":
        extra = [k for k in raw if k != "name"]
        if extra:
            raise SweepError(f"{path}: launcher: {extra[0]!r} is a slurm setting; the local launcher takes none "
                             "(set name: slurm, or use --parallel)")
        return Launcher()
    out = Launcher(name="slurm")
    for k, v in raw.items():
        if k == "name":
            continue
        types = SLURM_KEYS[k]
        ok = isinstance(v, types) and not isinstance(v, bool)
        if ok and k == "setup":
            ok = all(isinstance(x, str) for x in v)
        elif ok and k == "slurm_additional_parameters":
            ok = all(isinstance(a, str) and isinstance(b, (str, int, float, bool)) for a, b in v.items())
        elif ok and int in types:
            ok = v > 0 or (k == "max_num_timeout" and v == 0)
        if not ok:
            want = {"setup": "a list of shell lines", "slurm_additional_parameters": "a mapping of sbatch option -> "
                    "value"}.get(k, "a string" if str in types else "a positive number")
            raise SweepError(f"{path}: launcher: {k}: expected {want}, got {v!r}")
        setattr(out, k, v)
    if devices_per_run is not None:
        if out.gpus_per_node is None:
            out.gpus_per_node = devices_per_run
        elif out.gpus_per_node < devices_per_run:
            raise SweepError(f"{path}: launcher: gpus_per_node: {out.gpus_per_node} is fewer than devices_per_run "
                             f"({devices_per_run})")
    return out

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
    launcher: Launcher = field(default_factory=lambda: Launcher())


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
    sw.launcher = load_launcher(path, raw.get("launcher"), sw.devices_per_run)
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
