"""A sweep job for the fake cluster whose LightningCLI command is simulated: :class:`FakeRunJob` is the sweep's
:class:`~neurovision.runs.sweep.launch.RunJob` (same status/resume bookkeeping, same submitit pickling, same
SLURM job environment) with :func:`fake_command` in place of the ``python -m neurovision.cli`` process, so the
cluster path is tested in seconds. The simulated fit trains ``--trainer.max_epochs`` epochs of ``EPOCH_S``
seconds, writes ``latest.ckpt`` (a zip with a ``data.pkl`` record, the structure the sweep checks, without
importing torch) after each and resumes from ``--ckpt_path``; its
metrics depend on the seed, the width and the epoch only, so an interrupted and resumed fit logs the same values.
While a file ``<run>/hold`` exists the fit waits after each epoch: a test interrupts it there, deterministically."""

from __future__ import annotations

import csv
import json
import os
import pickle
import signal
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

from neurovision.runs.sweep import launch

EPOCH_S = float(os.environ.get("FAKE_EPOCH_S", "0.3"))
FIELDS = ["epoch", "step", "stage", "metric", "value"]


def _args(argv: list[str]) -> dict[str, str]:
    return dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)


def value(metric: str, seed: int, dim: int, epoch: int) -> float:
    return {"val/loss": 1.0 / (seed + 1) + 1.0 / (epoch + 1), "test/a": dim + 0.5 * seed ** 2 + epoch,
            "test/b": dim / 100 - seed}[metric]


def fake_command(argv: list[str], log_file: Path, env: dict[str, str]) -> int:
    """What ``python -m neurovision.cli fit|test ...`` leaves in the run dir (``argv`` as the sweep builds it)."""
    assert argv[1:3] == ["-m", "neurovision.cli"], argv
    a, cmd = _args(argv), argv[3]
    root = Path(a["trainer.default_root_dir"])
    root.mkdir(parents=True, exist_ok=True)
    seed, dim, epochs = int(a["seed_everything"]), int(a["model.init_args.dim"]), int(a["trainer.max_epochs"])
    with open(log_file, "a") as f:
        f.write(f"fake {cmd} pid {os.getpid()} job {env.get('SLURM_JOB_ID')} name {env.get('SLURM_JOB_NAME')}\n")
    (root / "config.yaml").write_text(json.dumps({"cmd": cmd, "seed": seed, "dim": dim}) + "\n")
    table = root / "metrics_table.csv"
    if cmd == "fit":
        ckpt = a.get("ckpt_path")
        start = load_ckpt(ckpt)["epoch"] + 1 if ckpt else 0
        rows = list(csv.DictReader(open(table))) if ckpt and table.is_file() else []
        rows = [r for r in rows if int(r["epoch"]) < start]
        stop = {"flag": False}
        previous: Any = None

        def on_term(signum: int, frame: Any) -> None:  # like Lightning's: note it, keep the handler before it
            stop["flag"] = True
            if callable(previous):
                previous(signum, frame)

        if threading_main():
            previous = signal.signal(signal.SIGTERM, on_term)
        try:
            for e in range(start, epochs):
                t0 = time.monotonic()
                while time.monotonic() - t0 < EPOCH_S:
                    if stop["flag"]:  # like Lightning: stop at the next batch and exit 0
                        return 0
                    time.sleep(0.02)
                rows.append({"epoch": e, "step": 4 * (e + 1), "stage": "val", "metric": "val/loss",
                             "value": value("val/loss", seed, dim, e)})
                _write(table, rows)
                (root / "checkpoints").mkdir(exist_ok=True)
                tmp = root / "checkpoints" / ".latest.ckpt.partial"
                save_ckpt({"epoch": e}, tmp)
                os.replace(tmp, root / "checkpoints" / "latest.ckpt")
                while (root.parent / "hold").exists():  # a test holds the fit here (see HOLD)
                    if stop["flag"]:
                        return 0
                    time.sleep(0.02)
        finally:
            if threading_main() and previous is not None:
                signal.signal(signal.SIGTERM, previous)
        return 0
    epoch = load_ckpt(a["ckpt_path"])["epoch"]
    _write(table, [{"epoch": epoch, "step": 0, "stage": "test", "metric": m, "value": value(m, seed, dim, epoch)}
                   for m in ("test/a", "test/b")])
    return 0


def save_ckpt(obj: dict[str, Any], path: Path) -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(obj))


def load_ckpt(path: str | Path) -> dict[str, Any]:
    with zipfile.ZipFile(path) as z:
        return dict(pickle.loads(z.read("archive/data.pkl")))


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _write(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)


class FakeRunJob(launch.RunJob):
    """The sweep's job with :func:`fake_command` for the LightningCLI process (in the job's own process)."""

    def __call__(self) -> dict[str, Any]:
        launch.run_command = fake_command  # this job process only
        print(f"FakeRunJob {self.run.name} {self.commands} in {os.environ.get('SLURM_JOB_ID')}", file=sys.stderr)
        return super().__call__()
