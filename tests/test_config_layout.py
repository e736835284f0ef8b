"""The layout of experiments/ (issue 20, item 6): teacher blocks written once and referenced by path, each run
path stated once (the logger's ``save_dir`` follows ``trainer.default_root_dir``), every stage YAML on a data
group file, and one stage-1 checkpoint path that stage 1 writes and stages 2 and 3 read (per preset size)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
TEACHERS = sorted((EXPERIMENTS / "teachers").glob("*.yaml"))
STAGE_YAMLS = sorted(EXPERIMENTS.glob("stage*.yaml"))
RUN_YAMLS = sorted([*EXPERIMENTS.glob("*.yaml"), *EXPERIMENTS.glob("presets/*.yaml")])  # trainer configs
ALL_YAML = sorted(EXPERIMENTS.rglob("*.yaml"))
S1, S2, S3 = (EXPERIMENTS / f for f in ("stage1_vit3d.yaml", "stage2_instruct.yaml", "stage3_reconstruct.yaml"))


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def teacher_values(node: Any, where: str = "") -> list[tuple[str, Any]]:
    """Every ``clip_teacher`` key's value in a loaded YAML (with its dotted key)."""
    out: list[tuple[str, Any]] = []
    if isinstance(node, dict):
        for k, v in node.items():
            key = f"{where}.{k}" if where else str(k)
            if k == "clip_teacher":
                out.append((key, v))
            out += teacher_values(v, key)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += teacher_values(v, f"{where}[{i}]")
    return out


def parse(argv: list[str]) -> Any:
    from neurovision.runs.sweep import parse as sweep_parse

    return sweep_parse(argv)


# ------------------------------------------------------------------------------------------- teachers
def test_the_teacher_files_exist():
    assert {p.name for p in TEACHERS} >= {"clip_paper.yaml", "clip_demo.yaml", "clip_tiny.yaml"}
    for p in TEACHERS:
        block = load(p)
        assert set(block) == {"class_path", "init_args"}, f"{p.name}: a bare class_path/init_args block"
    bodies = [yaml.safe_dump(load(p), sort_keys=True) for p in TEACHERS]
    assert len(set(bodies)) == len(bodies), "two teacher files hold the same block"


@pytest.mark.parametrize("path", RUN_YAMLS, ids=lambda p: str(p.relative_to(EXPERIMENTS)))
def test_no_yaml_repeats_a_clip_teacher_block(path):
    """A stage or preset names its CLIP teacher by a path into experiments/teachers/ (relative to itself)."""
    for key, value in teacher_values(load(path)):
        assert isinstance(value, str | None), f"{path.name}: {key} is an inline block; reference a teachers/ file"
        if isinstance(value, str):
            target = (path.parent / value).resolve()
            assert target.is_file(), f"{path.name}: {key} = {value} does not exist"
            assert target.parent == EXPERIMENTS / "teachers", f"{path.name}: {key} = {value} is not in teachers/"


def test_teacher_references_resolve_to_the_files():
    """The paper, demo and tiny stage configs each resolve their three CLIP teachers to the one file's values."""
    sets = {"clip_paper.yaml": [[S1], [S2], [S3]],
            "clip_demo.yaml": [[S1, EXPERIMENTS / "presets/stage1_vit3d_demo.yaml"],
                               [S2, EXPERIMENTS / "presets/stage2_instruct_demo.yaml"],
                               [S3, EXPERIMENTS / "presets/stage3_reconstruct_demo.yaml"]],
            "clip_tiny.yaml": [[S1, EXPERIMENTS / "presets/stage1_vit3d_tiny.yaml"],
                               [S2, EXPERIMENTS / "presets/stage2_instruct_tiny.yaml"],
                               [S3, EXPERIMENTS / "presets/stage3_reconstruct_tiny.yaml"]]}
    for name, combos in sets.items():
        want = load(EXPERIMENTS / "teachers" / name)
        for files in combos:
            cfg = parse(["test", *[a for f in files for a in ("-c", str(f))]])
            got = cfg.model.init_args.clip_teacher
            assert got.class_path == want["class_path"], (name, files)
            for k, v in want["init_args"].items():
                assert got.init_args[k] == v, (name, [f.name for f in files], k)


def test_a_teacher_reference_works_from_another_working_directory(tmp_path, monkeypatch):
    """The path is relative to the referencing YAML, not to the working directory."""
    monkeypatch.chdir(tmp_path)
    cfg = parse(["fit", "-c", str(S1)])
    assert cfg.model.init_args.clip_teacher.init_args.model_name == load(
        EXPERIMENTS / "teachers/clip_paper.yaml")["init_args"]["model_name"]


