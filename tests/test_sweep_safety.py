"""``neurovision sweep`` safety (issue 19): a sweep file is data, not code (``after`` hooks come from a registry,
a refused name is never imported); an unreadable ``latest.ckpt`` is set aside and the run restarts from its last
good state instead of failing on every re-run."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from callbacks.latest_checkpoint import LatestCheckpoint
from neurovision.cli.sweep import main as sweep_main
from neurovision.runs import sweep as sw
from tests.test_sweep import ROOT, STAGE1, TINY, TINY_CLIP, _cli_args, _write  # noqa: F401  (shared helpers)


def _must_not_launch(*args: Any, **kwargs: Any) -> int:
    raise AssertionError("nothing may be launched")


# -------------------------------------------------------------------------------------------- after hooks
def test_after_os_system_with_a_crafted_out_is_refused_before_anything_runs(tmp_path, monkeypatch, capsys):
    pwned = tmp_path / "pwned"
    out = f"{tmp_path / 'o'}; touch {pwned}"  # the attack: after: [os.system] runs `out` as a shell line
    path = _write(tmp_path / "evil.yaml", {"after": ["os.system"], "out": out})
    monkeypatch.setattr(sw.launch, "run_command", _must_not_launch)
    for extra in ([], ["--aggregate_only"], ["--dry_run"]):
        assert sweep_main([str(path), *extra]) == 2
        err = capsys.readouterr().err
        assert f"{path}: after: 'os.system' is not an allowed after function" in err
        assert "neurovision.runs.beta_figures.figures" in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1
    assert not pwned.exists()
    assert not (tmp_path / "o; touch").exists() and list(tmp_path.iterdir()) == [path]  # nothing was written


def test_a_refused_after_name_is_never_imported(tmp_path, monkeypatch, capsys):
    pkg = tmp_path / "lib"
    pkg.mkdir()
    marker = tmp_path / "imported"
    (pkg / "h3_sweep_evil_hook.py").write_text(f"open({str(marker)!r}, 'w').close()\n\ndef hook(out):\n    pass\n")
    monkeypatch.syspath_prepend(str(pkg))
    path = _write(tmp_path / "s.yaml", {"after": ["h3_sweep_evil_hook.hook"], "out": str(tmp_path / "out")})
    assert sweep_main([str(path), "--aggregate_only"]) == 2
    assert "after: 'h3_sweep_evil_hook.hook' is not an allowed after function" in capsys.readouterr().err
    assert not marker.exists() and "h3_sweep_evil_hook" not in sys.modules
    # a Sweep built in code bypasses load_sweep: run_after still calls only registered names
    sweep = sw.Sweep(path=path, after=["h3_sweep_evil_hook.hook"])
    assert sw.run_after(sweep, tmp_path / "out") is False
    assert not marker.exists() and "h3_sweep_evil_hook" not in sys.modules


def test_registered_after_hooks_run_and_the_shipped_sweeps_use_only_registered_ones(tmp_path, monkeypatch, capsys):
    seen: list[Path] = []

    def hook(out: Path) -> list[Path]:
        seen.append(Path(out))
        return []

    monkeypatch.setitem(sw.AFTER_HOOKS, "tests.h3.hook", hook)
    path = _write(tmp_path / "s.yaml", {"after": ["tests.h3.hook"], "out": str(tmp_path / "out")})
    assert sweep_main([str(path), "--aggregate_only"]) == 0
    assert seen == [(tmp_path / "out").resolve()] and "after: tests.h3.hook -> 0 files" in capsys.readouterr().out
    # register_after (a decorator): <module>.<qualname>
    monkeypatch.setattr(sw.spec, "AFTER_HOOKS", dict(sw.AFTER_HOOKS))  # the registry lives in sweep/spec.py
    assert sw.register_after(hook) is hook
    assert sw.spec.AFTER_HOOKS[f"{__name__}.{hook.__qualname__}"] is hook
    for p in sorted((ROOT / "experiments" / "sweeps").glob("*.yaml")):
        assert all(a in sw.AFTER_HOOKS for a in sw.load_sweep(p).after), p
    assert "neurovision.runs.beta_figures.figures" in sw.AFTER_HOOKS


def test_loading_a_sweep_imports_no_after_module():
    code = ("import sys, neurovision.runs.sweep as s; sw = s.load_sweep('experiments/sweeps/beta.yaml'); "
            "assert sw.after == ['neurovision.runs.beta_figures.figures']; print('neurovision.runs.beta_figures' in sys.modules); "
            "print(s.after_function(sw.after[0]).__qualname__)")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert res.stdout.split() == ["False", "figures"]


# ---------------------------------------------------------------------------------------- checkpoint check
@pytest.fixture(scope="module")
def real_ckpt(tmp_path_factory) -> Path:
    """A Lightning checkpoint written by a tiny 2-epoch fit through the sweep's LatestCheckpoint."""
    import lightning.pytorch as pl
    from lightning.pytorch.demos.boring_classes import BoringModel

    d = tmp_path_factory.mktemp("real_ckpt")
    latest = LatestCheckpoint(dirpath=str(d / "checkpoints"))
    trainer = pl.Trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=1, logger=False, callbacks=[latest],
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(d),
                         accelerator="cpu", devices=1)
    trainer.fit(BoringModel())
    assert sorted(p.name for p in (d / "checkpoints").iterdir()) == ["latest.ckpt"]  # no partial left behind
    return d / "checkpoints" / "latest.ckpt"


