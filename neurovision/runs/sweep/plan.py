"""What a run does: its command lines (:func:`command_argv`: the ``-c`` files, args, overrides, seed, run dir,
logger and LatestCheckpoint), their check by the real LightningCLI parser before anything runs (:func:`plan_run`
-> :class:`Plan`), where its fit resumes (:func:`resume_point`) and what is left of it (its ``status.json``:
:func:`read_status`, :func:`run_done`, :func:`describe`). Nothing here starts a process."""

from __future__ import annotations

import contextlib
import io
import json
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neurovision.runs.sweep.spec import Run, Sweep, SweepError


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
            from neurovision.runs.lightning import NeuroVisionCLI

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
    # each command's logger arguments, made here (where the parser has imported the logger classes) so that a job
    # on a cluster node builds its command lines without importing Lightning
    logger_argv: dict[str, list[str]] = field(default_factory=dict)


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
    plan = Plan(logger=_as_dict(cfg.get("trainer.logger")), seed=cfg.get("seed_everything"), resolved=resolved,
                checkpointing=cfg.get("trainer.enable_checkpointing") is not False)
    plan.logger_argv = {c: logger_args(plan.logger, run.dir, c) for c in sweep.commands}
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
            *(plan.logger_argv[cmd] if cmd in plan.logger_argv else logger_args(plan.logger, run.dir, cmd))]
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
def now() -> str:
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
