"""Execution of a sweep's runs: one job function, two launchers.

The unit of work is :class:`RunJob`: the LightningCLI commands (``python -m neurovision.cli <cmd> ...``, one
process each, :func:`run_command`) of one run folder with their ``status.json`` bookkeeping (:class:`Runner`:
skip what is done, resume an interrupted fit from its ``latest.ckpt``, set an unreadable one aside). Both
launchers call it:

- ``local`` (default): a thread pool in the sweep's own process, ``--parallel`` runs at a time, each a
  :class:`RunJob` of all the sweep's commands with its own ``CUDA_VISIBLE_DEVICES`` group (:func:`gpu_groups`).
  Not submitit's ``LocalExecutor``: that starts every job of a batch at once (it has no array parallelism, so
  ``--parallel`` cannot be honoured), gives all jobs of an executor the same ``visible_gpus`` (no per-run GPU
  groups), and its job processes outlive the sweep (Ctrl-C / SIGTERM of the sweep would no longer stop its runs).
- ``slurm``: submitit's ``SlurmExecutor``; each sweep command is one job array (``executor.batch()``) of
  :class:`RunJob` s of that command, one task per run still to do; the next command's array is submitted when
  the previous one has finished (its runs whose command is done). Each job records its SLURM job id, host and
  submitit log paths in the run's ``status.json`` (``commands.<cmd>.jobs``); the driver keeps
  ``<out>/slurm/submitted.json`` and refuses to submit while a job of an earlier submission is still queued or
  running. Files: ``<out>/slurm/<job id>/`` (submitit's pickles, ``<job id>_0_log.out|err``, the sbatch script).

Preemption and time-outs use **submitit's checkpointing**: :class:`RunJob` is a
:class:`submitit.helpers.Checkpointable`. SLURM signals the job (``--signal=USR2@90`` in submitit's script, on
preemption or 90 s before the time limit); submitit calls :meth:`RunJob.checkpoint`, which stops the running
LightningCLI process, records the preemption in ``status.json`` and resubmits itself; submitit requeues the task
(``scontrol requeue``, the same job id; time-outs count against ``launcher.max_num_timeout``). The requeued task
runs the same :class:`RunJob`, which resumes the fit from its ``latest.ckpt`` (the end of the last finished epoch,
the sweep's own resume point, tested to give the results of an uninterrupted fit). Not Lightning's
``SLURMEnvironment(auto_requeue=True)``: that saves an ``hpc_ckpt`` mid-epoch and requeues from inside the
training process, which would bypass the run's status bookkeeping (the requeued job would not know the fit is
being resumed) and would race submitit's own handler; the LightningCLI process of a sweep job is therefore started
with ``SLURM_JOB_NAME=interactive`` (Lightning's documented switch: its SLURM environment and auto-requeue are off,
and a ``devices_per_run`` > 1 run starts its DDP processes itself on the job's GPUs).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import submitit
from submitit.helpers import Checkpointable

from neurovision.data.atomic import atomic_path, write_json
from neurovision.runs.sweep.aggregate import TABLE_FIELDS, combine_tables, final_metrics, write_table
from neurovision.runs.sweep.plan import (
    LATEST,
    Plan,
    ResumePoint,
    cmd_done,
    command_argv,
    now,
    read_status,
    resume_ckpt,
    resume_point,
    spec_of,
)
from neurovision.runs.sweep.spec import Run, Sweep, SweepError

log = logging.getLogger(__name__)

_ACTIVE: set[subprocess.Popen] = set()
_ACTIVE_LOCK = threading.Lock()
_STOP = threading.Event()  # set when the sweep is interrupted: no new process, the running ones terminated


# ------------------------------------------------------------------------------------------------ processes
def run_command(argv: list[str], log_file: Path, env: dict[str, str]) -> int:
    """Run ``argv`` with stdout+stderr appended to ``log_file``; its exit status (the one place a process
    starts)."""
    with open(log_file, "a") as f:
        f.write(f"\n===== {now()} {shlex.join(argv)}\n")
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


def stop_all() -> None:
    """No new process; SIGTERM to the running ones (Lightning stops at the next batch). Returns at once."""
    _STOP.set()
    with _ACTIVE_LOCK:
        procs = list(_ACTIVE)
    for p in procs:
        with contextlib.suppress(OSError):  # already gone
            p.terminate()


def visible_gpus() -> list[str]:
    """The CUDA devices runs can be spread over (``CUDA_VISIBLE_DEVICES`` entries, else all)."""
    vis = os.environ.get("CUDA_VISIBLE_DEVICES")
    if vis is not None:
        return [d.strip() for d in vis.split(",") if d.strip() and d.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001  (no torch / no driver: no GPUs)
        return []


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


def _tail(log_file: Path, n: int = 12) -> str:
    try:
        lines = [ln for ln in log_file.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return "\n".join(lines[-n:])


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
        f.write(f"\n===== {now()} {msg}\n")
    return dest


def job_info() -> dict[str, Any] | None:
    """The submitit job this process runs in (launcher, job id, host, log paths), None outside one."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return None
    from submitit.core.utils import JobPaths

    env = submitit.JobEnvironment()
    paths = env.paths
    # the sbatch script is kept under the id sbatch answered: the array's for an array task
    script = JobPaths(os.environ["SUBMITIT_FOLDER"], job_id=env.array_job_id or env.job_id).submission_file
    return {"launcher": env.cluster, "job_id": env.job_id, "host": env.hostname,
            "restart": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0), "stdout": str(paths.stdout),
            "stderr": str(paths.stderr), "submission_file": str(script), "started": now()}


