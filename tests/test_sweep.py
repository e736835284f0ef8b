"""``neurovision sweep``: expansion and naming, validation, skip/resume/retry, the result tables, real runs."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from neurovision.cli.sweep import main as sweep_main
from neurovision.runs import sweep as sw

ROOT = Path(__file__).resolve().parents[1]
STAGE1 = ROOT / "experiments" / "stage1_vit3d.yaml"
TINY = ROOT / "experiments" / "presets" / "stage1_vit3d_tiny.yaml"
TINY_CLIP = ROOT / "experiments" / "teachers" / "tiny_clip.json"


def _write(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _cli_args(argv: list[str]) -> dict[str, str]:
    return dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)


# ---------------------------------------------------------------------------------------- expansion, errors
def test_grid_times_runs_times_seeds_expands_to_named_runs(tmp_path):
    path = _write(tmp_path / "s.yaml", {
        "configs": [str(STAGE1)],
        "grid": {"model.init_args.dim": [32, 64]},
        "runs": [{"model.init_args.contrastive": "none"},
                 {"model.init_args.contrastive": "infonce", "model.init_args.contrastive_weight": 0.1}],
        "seeds": [0, 1],
    })
    sweep = sw.load_sweep(path)
    assert sweep.commands == ["fit", "test"] and sweep.metrics == ["test/*"]
    runs = sw.expand(sweep, tmp_path / "out")
    assert [r.name for r in runs] == [
        "dim=32__contrastive=none__seed=0", "dim=32__contrastive=none__seed=1",
        "dim=64__contrastive=none__seed=0", "dim=64__contrastive=none__seed=1",
        "dim=32__contrastive=infonce__contrastive_weight=0.1__seed=0",
        "dim=32__contrastive=infonce__contrastive_weight=0.1__seed=1",
        "dim=64__contrastive=infonce__contrastive_weight=0.1__seed=0",
        "dim=64__contrastive=infonce__contrastive_weight=0.1__seed=1",
    ]
    assert runs[4].mapping == {"model.init_args.dim": 32, "model.init_args.contrastive": "infonce",
                               "model.init_args.contrastive_weight": 0.1, "seed_everything": 0}
    assert runs[0].dir == tmp_path / "out" / runs[0].name
    argv = sw.base_argv(sweep, runs[4], "fit")
    assert argv == ["fit", "-c", str(STAGE1), "--model.init_args.dim=32", "--model.init_args.contrastive=infonce",
                    "--model.init_args.contrastive_weight=0.1", "--seed_everything=0"]
    # ambiguous last components get a longer suffix (init_args skipped); reserved column names too
    assert sw.short_names(["model.init_args.optimizer.init_args.lr", "model.init_args.scheduler.init_args.lr",
                           "data.init_args.value"]) == {
        "model.init_args.optimizer.init_args.lr": "optimizer.lr",
        "model.init_args.scheduler.init_args.lr": "scheduler.lr", "data.init_args.value": "data.value"}
    # unsafe characters: replaced, and a hash of the full mapping keeps the name unique and deterministic
    labels = {"data.init_args.store": "store"}
    a = sw.run_name({"data.init_args.store": "x/a-b.h5"}, 0, labels)  # a path: its last component
    b = sw.run_name({"data.init_args.store": "a-b.h5"}, 0, labels)
    c = sw.run_name({"data.init_args.store": ["a", "b"]}, None, labels)  # a list: comma-joined
    assert a.startswith("store=a-b.h5__seed=0__") and b == "store=a-b.h5__seed=0" and a != b
    assert a == sw.run_name({"data.init_args.store": "x/a-b.h5"}, 0, labels) and c.startswith("store=a,b__")
    # values keep their type on the command line (YAML parser mode)
    assert [sw.cli_value(v) for v in (True, None, 0.001, "none", "true", [1, 2])] == \
        ["true", "null", "0.001", "none", '"true"', "[1, 2]"]


def test_unknown_sweep_key_is_an_error_naming_the_file_and_the_key(tmp_path, capsys):
    path = _write(tmp_path / "bad.yaml", {"configs": [str(STAGE1)], "seed": [0, 1]})
    with pytest.raises(sw.SweepError, match=r"bad\.yaml: unknown key 'seed'"):
        sw.load_sweep(path)
    assert sweep_main([str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "'seed'" in err
    assert not (tmp_path / "o").exists()
    for doc, msg in (({"grid": {"model.init_args.dim": 32}}, "non-empty list"),
                     ({"commands": ["test", "fit"]}, "fit must come first"),
                     ({"grid": {"model.init_args.dim": [1]}, "runs": [{"model.init_args.dim": 2}]}, "also a grid key"),
                     ({"grid": {"seed_everything": [1]}}, "use seeds"),
                     ({"configs": ["nope.yaml"]}, "nope.yaml does not exist")):
        with pytest.raises(sw.SweepError, match=msg):
            sw.load_sweep(_write(tmp_path / "x.yaml", doc))


def test_an_override_the_config_rejects_stops_the_sweep_with_lightningclis_message_and_the_run(tmp_path, capsys,
                                                                                              monkeypatch):
    monkeypatch.setattr(sw.launch, "run_command", _must_not_launch)
    path = _write(tmp_path / "s.yaml", {"configs": [str(STAGE1), str(TINY)],
                                         "grid": {"model.init_args.dimm": [8]}, "seeds": [3]})
    assert sweep_main([str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "run dimm=8__seed=3" in err and "Option 'dimm' is not accepted" in err
    assert not (tmp_path / "o").exists()  # nothing started


def _must_not_launch(*args, **kwargs):
    raise AssertionError("a process was started")


def test_logger_is_pointed_at_the_run_dir_whatever_the_config_says(tmp_path):
    run = tmp_path / "r"
    base = ["fit", "-c", str(STAGE1), "-c", str(TINY)]
    assert sw.logger_args(False, run, "fit") == []
    tb = sw.parse([*base, f"--trainer.default_root_dir={run / 'fit'}",
                   *sw.logger_args(sw.parse(base).trainer.logger, run, "fit")]).trainer.logger
    assert tb.class_path.endswith("TensorBoardLogger")
    assert (tb.init_args.save_dir, tb.init_args.name, tb.init_args.version) == (str(run), None, "fit")
    for value in (True, None):  # Lightning's default logger, made explicit
        (x,) = sw.logger_args(value, run, "test")
        cfg = sw.parse([*base, "--trainer.logger=true", x]).trainer.logger
        assert (cfg.init_args.save_dir, cfg.init_args.name, cfg.init_args.version) == (str(run), None, "test")
    csv_logger = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "x", "name": "y"}}
    (x,) = sw.logger_args([csv_logger, csv_logger], run, "fit")
    loggers = sw.parse([*base, x]).trainer.logger
    assert [(lg.init_args.save_dir, lg.init_args.version) for lg in loggers] == [(str(run), "fit")] * 2


# ------------------------------------------------------------------------ state machine with a fake launcher
def _fake_value(metric: str, seed: int, dim: int) -> float:
    return {"test/a": dim + 0.5 * seed ** 2, "test/b": dim / 100 - seed, "val/loss": 1.0 / (seed + 1)}[metric]


class FakeLauncher:
    """Stands in for ``neurovision.runs.sweep.launch.run_command``: writes what LightningCLI + MetricsTable + the sweep's
    LatestCheckpoint would (config.yaml, metrics_table.csv, checkpoints/latest.ckpt) under the command's
    default_root_dir."""

    def __init__(self, fail=lambda argv: False, delay: float = 0.0) -> None:
        self.calls: list[tuple[list[str], dict[str, str]]] = []
        self.fail, self.delay = fail, delay
        self.active: set[str] = set()
        self.overlaps: list[set[str]] = []
        self.lock = threading.Lock()

    def __call__(self, argv: list[str], log: Path, env: dict[str, str]) -> int:
        assert argv[:3] == [sys.executable, "-m", "neurovision.cli"]
        with self.lock:
            self.calls.append((list(argv), dict(env)))
            gpu = env.get("CUDA_VISIBLE_DEVICES", "")
            assert gpu not in self.active or not gpu, "two concurrent runs on one GPU"
            self.active.add(gpu)
            self.overlaps.append(set(self.active))
        try:
            time.sleep(self.delay)
            return self._run(argv, log)
        finally:
            with self.lock:
                self.active.discard(gpu)

    def _run(self, argv: list[str], log: Path) -> int:
        a, cmd = _cli_args(argv), argv[3]
        root = Path(a["trainer.default_root_dir"])
        assert Path(a["trainer.logger.init_args.save_dir"]) / a["trainer.logger.init_args.version"] == root
        root.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as f:
            f.write(f"fake {cmd}\n")
            if self.fail(argv):
                f.write("RuntimeError: boom\n")
                return 1
        seed, dim = int(a["seed_everything"]), int(a["model.init_args.dim"])
        (root / "config.yaml").write_text(f"# {cmd} {seed} {dim}\n")
        rows = [{"epoch": e, "step": 4 * e, "stage": "val", "metric": "val/loss",
                 "value": _fake_value("val/loss", seed, dim) + 1 - e} for e in range(2)]
        if cmd == "fit":
            (latest,) = [json.loads(x.split("=", 1)[1]) for x in argv if x.startswith("--trainer.callbacks+=")]
            assert latest == {"class_path": "callbacks.LatestCheckpoint",
                              "init_args": {"dirpath": str(root / "checkpoints")}}
            (root / "checkpoints").mkdir(exist_ok=True)
            torch.save({"epoch": 1}, root / "checkpoints" / "latest.ckpt")  # readable: the sweep checks it
        else:  # like MetricsTable under test: the fit's rows restored from the checkpoint, then the test rows
            assert a["ckpt_path"] == str(root.parent / "fit" / "checkpoints" / "latest.ckpt")
            rows += [{"epoch": 2, "step": 8, "stage": "test", "metric": m, "value": _fake_value(m, seed, dim)}
                     for m in ("test/a", "test/b")]
        with open(root / "metrics_table.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=sw.TABLE_FIELDS)
            w.writeheader()
            w.writerows(rows)
        return 0

    def runs(self) -> list[tuple[str, str, str | None]]:
        """(run dir name, command, --ckpt_path) of each call."""
        out = []
        for argv, _ in self.calls:
            a = _cli_args(argv)
            out.append((Path(a["trainer.default_root_dir"]).parent.name, argv[3], a.get("ckpt_path")))
        return out


def after_hook(out: Path) -> list[Path]:
    """An ``after`` function of the fake sweep: records how many result rows it saw."""
    p = Path(out) / "after.txt"
    p.write_text(str(len(pd.read_csv(Path(out) / "results.csv"))))
    return [p]


@pytest.fixture
def fake_sweep(tmp_path, monkeypatch) -> Path:
    monkeypatch.setitem(sw.AFTER_HOOKS, "tests.test_sweep.after_hook", after_hook)  # after names: a registry
    return _write(tmp_path / "fake.yaml", {
        "configs": [str(STAGE1), str(TINY)],
        "args": ["--trainer.max_epochs=2"],
        "grid": {"model.init_args.dim": [32, 64]},
        "seeds": [0, 1],
        "out": str(tmp_path / "out"),
        "after": ["tests.test_sweep.after_hook"],
    })


def test_failures_retries_resumes_and_tables_with_a_fake_launcher(fake_sweep, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    bad = FakeLauncher(fail=lambda argv: "--model.init_args.dim=64" in argv and "--seed_everything=1" in argv)
    monkeypatch.setattr(sw.launch, "run_command", bad)
    assert sweep_main([str(fake_sweep)]) == 1  # a failed run: exit 1, the others still ran
    err = capsys.readouterr().err
    assert f"FAILED dim=64__seed=1: fit (exit 1); log: {out / 'dim=64__seed=1' / 'fit.log'}" in err
    assert "RuntimeError: boom" in err
    assert [(r, c) for r, c, _ in bad.runs()] == [("dim=32__seed=0", "fit"), ("dim=32__seed=0", "test"),
                                                  ("dim=32__seed=1", "fit"), ("dim=32__seed=1", "test"),
                                                  ("dim=64__seed=0", "fit"), ("dim=64__seed=0", "test"),
                                                  ("dim=64__seed=1", "fit")]
    st = json.loads((out / "dim=64__seed=1" / "status.json").read_text())
    assert st["state"] == "failed" and st["commands"]["fit"]["state"] == "failed" and "test" not in st["commands"]
    st = json.loads((out / "dim=32__seed=1" / "status.json").read_text())
    assert st["state"] == "done" and st["metrics"]["test/a"] == 32.5 and st["seed"] == 1
    assert json.loads((out / "dim=32__seed=1" / "overrides.json").read_text()) == {
        "model.init_args.dim": 32, "seed_everything": 1}
    assert (out / "dim=32__seed=1" / "config.yaml").read_text() == "# fit 1 32\n"
    assert (out / "sweep.yaml").read_text() == fake_sweep.read_text()
    assert (out / "after.txt").read_text() == "6"  # the after function ran on the tables (3 done runs x 2)

    # the tables: only done runs, only test/* metrics; summary = mean / sample sd / n over seeds
    res = pd.read_csv(out / "results.csv")
    assert list(res.columns) == ["run", "seed", "dim", "metric", "value"]
    assert sorted(set(res.metric)) == ["test/a", "test/b"] and len(res) == 3 * 2
    assert "dim=64__seed=1" not in set(res.run)
    summ = pd.read_csv(out / "summary.csv")
    assert list(summ.columns) == ["dim", "metric", "mean", "sd", "n"]
    want = res.groupby(["dim", "metric"]).value.agg(["mean", "std", "count"]).reset_index()
    got = summ.merge(want, on=["dim", "metric"])
    assert len(got) == len(summ) == 4
    assert (got["mean_x"] - got["mean_y"]).abs().max() < 1e-12 and (got.n == got["count"]).all()
    assert ((got.sd - got["std"]).abs() < 1e-12).sum() == 2 and got.sd.isna().sum() == 2  # n = 1: NaN
    row = summ[(summ.dim == 32) & (summ.metric == "test/a")].iloc[0]
    assert row["mean"] == pytest.approx(32.25) and row["sd"] == pytest.approx(math.sqrt(0.125)) and row["n"] == 2

    # re-run: the done runs are skipped, the failed one is retried (fit then test)
    good = FakeLauncher()
    monkeypatch.setattr(sw.launch, "run_command", good)
    assert sweep_main([str(fake_sweep)]) == 0
    assert good.runs() == [("dim=64__seed=1", "fit", None),
                           ("dim=64__seed=1", "test", str(out / "dim=64__seed=1/fit/checkpoints/latest.ckpt"))]
    assert json.loads((out / "dim=64__seed=1" / "status.json").read_text())["commands"]["fit"]["attempts"] == 2
    assert len(pd.read_csv(out / "results.csv")) == 4 * 2

    # interrupted states: a fit killed after a latest.ckpt resumes from it; a done fit is not redone for the test
    killed, untested = out / "dim=32__seed=1", out / "dim=64__seed=0"
    st = json.loads((killed / "status.json").read_text())
    st["state"], st["commands"]["fit"]["state"] = "running", "running"
    del st["commands"]["test"]
    sw.write_json(killed / "status.json", st)
    st = json.loads((untested / "status.json").read_text())
    st["state"], st["commands"]["test"]["state"] = "running", "running"
    sw.write_json(untested / "status.json", st)
    capsys.readouterr()
    assert sweep_main([str(fake_sweep), "--dry_run"]) == 0
    listing = capsys.readouterr().out
    assert "dim=32__seed=0  done         skip" in listing
    assert "dim=32__seed=1  interrupted  fit (resume from fit/checkpoints/latest.ckpt) -> test" in listing
    assert "dim=64__seed=0  interrupted  test" in listing
    resume = FakeLauncher()
    monkeypatch.setattr(sw.launch, "run_command", resume)
    assert sweep_main([str(fake_sweep)]) == 0
    ck = str(killed / "fit/checkpoints/latest.ckpt")
    assert resume.runs() == [("dim=32__seed=1", "fit", ck), ("dim=32__seed=1", "test", ck),
                             ("dim=64__seed=0", "test", str(untested / "fit/checkpoints/latest.ckpt"))]
    st = json.loads((killed / "status.json").read_text())
    assert st["commands"]["fit"]["resumed_from"] == ck and st["state"] == "done"

    # --aggregate_only rebuilds the same tables without running anything
    before = {n: (out / n).read_text() for n in ("results.csv", "summary.csv")}
    for n in before:
        (out / n).unlink()
    monkeypatch.setattr(sw.launch, "run_command", _must_not_launch)
    assert sweep_main([str(fake_sweep), "--aggregate_only"]) == 0
    assert {n: (out / n).read_text() for n in before} == before
    assert "mean ± sd" in capsys.readouterr().out

    # a failing after function: reported, exit 1, the tables are still written
    def failing_hook(out: Path) -> None:
        raise RuntimeError("hook boom")

    monkeypatch.setitem(sw.AFTER_HOOKS, "tests.test_sweep.failing_hook", failing_hook)
    doc = yaml.safe_load(fake_sweep.read_text())
    doc["after"] = ["tests.test_sweep.failing_hook"]
    assert sweep_main([str(_write(fake_sweep, doc)), "--aggregate_only"]) == 1
    assert "after: tests.test_sweep.failing_hook failed" in capsys.readouterr().err
    # a name outside the registry: refused before anything runs (exit 2), naming the file and the key
    refused = _write(tmp_path / "refused.yaml", {**doc, "after": ["tests.test_sweep.no_such_function"]})
    assert sweep_main([str(refused), "--aggregate_only"]) == 2
    assert f"{refused}: after: 'tests.test_sweep.no_such_function' is not an allowed" in capsys.readouterr().err

    # a run recorded with other settings is not silently reused
    doc = yaml.safe_load(fake_sweep.read_text())
    doc["args"] = ["--trainer.max_epochs=3"]
    assert sweep_main([str(_write(fake_sweep, doc))]) == 2
    assert "were made with other settings" in capsys.readouterr().err


def test_parallel_runs_each_get_their_own_gpu(fake_sweep, tmp_path, monkeypatch):
    fake = FakeLauncher(delay=0.3)
    monkeypatch.setattr(sw.launch, "run_command", fake)
    monkeypatch.setattr(sw.launch, "visible_gpus", lambda: ["3", "5"])
    assert sweep_main([str(fake_sweep), "--parallel", "2"]) == 0
    assert len(fake.calls) == 8
    assert {env["CUDA_VISIBLE_DEVICES"] for _, env in fake.calls} == {"3", "5"}
    assert max(len(s) for s in fake.overlaps) == 2  # two at once, never on the same GPU (asserted in the fake)
    assert len(pd.read_csv(tmp_path / "out" / "results.csv")) == 8


# ----------------------------------------------------------------------------------------------- real runs
def _real_yaml(path: Path, store: Path, commands: list[str], epochs: int, metrics: list[str]) -> Path:
    """The tiny stage-1 preset, smaller still: a 1-layer 32-wide ViT3D, 4 training batches an epoch, 2 seeds."""
    return _write(path, {
        "configs": [str(STAGE1), str(TINY)],
        "commands": commands,
        "args": [f"--data.init_args.store={store}", f"--trainer.max_epochs={epochs}", "--trainer.limit_train_batches=4",
                 "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
                 "--data.init_args.eval_conditions=[average]", "--model.init_args.depth=1",
                 "--model.init_args.heads=2", "--model.init_args.head_hidden=32",
                 f"--model.init_args.clip_teacher.init_args.model_config={TINY_CLIP}"],
        "grid": {"model.init_args.dim": [32]},
        "seeds": [0, 1],
        "metrics": metrics,
    })


@pytest.fixture(scope="module")
def store(tiny_store, tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("sweep_store") / "tiny.h5"  # the teacher cache is written beside the store
    shutil.copy(tiny_store, p)
    return p


@pytest.fixture(scope="module")
def fit_sweep(store, tmp_path_factory) -> tuple[Path, Path]:
    """2 seeds x 1-epoch fit (validation metrics), 2 runs at once."""
    tmp = tmp_path_factory.mktemp("fit_sweep")
    path = _real_yaml(tmp / "fit.yaml", store, ["fit"], 1, ["val/average/*", "!val/*/sub-*"])
    assert sweep_main([str(path), "--out", str(tmp / "out"), "--parallel", "2"]) == 0
    return path, tmp / "out"


@pytest.fixture(scope="module")
def fit_test_sweep(store, tmp_path_factory) -> tuple[Path, Path]:
    """2 seeds x (3-epoch fit, test on its latest.ckpt), uninterrupted: the reference of the kill test."""
    tmp = tmp_path_factory.mktemp("fit_test_sweep")
    path = _real_yaml(tmp / "fit_test.yaml", store, ["fit", "test"], 3, ["test/*", "!test/*/sub-*"])
    assert sweep_main([str(path), "--out", str(tmp / "reference")]) == 0
    return path, tmp / "reference"


def _check_tables(out: Path, commands: list[str], prefix: str) -> pd.DataFrame:
    names = ["dim=32__seed=0", "dim=32__seed=1"]
    for n in names:
        run = out / n
        for f in ("overrides.json", "status.json", "config.yaml", "metrics_table.csv", "fit/checkpoints/latest.ckpt",
                  *(f"{c}.log" for c in commands), *(f"{c}/metrics_table.csv" for c in commands)):
            assert (run / f).is_file(), f"{n}/{f}"
        st = json.loads((run / "status.json").read_text())
        assert st["state"] == "done" and [st["commands"][c]["state"] for c in commands] == ["done"] * len(commands)
        assert yaml.safe_load((run / "config.yaml").read_text())["trainer"]["logger"]["init_args"]["version"] == "fit"
    res = pd.read_csv(out / "results.csv")
    assert list(res.columns) == ["run", "seed", "dim", "metric", "value"]
    assert sorted(set(res.run)) == names and set(res.seed) == {0, 1} and set(res.dim) == {32}
    assert f"{prefix}/average/retrieval_fmri2img" in set(res.metric)
    assert all(m.startswith(f"{prefix}/average/") and "/sub-" not in m for m in res.metric)
    # a run's value = the last row of the metric in its last command's MetricsTable
    rows = pd.read_csv(out / names[1] / commands[-1] / "metrics_table.csv")
    last = rows.groupby("metric").value.last()
    for _, r in res[res.run == names[1]].iterrows():
        assert r.value == last[r.metric]
    summ = pd.read_csv(out / "summary.csv")
    assert list(summ.columns) == ["dim", "metric", "mean", "sd", "n"]
    want = res.groupby(["dim", "metric"]).value.agg(["mean", "std", "count"]).reset_index()
    got = summ.merge(want, on=["dim", "metric"])
    assert len(got) == len(summ) == res.metric.nunique() and (got.n == 2).all()
    assert ((got["mean_x"] - got["mean_y"]).abs() < 1e-12).all()
    assert ((got.sd - got["std"]).abs() < 1e-12).all()
    return res


def test_two_seed_fit_sweep_writes_runs_and_tables(fit_sweep):
    _check_tables(fit_sweep[1], ["fit"], "val")


def test_rerunning_a_finished_sweep_trains_nothing(fit_sweep, monkeypatch, capsys):
    path, out = fit_sweep
    files = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.parent != out}
    assert len([p for p in files if p.suffix == ".ckpt"]) >= 2
    results = (out / "results.csv").read_text()
    monkeypatch.setattr(sw.launch, "run_command", _must_not_launch)
    monkeypatch.setattr(subprocess, "Popen", _must_not_launch)
    assert sweep_main([str(path), "--out", str(out)]) == 0
    assert "2 of 2 runs done (2 skipped), 0 failed" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in files} == files  # checkpoints, logs, status: untouched
    assert (out / "results.csv").read_text() == results


@pytest.mark.slow
def test_two_seed_fit_test_sweep_tests_each_fits_checkpoint(fit_test_sweep):
    _, out = fit_test_sweep
    _check_tables(out, ["fit", "test"], "test")
    for n in ("dim=32__seed=0", "dim=32__seed=1"):
        st = json.loads((out / n / "status.json").read_text())
        assert st["commands"]["test"]["argv"][-1] == f"--ckpt_path={out / n / 'fit/checkpoints/latest.ckpt'}"


@pytest.mark.slow
def test_a_killed_sweep_resumes_to_the_results_of_an_uninterrupted_one(fit_test_sweep, tmp_path):
    path, reference = fit_test_sweep
    out = tmp_path / "killed"
    run0 = out / "dim=32__seed=0"
    proc = subprocess.Popen([sys.executable, "-m", "neurovision.cli", "sweep", str(path), "--out", str(out)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (run0 / "fit" / "checkpoints" / "latest.ckpt").is_file():  # the end of epoch 0 (of 3)
            assert proc.poll() is None, "the sweep ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint in 300 s"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its training process
        proc.wait()
    st = json.loads((run0 / "status.json").read_text())
    assert st["state"] == "running" and st["commands"]["fit"]["state"] == "running", "killed too late"
    assert not (out / "dim=32__seed=1" / "fit").exists()

    assert sweep_main([str(path), "--out", str(out)]) == 0
    st = json.loads((run0 / "status.json").read_text())
    assert st["commands"]["fit"]["attempts"] == 2
    assert st["commands"]["fit"]["resumed_from"] == str(run0 / "fit/checkpoints/latest.ckpt")
    # every epoch's fit metrics and the final test metrics equal the uninterrupted sweep's
    for n, table in [(n, "fit/metrics_table.csv") for n in ("dim=32__seed=0", "dim=32__seed=1")] + [("", "results.csv")]:
        got, want = pd.read_csv(out / n / table), pd.read_csv(reference / n / table)
        assert list(got.columns) == list(want.columns) and len(got) == len(want), table
        keys = [c for c in got.columns if c != "value"]
        m = got.merge(want, on=keys, suffixes=("", "_ref"))
        assert len(m) == len(want), table
        bad = m[(m.value - m.value_ref).abs() > 1e-6]
        assert bad.empty, f"{n}/{table}:\n" + bad[[*keys, "value", "value_ref"]].to_string()


@pytest.mark.parametrize("path", sorted((ROOT / "experiments" / "sweeps").glob("*.yaml")), ids=lambda p: p.stem)
def test_the_repository_sweeps_resolve(path: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Every sweep YAML in experiments/sweeps/ parses, and each run's overrides pass the config (a dry run)."""
    assert sweep_main([str(path), "--dry_run", "--out", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    spec = yaml.safe_load(path.read_text())
    n = math.prod(len(v) for v in (spec.get("grid") or {}).values()) * max(1, len(spec.get("runs") or [])) \
        * len(spec.get("seeds") or [0])
    assert f"{n} runs" in out and "pending" in out


# ------------------------------------------------------------------------------- one multi-GPU job per run
def test_devices_per_run_makes_each_run_one_ddp_job(fake_sweep, tmp_path, monkeypatch, capsys):
    doc = yaml.safe_load(fake_sweep.read_text())
    path = _write(fake_sweep, {**doc, "devices_per_run": 2})
    sweep = sw.load_sweep(path)
    run = sw.expand(sweep, tmp_path / "out")[0]
    argv = sw.base_argv(sweep, run, "fit")
    assert argv[argv.index("--trainer.max_epochs=2") + 1:argv.index("--model.init_args.dim=32")] == [
        "--trainer.devices=2", "--trainer.strategy=ddp"]  # after args, before the overrides
    parsed = sw.parse(argv).trainer  # the real parser accepts them (devices as Lightning's "2")
    assert (str(parsed.devices), parsed.strategy) == ("2", "ddp")
    assert sw.device_args(sw.load_sweep(_write(tmp_path / "one.yaml", {**doc, "devices_per_run": 1}))) == [
        "--trainer.devices=1"]
    assert sw.gpu_groups(["3", "5", "6", "7"], 2, 2) == ["3,5", "6,7"]
    assert sw.gpu_groups(["3", "5"], 3, None) == ["3", "5", "3"] and sw.gpu_groups([], 2, 8) == []

    # 4 GPUs, 2 runs at a time on 2 GPUs each: every process gets its own pair and the DDP flags
    fake = FakeLauncher(delay=0.2)
    monkeypatch.setattr(sw.launch, "run_command", fake)
    monkeypatch.setattr(sw.launch, "visible_gpus", lambda: ["0", "1", "2", "3"])
    assert sweep_main([str(path), "--parallel", "2"]) == 0
    assert len(fake.calls) == 8
    assert {env["CUDA_VISIBLE_DEVICES"] for _, env in fake.calls} == {"0,1", "2,3"}
    assert all({"--trainer.devices=2", "--trainer.strategy=ddp"} <= set(a) for a, _ in fake.calls)
    # the device count is not a run setting: the finished sweep is still done without it
    assert sweep_main([str(_write(path, doc)), "--dry_run"]) == 0
    assert "4 runs, 0 to run" in capsys.readouterr().out

    # too few GPUs: one error before anything starts
    monkeypatch.setattr(sw.launch, "run_command", _must_not_launch)
    monkeypatch.setattr(sw.launch, "visible_gpus", lambda: ["0", "1", "2"])
    assert sweep_main([str(_write(path, {**doc, "devices_per_run": 2})), "--parallel", "2", "--out",
                    str(tmp_path / "o2")]) == 2
    assert "needs 4 GPUs, 3 visible" in capsys.readouterr().err and not (tmp_path / "o2").exists()


@pytest.mark.parametrize("doc, msg", [
    ({"devices_per_run": 0}, "devices_per_run: expected a positive integer"),
    ({"devices_per_run": "8"}, "devices_per_run: expected a positive integer"),
    ({"devices_per_run": 2, "args": ["--trainer.devices=4"]}, "devices_per_run: 'trainer.devices' is also set"),
    ({"devices_per_run": 2, "grid": {"trainer.strategy": ["ddp"]}}, "devices_per_run: 'trainer.strategy' is also set"),
])
def test_devices_per_run_is_validated(tmp_path, doc, msg):
    with pytest.raises(sw.SweepError, match=rf"s\.yaml: {msg}"):
        sw.load_sweep(_write(tmp_path / "s.yaml", {"configs": [str(STAGE1)], **doc}))


def test_metric_name_components_become_columns():
    assert sw.metric_columns("test/average/beta=0.93/ssim") == ("test/average/ssim", {"beta": 0.93})
    assert sw.metric_columns("test/single/beta=0/clip") == ("test/single/clip", {"beta": 0.0})
    assert sw.metric_columns("test/average/sub-01/pixcorr") == ("test/average/sub-01/pixcorr", {})
    assert sw.metric_columns("test/a/run=x/m") == ("test/a/run=x/m", {})  # reserved column names stay
