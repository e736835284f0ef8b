"""A fake SLURM for tests: ``sbatch``, ``srun``, ``sacct``, ``squeue``, ``scancel`` and ``scontrol requeue`` on one
machine, as far as submitit and ``neurovision sweep`` use them.

``tests/fakes/slurm/bin/<command>`` runs ``python fake_slurm.py <command> ...``; the state lives in
``$FAKE_SLURM_DIR`` (``jobs/<id>.json``, one file per submission, guarded by ``lock``). ``sbatch`` reads the
script's ``#SBATCH`` lines (``--array=0-N%P``, ``--output``, ``--error``, ``--job-name``), starts a detached scheduler
that runs each array task's script with ``bash`` (at most P at once, in its own session) with the variables SLURM
sets (``SLURM_JOB_ID``, ``SLURM_ARRAY_JOB_ID``, ``SLURM_ARRAY_TASK_ID``, ``SLURM_JOB_NAME``, ``SLURM_RESTART_COUNT``,
...), and prints ``Submitted batch job <id>``. ``srun`` runs its command as the job step (its own process group,
``SLURM_PROCID`` etc. set, ``--output``/``--error`` patterns expanded). ``sacct -o JobID,State,NodeList
--parsable2 -j <id>`` answers like SLURM: one line per started task plus its ``.batch`` step, pending tasks
folded into ``<id>_[a-b%P]``, ``CANCELLED by <uid>``. ``scancel <id>[_<task>]`` cancels (SIGTERM to the step and
the script, SIGKILL shortly after); ``scancel --signal SIG`` signals the job step only (submitit's preemption
test); ``scontrol requeue`` puts the task back in the queue once its script has ended (its processes killed).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")


def state_dir() -> Path:
    d = Path(os.environ["FAKE_SLURM_DIR"])
    (d / "jobs").mkdir(parents=True, exist_ok=True)
    (d / "steps").mkdir(parents=True, exist_ok=True)
    return d


@contextlib.contextmanager
def locked() -> Any:
    with open(state_dir() / "lock", "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def load(jid: str) -> dict[str, Any]:
    return json.loads((state_dir() / "jobs" / f"{jid}.json").read_text())


def save(job: dict[str, Any]) -> None:
    path = state_dir() / "jobs" / f"{job['id']}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(job))
    os.replace(tmp, path)


def all_jobs() -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((state_dir() / "jobs").glob("*.json"))]


def submitted_scripts() -> list[str]:
    """The scripts given to sbatch, in submission order (for tests)."""
    return [Path(j["script"]).read_text() for j in sorted(all_jobs(), key=lambda j: j["id"])]


def task_key(job: dict[str, Any], task: str) -> str:
    return f"{job['id']}_{task}" if job["array"] else str(job["id"])


def expand(pattern: str, job: dict[str, Any], task: str, procid: int | None = None) -> str:
    jid = str(int(job["id"]) + int(task)) if job["array"] else str(job["id"])
    out = pattern.replace("%A", str(job["id"])).replace("%a", task).replace("%j", jid)
    return out.replace("%t", str(procid)) if procid is not None else out


def kill_group(pgid: int | None, sig: int) -> None:
    if pgid:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)


def step_pgid(key: str) -> int | None:
    try:
        return int((state_dir() / "steps" / key).read_text())
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------------------------------- sbatch
def sbatch(args: list[str]) -> int:
    script = Path(args[-1])
    opts: dict[str, str] = {}
    for line in script.read_text().splitlines():
        m = re.match(r"#SBATCH\s+--([\w-]+)(?:=(.*))?$", line.strip())
        if m:
            opts[m.group(1)] = (m.group(2) or "").strip("'\"")
    array = opts.get("array")
    tasks, parallelism = ["0"], 1
    if array:
        m = re.fullmatch(r"(\d+)-(\d+)(?:%(\d+))?", array)
        assert m, f"fake sbatch: unsupported --array={array}"
        tasks = [str(i) for i in range(int(m.group(1)), int(m.group(2)) + 1)]
        parallelism = int(m.group(3) or len(tasks))
    with locked():
        counter = state_dir() / "next_id"
        jid = int(counter.read_text()) if counter.exists() else 1000
        counter.write_text(str(jid + len(tasks) + 1))
        copy = state_dir() / "jobs" / f"{jid}.sh"  # sbatch keeps the script as it was submitted
        copy.write_text(script.read_text())
        job = {"id": jid, "name": opts.get("job-name", script.name), "script": str(copy),
               "array": bool(array), "parallelism": parallelism, "output": opts.get("output", "slurm-%j.out"),
               "error": opts.get("error", opts.get("output", "slurm-%j.out")), "cwd": os.getcwd(),
               "submitted": time.time(),
               "tasks": {t: {"state": "PENDING", "pid": None, "restarts": 0, "requeue": None} for t in tasks}}
        save(job)
    log = open(state_dir() / f"scheduler_{jid}.log", "a")  # noqa: SIM115
    subprocess.Popen([sys.executable, __file__, "_schedule", str(jid)], stdin=subprocess.DEVNULL, stdout=log,
                     stderr=log, start_new_session=True, env=dict(os.environ))
    print(f"Submitted batch job {jid}")
    return 0


def schedule(jid: str) -> int:
    """Run the tasks of one submission (the detached scheduler that ``sbatch`` starts)."""
    procs: dict[str, subprocess.Popen] = {}
    host = socket.gethostname()
    while True:
        with locked():
            job = load(jid)
            tasks = job["tasks"]
            for t, proc in list(procs.items()):
                rec = tasks[t]
                rc = proc.poll()
                if rc is None:
                    if rec["requeue"] and time.time() - rec["requeue"] > 5:  # requeued but still running: kill
                        kill_group(step_pgid(task_key(job, t)), signal.SIGKILL)
                        kill_group(proc.pid, signal.SIGKILL)
                    continue
                del procs[t]
                kill_group(step_pgid(task_key(job, t)), signal.SIGKILL)  # the job's leftover processes
                kill_group(proc.pid, signal.SIGKILL)
                if rec["requeue"]:
                    rec.update(state="PENDING", requeue=None, pid=None, restarts=rec["restarts"] + 1)
                elif rec["state"] == "RUNNING":
                    rec["state"] = "COMPLETED" if rc == 0 else "FAILED"
                rec["exit_code"] = rc
            running = sum(r["state"] == "RUNNING" for r in tasks.values())
            for t, rec in tasks.items():
                if rec["state"] != "PENDING" or running >= job["parallelism"]:
                    continue
                env = dict(os.environ)
                env.update(SLURM_JOB_ID=expand("%j", job, t), SLURM_JOB_NAME=job["name"], SLURM_JOB_NUM_NODES="1",
                           SLURM_NNODES="1", SLURM_JOB_NODELIST=host, SLURMD_NODENAME=host, SLURM_NTASKS="1",
                           SLURM_NTASKS_PER_NODE="1", SLURM_SUBMIT_DIR=job["cwd"], SLURM_CLUSTER_NAME="fake",
                           SLURM_RESTART_COUNT=str(rec["restarts"]))
                if job["array"]:
                    env.update(SLURM_ARRAY_JOB_ID=str(job["id"]), SLURM_ARRAY_TASK_ID=t,
                               SLURM_ARRAY_TASK_COUNT=str(len(tasks)))
                out = Path(expand(job["output"], job, t, 0))
                err = Path(expand(job["error"], job, t, 0))
                out.parent.mkdir(parents=True, exist_ok=True)
                err.parent.mkdir(parents=True, exist_ok=True)
                with open(out, "a") as fo, open(err, "a") as fe:
                    procs[t] = subprocess.Popen(["bash", job["script"]], cwd=job["cwd"], env=env, stdout=fo, stderr=fe,
                                                stdin=subprocess.DEVNULL, start_new_session=True)
                rec.update(state="RUNNING", pid=procs[t].pid, started=time.time())
                running += 1
            save(job)
            if not procs and all(r["state"] in TERMINAL for r in tasks.values()):
                return 0
        time.sleep(0.1)


# ------------------------------------------------------------------------------------------------------- srun
def srun(args: list[str]) -> int:
    out = err = None
    i = 0
    while i < len(args) and args[i].startswith("-"):
        a = args[i]
        if a in ("--output", "-o", "--error", "-e"):
            if a in ("--output", "-o"):
                out = args[i + 1]
            else:
                err = args[i + 1]
            i += 2
            continue
        if a.startswith("--output="):
            out = a.split("=", 1)[1]
        elif a.startswith("--error="):
            err = a.split("=", 1)[1]
        i += 1
    cmd = args[i:]
    os.setpgid(0, 0)  # the job step: its own process group (what scancel --signal reaches)
    key = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}" \
        if "SLURM_ARRAY_JOB_ID" in os.environ else os.environ["SLURM_JOB_ID"]
    (state_dir() / "steps" / key).write_text(str(os.getpid()))
    array_id = os.environ.get("SLURM_ARRAY_JOB_ID", os.environ["SLURM_JOB_ID"])
    task = os.environ.get("SLURM_ARRAY_TASK_ID", "0")

    def pattern(p: str) -> str:
        return p.replace("%A", array_id).replace("%a", task).replace("%j", os.environ["SLURM_JOB_ID"]) \
            .replace("%t", "0")

    os.environ.update(SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0", SLURM_STEP_ID="0", SLURM_NTASKS="1")
    if out:
        fd = os.open(pattern(out), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(fd, 1)
        if not err:
            os.dup2(fd, 2)
    if err:
        fd = os.open(pattern(err), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(fd, 2)
    os.execvp(cmd[0], cmd)
    return 127  # not reached


# ------------------------------------------------------------------------------------------- sacct, squeue
def _targets(ids: list[str]) -> list[tuple[dict[str, Any], list[str]]]:
    out = []
    for spec in ids:
        for one in spec.split(","):
            base, _, task = one.partition("_")
            try:
                job = load(base)
            except OSError:
                continue
            out.append((job, [task] if task else list(job["tasks"])))
    return out


def _shown(state: str) -> str:
    return f"CANCELLED by {os.getuid()}" if state == "CANCELLED" else state


def sacct(args: list[str]) -> int:
    ids = [args[i + 1] for i, a in enumerate(args) if a in ("-j", "--jobs")]
    ids += [a.split("=", 1)[1] for a in args if a.startswith("--jobs=")]
    fields = "JobID,State,NodeList"
    for i, a in enumerate(args):
        if a in ("-o", "--format"):
            fields = args[i + 1]
    names = fields.split(",")
    host = socket.gethostname()
    lines = ["|".join(names)]
    with locked():
        targets = _targets(ids)
    for job, tasks in targets:
        pending = [t for t in tasks if job["tasks"][t]["state"] == "PENDING"]
        for t in tasks:
            rec = job["tasks"][t]
            if rec["state"] == "PENDING":
                continue
            key = task_key(job, t)
            node = host if rec.get("started") else "None assigned"
            row = {"JobID": key, "State": _shown(rec["state"]), "NodeList": node, "JobName": job["name"]}
            lines.append("|".join(row.get(n, "") for n in names))
            if rec.get("started"):
                step = "CANCELLED" if rec["state"] == "CANCELLED" else rec["state"]
                row = {"JobID": f"{key}.batch", "State": step, "NodeList": host, "JobName": "batch"}
                lines.append("|".join(row.get(n, "") for n in names))
        if pending:
            if job["array"]:
                nums = sorted(int(t) for t in pending)
                span = f"{nums[0]}-{nums[-1]}" if len(nums) > 1 else str(nums[0])
                key = f"{job['id']}_[{span}%{job['parallelism']}]"
            else:
                key = str(job["id"])
            row = {"JobID": key, "State": "PENDING", "NodeList": "None assigned", "JobName": job["name"]}
            lines.append("|".join(row.get(n, "") for n in names))
    print("\n".join(lines))
    return 0


def _format(fmt: str, values: dict[str, str]) -> str:
    return re.sub(r"%[iTj]", lambda m: values[m.group(0)], fmt)


def squeue(args: list[str]) -> int:
    ids: list[str] = []
    fmt, header = "%i %T", True
    i = 0
    while i < len(args):
        a = args[i]
        if a in ("-j", "--jobs"):
            ids.append(args[i + 1])
            i += 1
        elif a in ("-o", "--format"):
            fmt = args[i + 1]
            i += 1
        elif a in ("-h", "--noheader"):
            header = False
        i += 1
    with locked():
        targets = _targets(ids) if ids else [(j, list(j["tasks"])) for j in all_jobs()]
    rows = []
    for job, tasks in targets:
        for t in tasks:
            rec = job["tasks"][t]
            if rec["state"] in TERMINAL:
                continue
            rows.append(_format(fmt, {"%i": task_key(job, t), "%T": rec["state"], "%j": job["name"]}))
    if header:
        print(_format(fmt, {"%i": "JOBID", "%T": "STATE", "%j": "NAME"}))
    if rows:
        print("\n".join(rows))
    return 0


# ------------------------------------------------------------------------------------------ scancel, scontrol
def _signal(name: str) -> int:
    name = name.upper()
    return int(getattr(signal, name if name.startswith("SIG") else f"SIG{name}"))


def scancel(args: list[str]) -> int:
    sig = None
    ids = []
    i = 0
    while i < len(args):
        a = args[i]
        if a in ("--signal", "-s"):
            sig = _signal(args[i + 1])
            i += 1
        elif a.startswith("--signal="):
            sig = _signal(a.split("=", 1)[1])
        elif not a.startswith("-"):
            ids.append(a)
        i += 1
    groups: list[int | None] = []
    with locked():
        for job, tasks in _targets(ids):
            job = load(str(job["id"]))
            for t in tasks:
                rec = job["tasks"][t]
                if sig is not None:  # signal the job step (not the batch shell), as SLURM does
                    if rec["state"] == "RUNNING":
                        kill_group(step_pgid(task_key(job, t)), sig)
                    continue
                if rec["state"] == "PENDING":
                    rec["state"] = "CANCELLED"
                elif rec["state"] == "RUNNING":
                    rec.update(state="CANCELLED", requeue=None)
                    groups += [step_pgid(task_key(job, t)), rec["pid"]]
            save(job)
    if groups:
        for g in groups:
            kill_group(g, signal.SIGTERM)
        time.sleep(0.5)
        for g in groups:
            kill_group(g, signal.SIGKILL)
    return 0


def scontrol(args: list[str]) -> int:
    if not args or args[0] != "requeue":
        print(f"fake scontrol: unsupported: {args}", file=sys.stderr)
        return 1
    with locked():
        for job, tasks in _targets(args[1:]):
            job = load(str(job["id"]))
            for t in tasks:
                if job["tasks"][t]["state"] == "RUNNING":
                    job["tasks"][t]["requeue"] = time.time()
            save(job)
    return 0


COMMANDS = {"sbatch": sbatch, "srun": srun, "sacct": sacct, "squeue": squeue, "scancel": scancel,
            "scontrol": scontrol}


def main() -> int:
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "_schedule":
        return schedule(args[0])
    return COMMANDS[cmd](args)


if __name__ == "__main__":
    sys.exit(main())