# ------------------------------------------------------------------------------------------------- one run
class Runner:
    """Does what is left of a run's commands (see :meth:`execute`), keeping ``status.json`` up to date."""

    def __init__(self, sweep: Sweep, plans: dict[str, Plan]) -> None:
        self.sweep, self.plans = sweep, plans

    def execute(self, run: Run, env: dict[str, str], commands: list[str] | None = None) -> dict[str, Any]:
        """Run the commands of ``commands`` (default: all the sweep's) that are not done, in the sweep's order;
        a command whose earlier sweep commands are not all done fails. The run's final status."""
        sweep, plan = self.sweep, self.plans[run.name]
        commands = list(sweep.commands if commands is None else commands)
        run.dir.mkdir(parents=True, exist_ok=True)
        st = read_status(run.dir) or {}
        st.update(run=run.name, overrides=run.overrides, seed=run.seed if run.seed is not None else plan.seed,
                  spec=spec_of(sweep, run), resolved=plan.resolved, state="running", error=None,
                  failed_command=None, updated=now())
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
        job = job_info()
        for i, cmd in enumerate(sweep.commands):
            if cmd not in commands or cmd_done(st, cmd):
                continue
            rec = dict(st["commands"].get(cmd) or {})
            if job is not None:
                rec["jobs"] = [*rec.get("jobs", []), job]
            before = [c for c in sweep.commands[:i] if not cmd_done(st, c)]
            if before:
                return self._fail(run, st, cmd, rec, None, f"{cmd} needs {before[0]} done first")
            if _STOP.is_set():
                return self._interrupted(run, st)
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
            log_file = run.dir / f"{cmd}.log"
            rec.update(state="running", attempts=int(rec.get("attempts", 0)) + 1, started=now(), finished=None,
                       returncode=None, resumed_from=resumed, log=log_file.name, argv=full)
            st["commands"][cmd] = rec
            write_json(run.dir / "status.json", st)
            t0 = time.monotonic()
            rc = run_command(full, log_file, env)
            rec.update(returncode=rc, finished=now(), seconds=round(time.monotonic() - t0, 1))
            self._keep_config(run)
            if _STOP.is_set():  # stopped by the sweep (Lightning exits 0 on SIGTERM): not done, resume later
                rec["state"] = "interrupted"
                return self._interrupted(run, st)
            if rc != 0:
                return self._fail(run, st, cmd, rec, rc, _tail(log_file))
            rec["state"] = "done"
            write_json(run.dir / "status.json", st)
        if not all(cmd_done(st, c) for c in sweep.commands):  # a command job of a launcher: the next one follows
            st.update(state="pending", updated=now())
            write_json(run.dir / "status.json", st)
            return st
        rows = combine_tables(run.dir, sweep.commands)
        write_table(run.dir / "metrics_table.csv", rows, TABLE_FIELDS)
        st.update(state="done", metrics=final_metrics(rows), updated=now())
        write_json(run.dir / "status.json", st)
        return st

    def _interrupted(self, run: Run, st: dict[str, Any]) -> dict[str, Any]:
        st.update(state="interrupted", error="stopped (Ctrl-C, SIGTERM, scancel or preemption)", updated=now())
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
        st.update(state="failed", error=error, failed_command=cmd, updated=now())
        write_json(run.dir / "status.json", st)
        return st