def test_checkpoint_problem_tells_a_real_checkpoint_from_truncated_and_garbage_ones(real_ckpt, tmp_path):
    import torch

    assert sw.checkpoint_problem(real_ckpt) is None
    assert torch.load(real_ckpt, map_location="cpu", weights_only=False)["epoch"] == 1  # the second epoch's state
    data = real_ckpt.read_bytes()
    for n in (len(data) - 1, len(data) - 200, len(data) // 2, 100, 0):
        bad = tmp_path / f"cut{n}.ckpt"
        bad.write_bytes(data[:n])
        assert sw.checkpoint_problem(bad) is not None, n
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"ckpt")
    assert "not a complete zip archive" in sw.checkpoint_problem(garbage)
    hole = tmp_path / "hole.ckpt"  # the zip's directory intact, the start of the pickle record's bytes zeroed
    import struct
    import zipfile

    with zipfile.ZipFile(real_ckpt) as z:
        pkl = next(i for i in z.infolist() if i.filename.endswith("/data.pkl"))
    head = data[pkl.header_offset:pkl.header_offset + 30]
    start = pkl.header_offset + 30 + sum(struct.unpack("<HH", head[26:30]))
    hole.write_bytes(data[:start] + bytes(16) + data[start + 16:])
    assert sw.checkpoint_problem(hole) is not None
    assert sw.checkpoint_problem(tmp_path / "missing.ckpt") is not None


class _FakeStrategy:
    def barrier(self, name: str) -> None:
        pass


class _DyingTrainer:
    """Stands in for a Trainer killed halfway through writing a checkpoint."""

    is_global_zero, global_step, loggers, strategy = True, 7, [], _FakeStrategy()

    def save_checkpoint(self, path: str, weights_only: bool = False) -> None:
        Path(path).write_bytes(b"PK\x03\x04half a checkpoint")
        raise KeyboardInterrupt


