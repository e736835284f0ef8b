"""Dashboards: a sweep's TensorBoard HParams view, the MLflow logger group end to end, the W&B group's YAML."""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import yaml

from tests.helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]
STAGE1 = ROOT / "experiments" / "stage1_vit3d.yaml"
TINY = ROOT / "experiments" / "presets" / "stage1_vit3d_tiny.yaml"
LINEAR = ROOT / "experiments" / "baseline_linear.yaml"
CPU_TINY = ROOT / "experiments" / "presets" / "cpu_tiny.yaml"
LOGGERS = ROOT / "experiments" / "loggers"
BETAS = (0.0, 0.5)


# ------------------------------------------------------------------------------------------- HParams
def _write_json(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))


def _sweep_folder(out: Path) -> dict[str, dict]:
    """The layout ``neurovision sweep`` leaves (see neurovision/runs/sweep/__init__.py's docstring): a grid over ``dim`` and
    ``prompts`` (null or a file: mixed types), a β list per run (so results.csv has a ``beta`` column moved out
    of the metric names), two seeds, one run failed (no rows in results.csv). Returns the runs' specs."""
    runs: dict[str, dict] = {}
    rows = []
    for dim in (32, 64):
        for prompts in (None, "runs/x/predictions.jsonl"):
            for seed in (0, 1):
                name = f"dim={dim}__prompts={'null' if prompts is None else 'p'}__seed={seed}"
                overrides = {"model.init_args.dim": dim, "model.init_args.prompts": prompts,
                             "model.init_args.beta": list(BETAS), "seed_everything": seed}
                failed = dim == 64 and prompts is None and seed == 1
                metrics = {} if failed else {
                    f"test/average/beta={b:g}/clip": 0.5 + dim / 1000 + b / 10 + seed / 100 for b in BETAS}
                _write_json(out / name / "overrides.json", overrides)
                _write_json(out / name / "status.json", {
                    "run": name, "state": "failed" if failed else "done", "error": "boom" if failed else None,
                    "started": "2026-12-07T13:00:00", "updated": "2026-12-07T13:01:00", "metrics": metrics})
                runs[name] = {"overrides": overrides, "metrics": metrics, "failed": failed}
                for m, v in metrics.items():
                    beta = float(m.split("beta=")[1].split("/")[0])
                    rows.append([name, seed, dim, "" if prompts is None else prompts, beta, "test/average/clip", v])
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "seed", "dim", "prompts", "beta", "metric", "value"])
        w.writerows(rows)
    return runs


def _tensorboard_hparams(logdir: Path) -> tuple[dict, dict]:
    """TensorBoard's own HParams plugin, asked as the dashboard asks it: (experiment, session groups)."""
    from tensorboard import default, program
    from tensorboard.backend import application
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from werkzeug.test import Client

    tb = program.TensorBoard(plugins=default.get_plugins())
    tb.configure(argv=[None, "--logdir", str(logdir), "--load_fast", "false"])
    mux = plugin_event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(str(logdir))
    mux.Reload()
    app = application.TensorBoardWSGIApp(tb.flags, tb.plugin_loaders, data_provider.MultiplexerDataProvider(
        mux, str(logdir)), tb.assets_zip_provider, mux)
    client = Client(app)
    headers = {"X-XSRF-Protected": "1", "Content-Type": "application/json"}
    answers = []
    for route, body in (("experiment", {"experimentName": ""}),
                        ("session_groups", {"experimentName": "", "startIndex": 0, "sliceSize": 100,
                                           "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE",
                                                               "STATUS_RUNNING"]})):
        r = client.post(f"/data/plugin/hparams/{route}", data=json.dumps(body), headers=headers)
        assert r.status_code == 200, r.get_data(as_text=True)[:500]
        answers.append(json.loads(r.get_data(as_text=True)))
    return answers[0], answers[1]