class RunJob(Checkpointable):
    """The job function of both launchers: what is left of ``commands`` of one run (see :class:`Runner`).

    ``env``: the LightningCLI processes' environment (None: this process's, as in a SLURM job). Picklable
    (submitit sends it to the cluster); :meth:`checkpoint` is submitit's preemption/time-out hook."""

    def __init__(self, sweep: Sweep, run: Run, plan: Plan, commands: list[str],
                 env: dict[str, str] | None = None) -> None:
        self.sweep, self.run, self.plan, self.commands, self.env = sweep, run, plan, list(commands), env

    def __call__(self) -> dict[str, Any]:
        env = dict(os.environ if self.env is None else self.env, PYTHONUNBUFFERED="1")
        previous: Any = None
        if self.env is None and "SLURM_JOB_ID" in os.environ:  # a SLURM job (see the module docstring)
            env["SLURM_JOB_NAME"] = "interactive"  # Lightning's SLURM environment and auto-requeue off
            if threading.current_thread() is threading.main_thread():
                previous = signal.getsignal(signal.SIGTERM)

                def on_term(signum: int, frame: Any) -> None:
                    # SLURM's SIGTERM (preemption, scancel) also stops the LightningCLI process, which then exits
                    # 0 (Lightning's SIGTERM handling): not a finished command
                    _STOP.set()
                    if callable(previous):
                        previous(signum, frame)

                signal.signal(signal.SIGTERM, on_term)
        try:
            return Runner(self.sweep, {self.run.name: self.plan}).execute(self.run, env, self.commands)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on preemption or time-out (in the job's signal handler): stop the LightningCLI
        process (its fit resumes from ``latest.ckpt`` when the requeued task runs this job again), note it in
        ``status.json`` and hand submitit the same job to requeue."""
        stop_all()
        st = read_status(self.run.dir)
        if st is not None:
            st["preempted"] = [*st.get("preempted", []), {"at": now(), "job": job_info()}]
            write_json(self.run.dir / "status.json", st)
        log.warning("neurovision sweep: run %s preempted or timed out: requeued", self.run.name)
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


# ---------------------------------------------------------------------------------------- local launcher
def prepare_runs(sweep: Sweep, runs: list[Run], out: Path) -> None:
    """Copy the sweep file; each run's folder, ``overrides.json`` and a pending ``status.json`` if it has none."""
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
                                               "metrics": {}, "updated": now()})


def _record_crash(run: Run, error: str) -> dict[str, Any]:
    st = {"run": run.name, "state": "failed", "error": error}
    prev = read_status(run.dir) or {}
    write_json(run.dir / "status.json", {**prev, **st, "updated": now()})
    return {**prev, **st}


def run_local(sweep: Sweep, todo: list[Run], plans: dict[str, Plan], parallel: int,
              groups: list[str] | None = None) -> dict[str, dict[str, Any]] | None:
    """Run ``todo`` here, ``parallel`` at a time (each its ``groups`` slot's GPUs); the final status of each run,
    None when interrupted (Ctrl-C / SIGTERM: the running processes are stopped; a re-run resumes)."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    from tqdm.auto import tqdm

    _STOP.clear()
    groups = groups or []
    slots = list(range(parallel))
    slot_lock = threading.Lock()
    finals: dict[str, dict[str, Any]] = {}

    def work(run: Run) -> dict[str, Any]:
        with slot_lock:
            slot = slots.pop(0)
        try:
            env = dict(os.environ)
            if groups:
                env["CUDA_VISIBLE_DEVICES"] = groups[slot]
            return RunJob(sweep, run, plans[run.name], sweep.commands, env)()
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
                    st = _record_crash(run, f"{type(e).__name__}: {e}")
                finals[run.name] = st
                secs = sum((c.get("seconds") or 0) for c in (st.get("commands") or {}).values())
                bar.write(f"{st['state']:<6} {run.name}" + (f"  ({secs:.0f} s)" if secs else ""))
                bar.update(1)
    except KeyboardInterrupt:
        stop_all()
        for f in futures:
            f.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
        return None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    pool.shutdown(wait=True)
    bar.close()
    return finals


# ---------------------------------------------------------------------------------------- slurm launcher
SUBMITTED = "submitted.json"  # <out>/slurm/submitted.json: the driver's record of its arrays


class _Executor(submitit.SlurmExecutor):
    """submitit's SlurmExecutor, constructible where ``srun`` is absent (to render the script for a dry run)."""

    @classmethod
    def affinity(cls) -> int:
        return 2