# ------------------------------------------------------------------------------------------- run paths
@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: str(p.relative_to(EXPERIMENTS)))
def test_no_yaml_states_a_run_path_twice(path):
    cfg = load(path)
    trainer = cfg.get("trainer") if isinstance(cfg, dict) else None
    if not isinstance(trainer, dict) or "default_root_dir" not in trainer:
        return
    loggers = trainer.get("logger")
    for lg in loggers if isinstance(loggers, list) else [loggers]:
        if isinstance(lg, dict):
            assert "save_dir" not in (lg.get("init_args") or {}), \
                f"{path.name}: trainer.default_root_dir and the logger's save_dir both stated"


@pytest.mark.parametrize("extra, root, save_dir", [
    ([], "runs/stage1_vit3d", "runs/stage1_vit3d"),
    (["--trainer.default_root_dir=elsewhere"], "elsewhere", "elsewhere"),
    (["--trainer.default_root_dir=a", "--trainer.logger.init_args.save_dir=a"], "a", "a"),  # the Makefile's form
    (["--trainer.default_root_dir=a", "--trainer.logger.init_args.save_dir=b"], "a", "b"),  # explicit wins
    (["--trainer.logger.init_args.save_dir=b"], "runs/stage1_vit3d", "b"),
], ids=["yaml", "root-moves-logs", "makefile-both", "explicit-save-dir", "save-dir-only"])
def test_logger_save_dir_follows_default_root_dir(extra, root, save_dir):
    cfg = parse(["fit", "-c", str(S1), *extra])
    assert (cfg.trainer.default_root_dir, cfg.trainer.logger.init_args.save_dir) == (root, save_dir)


def test_a_preset_root_moves_the_stage_logger(capsys):
    """A preset states only its run folder; the stage YAML's logger follows it (--print_config shows it)."""
    assert run_cli(["fit", "-c", str(S1), "-c", str(EXPERIMENTS / "presets/stage1_vit3d_demo_heldout.yaml"),
                    "--print_config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["trainer"]["logger"]["init_args"]["save_dir"] == "runs/stage1_demo_heldout"
    assert cfg["trainer"]["logger"]["init_args"]["name"] == "tb"


def test_logs_land_under_the_default_root_dir(tiny_store, tmp_path):
    """Instantiated (no subcommand): the TensorBoard folder is under the one path given."""
    from neurovision.runs.lightning import NeuroVisionCLI

    store = tmp_path / "tiny.h5"
    shutil.copy(tiny_store, store)
    root = tmp_path / "run"
    cli = NeuroVisionCLI(args=["-c", str(EXPERIMENTS / "baseline_linear.yaml"),
                               "-c", str(EXPERIMENTS / "presets/cpu_tiny.yaml"),
                               f"--data.init_args.store={store}", f"--trainer.default_root_dir={root}"], run=False)
    assert Path(cli.trainer.logger.log_dir).is_relative_to(root)
    assert Path(cli.trainer.default_root_dir) == root


# ------------------------------------------------------------------------------------------- data group
@pytest.mark.parametrize("path", STAGE_YAMLS, ids=lambda p: p.name)
def test_every_stage_uses_a_data_group_file(path):
    data = load(path)["data"]
    assert isinstance(data, str), f"{path.name}: data is inline; reference an experiments/data/ file"
    target = (path.parent / data).resolve()
    assert target.is_file() and target.parent == EXPERIMENTS / "data", f"{path.name}: data = {data}"
    cfg = parse(["fit" if path != S3 else "test", "-c", str(path)])
    want = load(target)
    assert cfg.data.class_path == want["class_path"]
    for k, v in want["init_args"].items():
        assert cfg.data.init_args[k] == v, (path.name, k)


# ------------------------------------------------------------------------------------------- stage-1 path
def stage1_writes(files: list[Path]) -> str:
    """Where stage 1's ModelCheckpoint writes last.ckpt on a fresh run of these configs."""
    cfg = parse(["fit", *[a for f in files for a in ("-c", str(f))]])
    lg = cfg.trainer.logger.init_args
    (ckpt,) = [c for c in cfg.trainer.callbacks if c.class_path.endswith("ModelCheckpoint")]
    assert ckpt.init_args.save_last and ckpt.init_args.dirpath is None
    return str(Path(lg.save_dir) / lg.name / "version_0" / "checkpoints" / "last.ckpt")


@pytest.mark.parametrize("size", ["", "_demo", "_tiny"], ids=["paper", "demo", "tiny"])
def test_stages_2_and_3_read_what_stage_1_writes(size):
    preset = (lambda stem: [EXPERIMENTS / f"presets/{stem}{size}.yaml"]) if size else (lambda stem: [])
    writes = stage1_writes([S1, *preset("stage1_vit3d")])
    reads = {name: parse([cmd, *[a for f in files for a in ("-c", str(f))]]).model.init_args.stage1
             for name, cmd, files in (("stage2", "fit", [S2, *preset("stage2_instruct")]),
                                      ("stage3", "test", [S3, *preset("stage3_reconstruct")]))}
    assert reads == {"stage2": writes, "stage3": writes}