def test_latest_checkpoint_is_replaced_atomically(real_ckpt, tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    latest = folder / "latest.ckpt"
    shutil.copy(real_ckpt, latest)
    before = latest.read_bytes()
    cb = LatestCheckpoint(dirpath=str(folder))
    with pytest.raises(KeyboardInterrupt):
        cb._save_checkpoint(_DyingTrainer(), str(latest))
    assert latest.read_bytes() == before and sw.checkpoint_problem(latest) is None  # the previous epoch's file


# ------------------------------------------------------------------------------- set aside, restart (fake)
class Launcher:
    """Stands in for ``neurovision.runs.sweep.launch.run_command`` like Lightning would behave: a fit given an unreadable
    ``--ckpt_path`` fails (every time); otherwise it writes a real torch checkpoint and a metrics table."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str | None]] = []

    def __call__(self, argv: list[str], log: Path, env: dict[str, str]) -> int:
        import torch

        a, cmd = _cli_args(argv), argv[3]
        self.calls.append((cmd, a.get("ckpt_path")))
        root = Path(a["trainer.default_root_dir"])
        root.mkdir(parents=True, exist_ok=True)
        ck = a.get("ckpt_path")
        if ck is not None and sw.checkpoint_problem(Path(ck)) is not None:
            with open(log, "a") as f:
                f.write("RuntimeError: PytorchStreamReader failed reading zip archive\n")
            return 1
        start = torch.load(ck, weights_only=True)["epoch"] + 1 if ck else 0
        if cmd == "fit":
            (root / "checkpoints").mkdir(exist_ok=True)
            torch.save({"epoch": 2}, root / "checkpoints" / "latest.ckpt")
        with open(root / "metrics_table.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=sw.TABLE_FIELDS)
            w.writeheader()
            w.writerow({"epoch": 2, "step": 8, "stage": "test" if cmd == "test" else "val",
                        "metric": f"{'test' if cmd == 'test' else 'val'}/start", "value": start})
        return 0


def _prepared(tmp_path: Path, *, fit_done: bool) -> tuple[sw.Sweep, list[sw.Run], Path]:
    """A one-run fit+test sweep whose run was interrupted: in the fit (``fit_done`` False) or before its test."""
    out = tmp_path / "out"
    path = _write(tmp_path / "s.yaml", {"commands": ["fit", "test"], "seeds": [0], "out": str(out),
                                        "metrics": ["test/*"]})
    sweep = sw.load_sweep(path)
    runs = sw.expand(sweep, out)
    (run,) = runs
    (run.dir / "fit" / "checkpoints").mkdir(parents=True)
    fit = {"state": "done" if fit_done else "running", "attempts": 1}
    sw.write_json(run.dir / "status.json", {"run": run.name, "state": "running", "overrides": {}, "seed": 0,
                                            "spec": sw.spec_of(sweep, run), "commands": {"fit": fit},
                                            "metrics": {}})
    return sweep, runs, out


def _run(sweep: sw.Sweep, runs: list[sw.Run], out: Path) -> int:
    """What ``neurovision sweep`` does after its checks (the LightningCLI parser is not needed by the fake)."""
    plans = {r.name: sw.Plan(logger=False, seed=0, resolved={}) for r in runs}
    return sw.run_sweep(sweep, runs, [r for r in runs if not sw.run_done(sweep, sw.read_status(r.dir))], plans, out, 1)


def test_a_garbage_latest_ckpt_is_set_aside_and_the_fit_restarts_from_scratch(tmp_path, monkeypatch, capsys):
    sweep, runs, out = _prepared(tmp_path, fit_done=False)
    run = runs[0]
    latest = run.dir / "fit" / "checkpoints" / "latest.ckpt"
    latest.write_bytes(b"ckpt")
    (run.dir / "fit" / "stale.txt").write_text("from the interrupted fit")
    (run.dir / "latest.ckpt.corrupt-1").write_bytes(b"an earlier one")
    state, action = sw.describe(sweep, run, sw.read_status(run.dir))  # --dry_run: says so, changes nothing
    assert (state, action) == ("interrupted", "fit (latest.ckpt unreadable: set aside, from scratch) -> test")
    assert latest.read_bytes() == b"ckpt"
    fake = Launcher()
    monkeypatch.setattr(sw.launch, "run_command", fake)
    assert _run(sweep, runs, out) == 0
    ck = str(latest)
    assert fake.calls == [("fit", None), ("test", ck)]
    assert (run.dir / "latest.ckpt.corrupt-2").read_bytes() == b"ckpt"  # set aside, numbered after the first
    assert (run.dir / "latest.ckpt.corrupt-1").read_bytes() == b"an earlier one"
    assert not (run.dir / "fit" / "stale.txt").exists()  # from scratch in a clean dir
    err = [ln for ln in capsys.readouterr().err.splitlines() if "unreadable" in ln]
    assert err == [f"neurovision sweep: run {run.name}: fit/checkpoints/latest.ckpt is unreadable "
                   f"({sw.checkpoint_problem(run.dir / 'latest.ckpt.corrupt-2')}); set aside as "
                   "latest.ckpt.corrupt-2, restarting the fit from scratch"]
    assert err[0] in (run.dir / "fit.log").read_text()
    st = json.loads((run.dir / "status.json").read_text())
    assert st["state"] == "done" and st["commands"]["fit"]["resumed_from"] is None
    assert st["set_aside"] == [{"file": "latest.ckpt.corrupt-2", "problem": st["set_aside"][0]["problem"],
                                "resume_from": None}]


def test_a_truncated_latest_ckpt_restarts_from_the_newest_readable_older_checkpoint(real_ckpt, tmp_path,
                                                                                     monkeypatch, capsys):
    import os

    import torch

    sweep, runs, out = _prepared(tmp_path, fit_done=False)
    run = runs[0]
    folder = run.dir / "fit" / "checkpoints"
    torch.save({"epoch": 0}, folder / "epoch=0-step=4.ckpt")
    torch.save({"epoch": 1}, folder / "last.ckpt")
    (folder / "epoch=1-step=8.ckpt").write_bytes(real_ckpt.read_bytes()[:1000])  # unreadable: skipped
    for i, name in enumerate(["epoch=0-step=4.ckpt", "last.ckpt", "epoch=1-step=8.ckpt"]):
        os.utime(folder / name, ns=(10**18 + i * 10**9, 10**18 + i * 10**9))
    data = real_ckpt.read_bytes()
    (folder / "latest.ckpt").write_bytes(data[: len(data) // 2])
    (folder / ".latest.ckpt.partial").write_bytes(b"half")
    fake = Launcher()
    monkeypatch.setattr(sw.launch, "run_command", fake)
    assert _run(sweep, runs, out) == 0
    assert fake.calls == [("fit", str(folder / "last.ckpt")), ("test", str(folder / "latest.ckpt"))]
    assert (run.dir / "latest.ckpt.corrupt-1").read_bytes() == data[: len(data) // 2]
    assert (folder / "epoch=0-step=4.ckpt").is_file() and not (folder / ".latest.ckpt.partial").exists()
    assert "set aside as latest.ckpt.corrupt-1, resuming from fit/checkpoints/last.ckpt" in capsys.readouterr().err
    rows = list(csv.DictReader(open(run.dir / "fit" / "metrics_table.csv")))
    assert rows[0]["value"] == "2"  # the fit went on after last.ckpt's epoch 1


def test_a_done_fit_with_an_unreadable_checkpoint_is_redone_before_its_test(tmp_path, monkeypatch, capsys):
    sweep, runs, out = _prepared(tmp_path, fit_done=True)
    run = runs[0]
    latest = run.dir / "fit" / "checkpoints" / "latest.ckpt"
    latest.write_bytes(b"")
    assert sw.describe(sweep, run, sw.read_status(run.dir))[1] == \
        "fit (latest.ckpt unreadable: set aside, from scratch) -> test"
    fake = Launcher()
    monkeypatch.setattr(sw.launch, "run_command", fake)
    assert _run(sweep, runs, out) == 0  # before: the test failed on the empty checkpoint on every re-run
    assert fake.calls == [("fit", None), ("test", str(latest))]
    st = json.loads((run.dir / "status.json").read_text())
    assert st["commands"]["fit"]["attempts"] == 2 and st["set_aside"][0]["problem"] == "empty file"
    # a readable latest.ckpt is resumed from as before, and nothing is set aside
    st["state"], st["commands"]["fit"]["state"] = "running", "running"
    del st["commands"]["test"]
    sw.write_json(run.dir / "status.json", st)
    fake = Launcher()
    monkeypatch.setattr(sw.launch, "run_command", fake)
    assert _run(sweep, runs, out) == 0
    assert fake.calls == [("fit", str(latest)), ("test", str(latest))]
    assert sorted(p.name for p in run.dir.glob("latest.ckpt.corrupt-*")) == ["latest.ckpt.corrupt-1"]


# ---------------------------------------------------------------------------------------------- a real run
@pytest.mark.slow
def test_a_real_sweep_with_a_truncated_latest_ckpt_resumes_from_the_configs_last_ckpt(tiny_store, tmp_path, capsys):
    """The stage-1 tiny preset through LightningCLI: truncate the fit's latest.ckpt, mark the fit interrupted;
    the re-run sets it aside and Lightning resumes from the config's ModelCheckpoint ``last.ckpt``."""
    store = tmp_path / "tiny.h5"
    shutil.copy(tiny_store, store)
    path = _write(tmp_path / "s.yaml", {
        "configs": [str(STAGE1), str(TINY)], "commands": ["fit"],
        "args": [f"--data.init_args.store={store}", "--trainer.max_epochs=2", "--trainer.limit_train_batches=2",
                 "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
                 "--data.init_args.eval_conditions=[average]", "--model.init_args.depth=1", "--model.init_args.heads=2",
                 "--model.init_args.head_hidden=32", "--model.init_args.dim=32",
                 f"--model.init_args.clip_teacher.init_args.model_config={TINY_CLIP}"],
        "seeds": [0], "metrics": ["val/average/*"], "out": str(tmp_path / "out")})
    assert sweep_main([str(path)]) == 0
    run = tmp_path / "out" / "seed=0"
    latest = run / "fit" / "checkpoints" / "latest.ckpt"
    data = latest.read_bytes()
    latest.write_bytes(data[: len(data) // 3])
    st = json.loads((run / "status.json").read_text())
    st["state"], st["commands"]["fit"]["state"] = "running", "running"
    sw.write_json(run / "status.json", st)
    capsys.readouterr()
    assert sweep_main([str(path)]) == 0
    assert "set aside as latest.ckpt.corrupt-1, resuming from fit/checkpoints/last.ckpt" in capsys.readouterr().err
    st = json.loads((run / "status.json").read_text())
    assert st["state"] == "done" and st["commands"]["fit"]["resumed_from"] == str(run / "fit/checkpoints/last.ckpt")
    assert sw.checkpoint_problem(latest) is None