def slurm_executor(sweep: Sweep, out: Path, cmd: str) -> submitit.SlurmExecutor:
    """The executor of ``cmd``'s job array: ``<out>/slurm/<job id>/`` for its files, the launcher's settings."""
    ex = _Executor(folder=out / "slurm" / "%j", max_num_timeout=sweep.launcher.max_num_timeout)
    ex.update_parameters(**sweep.launcher.executor_parameters(f"nv-{sweep.path.stem}-{cmd}"))
    return ex


def sbatch_script(sweep: Sweep, out: Path, cmd: str, ntasks: int) -> str:
    """The sbatch script submitit submits for ``cmd``'s array of ``ntasks`` runs (what ``--dry_run`` prints).

    submitit has no public call that renders it; this uses the executor's ``_make_submission_file_text`` the way
    its array submission does (``map_count`` = the number of tasks; a single task is a plain job)."""
    ex = slurm_executor(sweep, out, cmd)
    if ntasks > 1:
        ex.parameters["map_count"] = ntasks
    return ex._make_submission_file_text(ex._submitit_command_str, "dry-run")


def commands_todo(sweep: Sweep, run: Run, status: dict[str, Any] | None) -> list[str]:
    """The sweep commands ``run`` still needs (all of them from the fit on when its ``latest.ckpt`` is bad)."""
    if "fit" in sweep.commands and status is not None and resume_point(run.dir).bad is not None:
        return list(sweep.commands)
    return [c for c in sweep.commands if not cmd_done(status, c)]


def active_jobs(out: Path) -> list[tuple[str, str]]:
    """(job id, state) of the arrays of an earlier submission to ``out`` that SLURM still has queued or running."""
    try:
        record = json.loads((out / "slurm" / SUBMITTED).read_text())
    except (OSError, ValueError):
        return []
    ids = sorted({j for a in record.get("arrays", []) for j in a.get("jobs", {}).values()})
    if not ids or shutil.which("sacct") is None:
        return []
    for jid in ids:
        submitit.SlurmJob.watcher.register_job(jid)
    submitit.SlurmJob.watcher.update()  # one sacct call for all of them
    states = [(jid, submitit.SlurmJob.watcher.get_state(jid, mode="cache")) for jid in ids]
    # UNKNOWN: sacct has no record (purged): not in the way
    return [(jid, st) for jid, st in states if st.upper() in ACTIVE_STATES]


ACTIVE_STATES = ("PENDING", "RUNNING", "REQUEUED", "COMPLETING", "PREEMPTED", "CONFIGURING", "SUSPENDED",
                 "RESIZING", "REQUEUE_HOLD", "REQUEUE_FED")


def require_sbatch(sweep: Sweep) -> None:
    """SweepError unless ``sbatch`` is on PATH (checked before anything is written)."""
    if shutil.which("sbatch") is None:
        raise SweepError(f"{sweep.path}: launcher: slurm: sbatch is not on PATH (not a SLURM login node?); "
                         "--dry_run prints the sbatch script")


