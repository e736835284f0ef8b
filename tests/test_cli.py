"""The `neurovision` command: help, every YAML's --print_config, prepare/inspect, a CPU fit."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import pytest
import yaml

from tests.helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
ENCODING = sorted([*EXPERIMENTS.glob("encoding*.yaml"), *EXPERIMENTS.glob("presets/encoding*.yaml")])  # `encode`
STAGES = sorted(p for p in EXPERIMENTS.glob("*.yaml") if p not in ENCODING)
DATA = sorted((EXPERIMENTS / "data").glob("*.yaml"))
PRESETS = sorted(p for p in (EXPERIMENTS / "presets").glob("*.yaml") if p not in ENCODING)
TEACHERS = sorted((EXPERIMENTS / "teachers").glob("*.yaml"))  # referenced by path (tests/test_config_layout.py)
ALL_YAML = sorted(EXPERIMENTS.rglob("*.yaml"))



def test_every_yaml_is_tested():
    assert ALL_YAML, "no YAML under experiments/"
    assert set(ALL_YAML) == (set(STAGES) | set(DATA) | set(PRESETS) | set(ENCODING) | set(TEACHERS)
                             | set(EXPERIMENTS.glob("sweeps/*.yaml"))
                             | set(EXPERIMENTS.glob("loggers/*.yaml")))  # tests/test_dashboards.py composes them


@pytest.mark.parametrize("config", ENCODING, ids=lambda p: p.name)
def test_encoding_print_config(config, capsys):
    """Each encoding YAML parses with `neurovision encode` (presets on top of experiments/encoding.yaml)."""
    base = EXPERIMENTS / "encoding.yaml"
    args = ["-c", str(base)] + (["-c", str(config)] if config != base else [])
    assert run_cli(["encode", *args, "--print_config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    wanted = yaml.safe_load(config.read_text())
    assert set(cfg["models"]) == set(wanted["models"]) and cfg["store"] == wanted["store"]
    for spec in cfg["models"].values():
        assert spec["class_path"].startswith("neurovision.pretrained.feature_networks.")


def test_top_level_help(capsys):
    assert run_cli(["--help"]) == 0
    out = capsys.readouterr().out
    for cmd in ("fit", "validate", "test", "predict", "prepare", "inspect"):
        assert cmd in out


@pytest.mark.parametrize("cmd", ["fit", "validate", "test", "predict"])
def test_trainer_subcommand_help(cmd, capsys):
    assert run_cli([cmd, "--help"]) == 0
    assert "--trainer" in capsys.readouterr().out


@pytest.mark.parametrize("stage", STAGES, ids=lambda p: p.name)
def test_stage_print_config(stage, capsys):
    assert run_cli(["fit", "-c", str(stage), "--print_config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["seed_everything"] == 0
    assert "class_path" in cfg["model"] and "class_path" in cfg["data"]


def _base_for(group: Path) -> Path:
    """A stage-specific preset (``presets/<stage>_*.yaml``) composes with its stage, a data group with the stage
    whose ``data`` it is; others with the baseline."""
    for stage in STAGES:
        if group.stem.startswith(stage.stem + "_") or (stage.parent / str(yaml.safe_load(stage.read_text())
                                                                          .get("data"))).resolve() == group:
            return stage
    return EXPERIMENTS / "baseline_linear.yaml"


@pytest.mark.parametrize("group", DATA + PRESETS, ids=lambda p: p.name)
def test_data_groups_and_presets_compose(group, capsys):
    base = _base_for(group)
    flag = ["--data", str(group)] if group in DATA else ["-c", str(group)]
    assert run_cli(["fit", "-c", str(base), *flag, "--print_config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    wanted = yaml.safe_load(group.read_text())
    wanted_store = (wanted.get("init_args") or wanted.get("data", {}).get("init_args", {})).get("store")
    if wanted_store is not None:
        assert cfg["data"]["init_args"]["store"] == wanted_store
    for key, value in (wanted.get("trainer") or {}).items():
        if not isinstance(value, dict):
            assert cfg["trainer"][key] == value, key


def test_unknown_yaml_key_is_one_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  class_path: neurovision.tasks.LinearDecoder\n  init_args:\n    thumbnal: 8\n")
    assert run_cli(["fit", "-c", str(EXPERIMENTS / "baseline_linear.yaml"), "-c", str(bad), "--print_config"]) != 0
    assert "thumbnal" in capsys.readouterr().err


def test_prepare_inspect_and_noop(tmp_path, capsys):
    out = tmp_path / "p.h5"
    assert run_cli(["prepare", "phantom", "--preset", "tiny", "--n_subjects", "2", "--out", str(out)]) == 0
    mtime = out.stat().st_mtime_ns
    assert run_cli(["prepare", "phantom", "--preset", "tiny", "--n_subjects", "2", "--out", str(out)]) == 0
    assert out.stat().st_mtime_ns == mtime
    assert "up to date" in capsys.readouterr().out
    png = tmp_path / "overview.png"
    assert run_cli(["inspect", str(out), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    text = capsys.readouterr().out
    for word in ("sub-01", "sub-02", "active of", "train=", "test=", "20x24x20"):
        assert word in text
    assert "sub-03" not in text


def test_prepare_help_lists_sources(capsys):
    assert run_cli(["prepare", "--help"]) == 0
    out = capsys.readouterr().out
    assert "phantom" in out and "nsd" in out
    assert run_cli(["prepare", "nsd", "--help"]) == 0
    assert "--root" in capsys.readouterr().out


def test_tiny_group_reaches_the_demo_trainers(capsys):
    """`neurovision tiny teachers|unclip|llm`: one command group for the demo stand-ins' trainers."""
    assert run_cli(["tiny", "--help"]) == 0
    out = capsys.readouterr().out
    assert all(m in out for m in ("teachers", "unclip", "llm"))
    for model, flag in (("teachers", "--clip-steps"), ("unclip", "--steps"), ("llm", "--steps")):
        assert run_cli(["tiny", model, "--help"]) == 0
        out = capsys.readouterr().out
        assert f"neurovision tiny {model}" in out and flag in out
    assert run_cli(["tiny", "clipp"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown model 'clipp'" in err[0]


def test_inspect_foreign_file_one_line_error(tmp_path, capsys):
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = [1, 2, 3]
    assert run_cli(["inspect", str(foreign)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "foreign.h5" in err and "schema" in err


def test_fit_test_predict_on_tiny_phantom(tiny_store, tmp_path):
    store = tmp_path / "tiny.h5"
    shutil.copy(tiny_store, store)
    common = [
        "-c", str(EXPERIMENTS / "baseline_linear.yaml"), "-c", str(EXPERIMENTS / "presets" / "cpu_tiny.yaml"),
        f"--data.init_args.store={store}", f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.enable_progress_bar=false",
    ]
    assert run_cli(["fit", *common, "--trainer.max_epochs=3"]) == 0
    ckpts = sorted(tmp_path.rglob("last.ckpt"))
    assert ckpts, "no checkpoint written"
    table = sorted(tmp_path.rglob("metrics_table.csv"))
    assert table and "val/average/pixcorr" in table[0].read_text()
    assert sorted(tmp_path.rglob("config.yaml"))
    # the saved config is overwritten (not refused) on a second run in the same folder
    assert run_cli(["test", *common, f"--ckpt_path={ckpts[0]}"]) == 0
    assert run_cli(["predict", *common, f"--ckpt_path={ckpts[0]}"]) == 0


def test_fit_with_missing_store_is_one_line(tmp_path, capsys):
    missing = tmp_path / "absent.h5"
    code = run_cli(["fit", "-c", str(EXPERIMENTS / "baseline_linear.yaml"), f"--data.init_args.store={missing}",
                    f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "absent.h5" in err and "data.init_args.store" in err and "neurovision prepare" in err
