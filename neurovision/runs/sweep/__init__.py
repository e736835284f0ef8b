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
    launcher:                 # where the runs execute: local (default: this machine, --parallel at a time) or
      name: slurm             # slurm: one submitit job array per command (see below)
      partition: gpu          # and account, qos, constraint, job_name
      gpus_per_node: 1        # default devices_per_run (1 without it)
      cpus_per_task: 8
      mem_gb: 64
      timeout_min: 240        # default 120; a run that times out is requeued and resumes (max_num_timeout: 3)
      array_parallelism: 16   # tasks of an array at once (default 256)
      setup: ["source .venv/bin/activate"]               # shell lines before the job
      slurm_additional_parameters: {mail-type: END}      # any other #SBATCH --key=value

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
With the slurm launcher each run is one task holding ``gpus_per_node`` (default ``n``) GPUs. The device count is
not part of a run's recorded settings (a run's numbers must not depend on it), so a sweep
started on one GPU per run resumes with ``devices_per_run``.

``launcher`` (:mod:`neurovision.runs.sweep.launch` documents the design): both launchers run the same job
function, :class:`~neurovision.runs.sweep.launch.RunJob` (one run folder's LightningCLI commands and their
status/resume bookkeeping). ``local`` runs it in a thread pool here. ``slurm`` submits, per command, one job array
(submitit's ``SlurmExecutor``, ``executor.batch()``) of the runs still needing that command, waits for it, then
submits the next command's; each job records its SLURM job id, host and log paths in the run's ``status.json``.
``--dry_run`` prints the sbatch script of each array. A preempted or timed-out job is requeued by submitit's
checkpointing and resumes its fit from ``latest.ckpt``. A sweep cancelled (``scancel``) and run again resubmits
only what is not done. ``--parallel`` is the local launcher's; slurm's is ``array_parallelism``. An unknown key
in the block is an error naming the sweep file and the key.

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
    <out>/slurm/                      slurm launcher: submitted.json (the arrays' job ids), <job id>/ (submitit's
                                      sbatch script, pickles, <job id>_0_log.out|err)
    <run>/overrides.json              {dotted key: value, ..., seed_everything: seed}
    <run>/status.json                 state (pending|running|done|failed|interrupted), per-command record (with
                                      the submitit jobs that ran it: job id, host, log paths), metrics
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

Exit status: 0 all runs done, 1 a run or an ``after`` function failed (the summary names it and its log) or a
run was interrupted (a cancelled SLURM job: run the sweep again), 2 a bad sweep, launcher or override (nothing is
started), 130 the sweep itself was interrupted (Ctrl-C, SIGTERM).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from neurovision.data.atomic import write_json
from neurovision.runs.sweep import launch
from neurovision.runs.sweep.aggregate import (
    TABLE_FIELDS,
    aggregate,
    combine_tables,
    final_metrics,
    format_summary,
    metric_columns,
    metric_selected,
    run_after,
    write_table,
)
from neurovision.runs.sweep.launch import (
    RunJob,
    Runner,
    commands_todo,
    gpu_groups,
    prepare_runs,
    sbatch_script,
)
from neurovision.runs.sweep.plan import (
    LATEST,
    Plan,
    ResumePoint,
    base_argv,
    checkpoint_problem,
    cli_value,
    cmd_done,
    command_argv,
    describe,
    device_args,
    lightning_parser,
    logger_args,
    older_checkpoint,
    parse,
    plan_run,
    read_status,
    resume_ckpt,
    resume_point,
    run_done,
    spec_of,
)
from neurovision.runs.sweep.spec import (
    AFTER_HOOKS,
    LAUNCHERS,
    SLURM_KEYS,
    SWEEP_KEYS,
    TRAINER_COMMANDS,
    Launcher,
    Run,
    Sweep,
    SweepError,
    after_function,
    expand,
    load_launcher,
    load_sweep,
    override_keys,
    register_after,
    run_name,
    short_names,
)

__all__ = [
    "AFTER_HOOKS", "LATEST", "LAUNCHERS", "SLURM_KEYS", "SWEEP_KEYS", "TABLE_FIELDS", "TRAINER_COMMANDS", "Launcher",
    "Plan", "ResumePoint", "Run", "RunJob", "Runner", "Sweep", "SweepError", "after_function", "aggregate",
    "base_argv", "checkpoint_problem", "cli_value", "cmd_done", "combine_tables", "command_argv", "commands_todo",
    "describe", "device_args", "execute", "expand", "final_metrics", "format_summary", "gpu_groups", "launch",
    "lightning_parser", "load_launcher", "load_sweep", "logger_args", "metric_columns", "metric_selected",
    "older_checkpoint", "override_keys", "parse", "plan_run", "prepare_runs", "read_status", "register_after",
    "resume_ckpt", "resume_point", "run_after", "run_done", "run_name", "run_sweep", "sbatch_script", "short_names",
    "spec_of", "write_json", "write_table",
]

log = logging.getLogger(__name__)


def execute(sweep_file: str | Path, out: str | Path | None = None, parallel: int = 1, dry_run: bool = False,
            aggregate_only: bool = False) -> int:
    """What ``neurovision sweep`` does: check every run's overrides, then run what is not done (or only list it,
    ``dry_run``; or only rebuild the tables, ``aggregate_only``); the exit status. Raises :class:`SweepError` (one
    message naming the file and field) before anything runs when the sweep is not valid."""
    sweep = load_sweep(sweep_file)
    if parallel < 1:
        raise SweepError("--parallel must be at least 1")
    slurm = sweep.launcher.name == "slurm"
    if slurm and parallel > 1:
        raise SweepError(f"{sweep.path}: --parallel is the local launcher's; the slurm launcher runs "
                         "launcher.array_parallelism tasks of an array at once")
    out = Path(out or sweep.out or Path("runs") / "sweeps" / sweep.path.stem).resolve()
    runs = expand(sweep, out)
    keys = override_keys(sweep)
    if aggregate_only or sweep.aggregate_only:
        tables = aggregate(sweep, runs, out)
        print(format_summary(tables))
        print(f"tables: {out / 'results.csv'}, {out / 'summary.csv'}")
        _hparams(out)
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
    if dry_run:
        _dry_run(sweep, runs, todo, statuses, out, parallel)
        return 0

    if slurm:
        launch.require_sbatch(sweep)
    gpus = launch.visible_gpus() if not slurm and (parallel > 1 or sweep.devices_per_run is not None) else []
    groups = gpu_groups(gpus, parallel, sweep.devices_per_run)  # SweepError before anything starts
    out.mkdir(parents=True, exist_ok=True)
    import fcntl

    lock = open(out / ".sweep.lock", "a")  # noqa: SIM115  (held for the sweep's lifetime)
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SweepError(f"{out}: another sweep is running in this folder") from None
    try:
        return run_sweep(sweep, runs, todo, plans, out, parallel, groups)
    finally:
        lock.close()


def _hparams(out: Path) -> None:
    """The sweep's TensorBoard HParams view (``tensorboard --logdir <out>/tensorboard``), rebuilt with the tables;
    a problem is reported and the sweep goes on (the tables are written)."""
    from neurovision.runs.hparams import write_hparams

    try:
        log.info("HParams: %s", write_hparams(out))
    except (OSError, ValueError) as e:
        log.warning("neurovision sweep: no HParams view: %s", e)


def _dry_run(sweep: Sweep, runs: list[Run], todo: list[Run], statuses: dict[str, Any], out: Path,
             parallel: int) -> None:
    print(f"sweep {sweep.path} -> {out}: {len(runs)} runs, {len(todo)} to run")
    if sweep.devices_per_run is not None:
        at = f"{parallel} at a time" if sweep.launcher.name == "local" else "one SLURM task each"
        print(f"  each run one job on {sweep.devices_per_run} devices ({' '.join(device_args(sweep))}), {at}")
    width = max(len(r.name) for r in runs)
    for r in runs:
        state, action = describe(sweep, r, statuses[r.name])
        print(f"  {r.name.ljust(width)}  {state:<11}  {action}")
    if sweep.launcher.name != "slurm":
        return
    for cmd in sweep.commands:
        n = sum(cmd in commands_todo(sweep, r, statuses[r.name]) for r in runs)
        if n:
            print(f"\n# ---- {cmd}: the sbatch script of its job array ({n} task{'s' * (n > 1)}), submitted by submitit")
            print(sbatch_script(sweep, out, cmd, n).rstrip())


def run_sweep(sweep: Sweep, runs: list[Run], todo: list[Run], plans: dict[str, Plan], out: Path,
              parallel: int = 1, groups: list[str] | None = None) -> int:
    """What ``neurovision sweep`` does after its checks: run ``todo`` with the sweep's launcher, then the tables,
    the ``after`` hooks and the summary; the exit status."""
    prepare_runs(sweep, runs, out)
    skipped = len(runs) - len(todo)
    print(f"sweep {sweep.path} -> {out}: {len(runs)} runs, {skipped} done (skipped), {len(todo)} to run"
          + (" on SLURM" if sweep.launcher.name == "slurm" else ""), file=sys.stderr)
    if sweep.launcher.name == "slurm":
        finals = launch.run_slurm(sweep, todo, plans, out) if todo else {}
    else:
        finals = launch.run_local(sweep, todo, plans, parallel, groups)
    if finals is None:
        log.error("neurovision sweep: interrupted; run it again to resume")
        return 130
    tables = aggregate(sweep, runs, out)
    print(format_summary(tables))
    print(f"tables: {out / 'results.csv'}, {out / 'summary.csv'}")
    for name in tables["no_metrics"]:
        log.warning("warning: run %s logged no metric matching %s", name, sweep.metrics)
    _hparams(out)
    after_ok = run_after(sweep, out)
    failed = [r for r in runs if (finals.get(r.name) or {}).get("state") == "failed"]
    stopped = [r for r in runs if (finals.get(r.name) or {}).get("state") == "interrupted"]
    ndone = sum(run_done(sweep, read_status(r.dir)) for r in runs)
    print(f"{ndone} of {len(runs)} runs done ({skipped} skipped), {len(failed)} failed"
          + (f", {len(stopped)} interrupted (run the sweep again to resume)" if stopped else ""), file=sys.stderr)
    for r in failed:
        st = finals[r.name]
        cmd = st.get("failed_command", "")
        log_file = r.dir / f"{cmd}.log" if cmd else r.dir
        log.error("FAILED %s: %s (exit %s); log: %s", r.name, cmd,
                  ((st.get("commands") or {}).get(cmd) or {}).get("returncode"), log_file)
        if st.get("error"):
            log.error("  %s", str(st["error"]).replace("\n", "\n  "))
    for r in stopped:
        log.error("INTERRUPTED %s: %s", r.name, finals[r.name].get("error") or "stopped")
    return 1 if failed or stopped or not after_ok else 0