def run_slurm(sweep: Sweep, runs: list[Run], plans: dict[str, Plan], out: Path, poll_s: float = 1.0,
              sacct_every_s: float = 60.0) -> dict[str, dict[str, Any]] | None:
    """Submit each command's job array to SLURM and wait for it (then the next command's); the final status of
    each run submitted, None when the driver is interrupted (the submitted jobs go on: their ids are printed).
    A job is seen to end by its result file (checked every ``poll_s``) or by ``sacct`` (submitit's watcher, at
    least every ``sacct_every_s``: one call for all the jobs)."""
    from tqdm.auto import tqdm

    require_sbatch(sweep)
    busy = active_jobs(out)
    if busy:
        raise SweepError(f"{out}: SLURM job(s) {', '.join(f'{j} ({s})' for j, s in busy)} of an earlier submission "
                         f"are still queued or running; wait for them or scancel them, then run the sweep again")
    record: dict[str, Any] = {"arrays": []}
    finals: dict[str, dict[str, Any]] = {}
    previous = None

    def _terminate(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminate)
    submitted: list[submitit.Job[Any]] = []
    cancelled: list[str] = []
    try:
        for cmd in sweep.commands:
            batch = [r for r in runs if cmd in commands_todo(sweep, r, read_status(r.dir))
                     and (finals.get(r.name) or {}).get("state") not in ("failed", "interrupted")]
            if not batch:
                continue
            ex = slurm_executor(sweep, out, cmd)
            with ex.batch():
                jobs = [ex.submit(RunJob(sweep, r, plans[r.name], [cmd])) for r in batch]
            submitted = list(jobs)
            array = {"command": cmd, "submitted": now(), "jobs": {r.name: j.job_id for r, j in zip(batch, jobs,
                                                                                                  strict=True)}}
            record["arrays"].append(array)
            write_json(out / "slurm" / SUBMITTED, record)
            first = jobs[0].job_id.split("_")[0]
            print(f"{cmd}: SLURM job array {first} ({len(jobs)} tasks); logs: {out / 'slurm'}", file=sys.stderr)
            bar = tqdm(total=len(jobs), desc=cmd, unit="run", file=sys.stderr, dynamic_ncols=True)
            pending = {r.name: (r, j) for r, j in zip(batch, jobs, strict=True)}
            last_sacct = time.monotonic()
            while pending:
                if time.monotonic() - last_sacct > sacct_every_s:  # a job that ends without a result (cancelled,
                    last_sacct = time.monotonic()                  # node failure) shows only in sacct
                    next(iter(pending.values()))[1].done(force_check=True)
                ended = [name for name, (_, job) in pending.items() if job.done()]
                if ended:
                    submitit.SlurmJob.watcher.update()  # their final SLURM states: one sacct call
                for name in ended:
                    r, job = pending.pop(name)
                    if job.watcher.get_state(job.job_id, mode="cache").upper().startswith("CANCELLED"):
                        cancelled.append(job.job_id)
                    st = _collect(r, cmd, job)
                    finals[r.name] = st
                    state = ((st.get("commands") or {}).get(cmd) or {}).get("state") or st.get("state")
                    bar.write(f"{cmd} {state:<11} {r.name}  (job {job.job_id})")
                    bar.update(1)
                if pending:
                    time.sleep(poll_s)
            bar.close()
            if cancelled:  # scancel is the user's stop: no further array
                later = sweep.commands[sweep.commands.index(cmd) + 1:]
                log.warning("neurovision sweep: SLURM job(s) %s cancelled%s; run the sweep again to resume",
                            ", ".join(cancelled), f": {', '.join(later)} not submitted" if later else "")
                break
    except KeyboardInterrupt:
        ids = sorted({j.job_id.split("_")[0] for j in submitted})
        log.error("neurovision sweep: interrupted; the submitted SLURM jobs go on (scancel %s to stop them); run "
                  "the sweep again when they have ended to collect and resume", " ".join(ids) or "-")
        return None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return finals


def _collect(run: Run, cmd: str, job: submitit.Job[Any]) -> dict[str, Any]:
    """The run's status once its job of ``cmd`` has ended: what the job wrote, or -- for a job that ended without
    a result (cancelled, killed, node failure) -- marked interrupted (a re-run resumes it)."""
    if job.paths.result_pickle.exists():
        try:
            result = job.result()
        except Exception as e:  # noqa: BLE001  (a sweep bug in the job: its traceback is in the job's log)
            return _record_crash(run, f"{cmd}: job {job.job_id} raised {type(e).__name__}: {e}")
        if isinstance(result, dict):
            return result
    state = job.watcher.get_state(job.job_id, mode="cache")
    st = read_status(run.dir) or {"run": run.name, "commands": {}}
    rec = dict((st.get("commands") or {}).get(cmd) or {})
    if rec.get("state") in (None, "running", "pending"):
        rec["state"] = "interrupted"
    if not rec.get("jobs"):  # it never started: record the submission
        rec["jobs"] = [{"launcher": "slurm", "job_id": job.job_id, "stdout": str(job.paths.stdout),
                        "stderr": str(job.paths.stderr)}]
    rec["slurm_state"] = state
    st.setdefault("commands", {})[cmd] = rec
    st.update(state="interrupted", error=f"SLURM job {job.job_id} ended {state} during {cmd}", updated=now())
    write_json(run.dir / "status.json", st)
    return st