def test_sweep_hparams_equal_the_sweep_tables(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import api_pb2, metadata

    from neurovision.runs.hparams import write_hparams

    out = tmp_path / "sweep"
    runs = _sweep_folder(out)
    logdir = write_hparams(out)
    assert logdir == out / "tensorboard"
    assert sorted(p.name for p in logdir.iterdir() if p.is_dir()) == sorted(runs)

    # the event files, read back run by run
    for name, spec in runs.items():
        acc = EventAccumulator(str(logdir / name), size_guidance={"scalars": 0})
        acc.Reload()
        content = acc.PluginTagToContent(metadata.PLUGIN_NAME)
        start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
        hp = {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}
        want = {k: (v if isinstance(v, int | float) and not isinstance(v, bool)
                    else v if isinstance(v, str) else json.dumps(v)) for k, v in spec["overrides"].items()}
        assert hp == want, name  # lists and null as JSON text; prompts mixes null and a path: all text
        assert start.group_name == name and start.start_time_secs > 0  # one group per run (seeds apart)
        end = metadata.parse_session_end_info_plugin_data(content[metadata.SESSION_END_INFO_TAG])
        assert api_pb2.Status.Name(end.status) == ("STATUS_FAILURE" if spec["failed"] else "STATUS_SUCCESS")
        scalars = {t: [e.value for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}
        assert scalars == {m: [pytest.approx(v, rel=1e-6)] for m, v in spec["metrics"].items()}

    # TensorBoard's HParams plugin: one experiment, one session per run, metrics equal results.csv's values
    experiment, groups = _tensorboard_hparams(logdir)
    assert {h["name"] for h in experiment["hparamInfos"]} == set(next(iter(runs.values()))["overrides"])
    assert {m["name"]["tag"] for m in experiment["metricInfos"]} == {f"test/average/beta={b:g}/clip" for b in BETAS}
    dims = next(h for h in experiment["hparamInfos"] if h["name"] == "model.init_args.dim")
    assert sorted(dims["domainDiscrete"]) == [32, 64]
    sessions = {s["name"]: s for g in groups["sessionGroups"] for s in g["sessions"]}
    assert set(sessions) == set(runs)
    with open(out / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert table
    for row in table:
        tag = f"test/average/beta={float(row['beta']):g}/clip"
        got = {m["name"]["tag"]: m.get("value", 0.0) for m in sessions[row["run"]]["metricValues"]}
        assert got[tag] == pytest.approx(float(row["value"]), rel=1e-6)
    assert sessions["dim=64__prompts=null__seed=1"]["status"] == "STATUS_FAILURE"

    # a second call rebuilds the folder (no duplicated sessions or events)
    before = sorted(p.relative_to(logdir) for p in logdir.rglob("*") if p.is_file())
    write_hparams(out)
    assert len(sorted(p.relative_to(logdir) for p in logdir.rglob("*") if p.is_file())) == len(before)
    assert not [p for p in out.iterdir() if p.name.startswith(".tensorboard")]


def test_sweep_logdir_lists_the_runs_own_sessions_only_with_lightnings_hp_metric(tmp_path: Path) -> None:
    """``tensorboard --logdir <sweep>``: the runs' own TensorBoardLoggers log scalars beside the sweep's HParams;
    with ``default_hp_metric: false`` they add no HParams session (the table is the sweep's alone), with Lightning's
    default (a ``hp_metric`` placeholder) each adds one (the caveat in docs/dashboards.md)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    from neurovision.runs.hparams import write_hparams

    out = tmp_path / "sweep"
    runs = _sweep_folder(out)
    for name in runs:  # the run's fit logger, as the sweep points it: <run>/fit
        lg = TensorBoardLogger(save_dir=str(out / name), name="", version="fit", default_hp_metric=False)
        lg.log_hyperparams({"dim": 32, "lr": 1e-3})
        lg.log_metrics({"val/average/clip": 0.5}, step=0)
        lg.finalize("success")
    write_hparams(out)
    _, groups = _tensorboard_hparams(out)
    assert {s["name"] for g in groups["sessionGroups"] for s in g["sessions"]} == {f"tensorboard/{n}" for n in runs}
    first = next(iter(runs))
    lg = TensorBoardLogger(save_dir=str(out / first), name="", version="test")  # default_hp_metric=True
    lg.log_hyperparams({"dim": 32})
    lg.finalize("success")
    _, groups = _tensorboard_hparams(out)
    assert f"{first}/test" in {s["name"] for g in groups["sessionGroups"] for s in g["sessions"]}


def test_hparams_needs_a_results_table(tmp_path: Path) -> None:
    from neurovision.runs.hparams import write_hparams

    with pytest.raises(FileNotFoundError, match="results.csv"):
        write_hparams(tmp_path)
    _sweep_folder(tmp_path)
    (tmp_path / "dim=32__prompts=null__seed=0" / "overrides.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"dim=32__prompts=null__seed=0/overrides.json: not a JSON object"):
        write_hparams(tmp_path)


# -------------------------------------------------------------------------------------------- MLflow
def test_mlflow_group_logs_params_and_the_metrics_table(tiny_store: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)  # the group's tracking URI, sqlite:///mlruns.db, is relative to the working dir
    store = tmp_path / "tiny.h5"
    shutil.copy(tiny_store, store)
    run_dir = tmp_path / "run"
    # the linear baseline: the quickest stage (no teachers); every stage composes alike (the test below)
    assert run_cli(["fit", "-c", str(LINEAR), "-c", str(CPU_TINY), "-c", str(LOGGERS / "mlflow.yaml"),
                    f"--data.init_args.store={store}", f"--trainer.default_root_dir={run_dir}",
                    "--trainer.max_epochs=2", "--trainer.enable_progress_bar=false",
                    "--trainer.enable_model_summary=false", "--model.init_args.thumbnail=4"]) == 0

    # the run folder is TensorBoard's, as without the group
    (version,) = sorted((run_dir / "tb").glob("version_*"))
    assert (version / "config.yaml").is_file() and (version / "checkpoints" / "latest.ckpt").is_file()
    with open(version / "metrics_table.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    last = {r["metric"]: float(r["value"]) for r in rows}  # the last value of each metric
    per_epoch: dict[str, dict[int, float]] = {}
    for r in rows:
        per_epoch.setdefault(r["metric"], {})[int(r["step"])] = float(r["value"])

    assert (tmp_path / "mlruns.db").is_file()
    client = MlflowClient(tracking_uri="sqlite:///mlruns.db")
    exp = client.get_experiment_by_name("neurovision")
    assert exp is not None
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    # params: the task's and the datamodule's init args as the run resolved them (its saved config)
    cfg = yaml.safe_load((version / "config.yaml").read_text())
    params = run.data.params
    assert params["thumbnail"] == str(cfg["model"]["init_args"]["thumbnail"]) == "4"  # the command line's, not 8
    assert params["batch_size"] == str(cfg["data"]["init_args"]["batch_size"]) == "16"  # the preset's, not 32
    assert params["store"] == str(store) == cfg["data"]["init_args"]["store"]
    # metrics: every val/ metric of the table, with its last value and its value at every validation, in order
    # (Lightning's loggers step at global_step - 1, the table at global_step)
    val = [m for m in last if m.startswith("val/")]
    assert "val/average/pixcorr" in val and "val/single/pixcorr" in val
    for m in val:
        assert run.data.metrics[m] == pytest.approx(last[m], rel=1e-6), m
        history = [h.value for h in sorted(client.get_metric_history(run.info.run_id, m), key=lambda h: h.step)]
        assert history == pytest.approx([per_epoch[m][s] for s in sorted(per_epoch[m])], rel=1e-6), m
    assert len(per_epoch["val/average/pixcorr"]) == 2  # two epochs validated


def _printed_loggers(args: list[str], capsys: pytest.CaptureFixture[str]) -> list[dict]:
    assert run_cli([*args, "--print_config"]) == 0
    return yaml.safe_load(capsys.readouterr().out)["trainer"]["logger"]


@pytest.mark.parametrize("stage", sorted((ROOT / "experiments").glob("stage*.yaml")), ids=lambda p: p.stem)
def test_mlflow_group_composes_with_every_stage(stage: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Any stage + the group (nothing instantiated): TensorBoard first, under default_root_dir; MLflow second."""
    tb, ml = _printed_loggers(["fit", "-c", str(stage), "-c", str(LOGGERS / "mlflow.yaml"),
                               f"--trainer.default_root_dir={tmp_path}"], capsys)
    assert tb["class_path"].endswith("TensorBoardLogger") and tb["init_args"]["name"] == "tb"
    assert tb["init_args"]["save_dir"] == str(tmp_path)  # RunPathParser: the run's folder stated once
    assert ml["class_path"].endswith("MLFlowLogger")
    assert ml["init_args"]["tracking_uri"] == "sqlite:///mlruns.db" and ml["init_args"]["log_model"] is False


# --------------------------------------------------------------------------------------------- W&B
@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed (optional)")
def test_wandb_group_resolves(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tb, wb = _printed_loggers(["fit", "-c", str(STAGE1), "-c", str(LOGGERS / "wandb.yaml"),
                               f"--trainer.default_root_dir={tmp_path}"], capsys)
    assert tb["class_path"].endswith("TensorBoardLogger")
    assert wb["class_path"].endswith("WandbLogger") and wb["init_args"]["offline"] is True


def test_wandb_group_is_offline_beside_tensorboard() -> None:
    """Without wandb installed, at least the file's shape: TensorBoard first, W&B offline, no model upload."""
    tb, wb = yaml.safe_load((LOGGERS / "wandb.yaml").read_text())["trainer"]["logger"]
    assert tb["class_path"] == "lightning.pytorch.loggers.TensorBoardLogger" and tb["init_args"] == {"name": "tb", "default_hp_metric": False}
    assert wb["class_path"] == "lightning.pytorch.loggers.WandbLogger"
    assert wb["init_args"]["offline"] is True and wb["init_args"]["log_model"] is False
