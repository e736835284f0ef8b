"""Every user error ends ``neurovision`` with exit code 2 and at most 3 lines on stderr naming the file and the
YAML key or flag: no traceback, no ``Namespace(...)`` dump (issue 19). ``NEUROVISION_DEBUG=1`` keeps the traceback;
a failure that is not the user's keeps Python's (exit 1)."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from neurovision.cli import MAX_ERROR_LINES, USER_ERROR_EXIT
from tests.helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"


def cli(args: list[str]) -> int:
    """``run_cli`` with Lightning's log handlers on this test's stderr: they hold the stderr of whatever test imported
    lightning first (maybe closed by now), and the lines they add (``Seed set to 0``) count as a terminal shows them."""
    import logging

    import lightning  # noqa: F401  (its handlers exist)

    moved = [(h, h.stream) for name in ("lightning", "lightning.fabric", "lightning.pytorch")
             for h in logging.getLogger(name).handlers if type(h) is logging.StreamHandler]
    for h, _ in moved:
        h.stream = sys.stderr  # not setStream: it flushes the old stream, which may be closed
    try:
        return run_cli(args)
    finally:
        for h, old in moved:
            h.stream = old


def _stage1(store: Path, tmp: Path) -> list[str]:
    return ["fit", "-c", str(EXPERIMENTS / "stage1_vit3d.yaml"), "-c", str(EXPERIMENTS / "presets" / "stage1_vit3d_tiny.yaml"),
            f"--data.init_args.store={store}", f"--trainer.default_root_dir={tmp}",
            f"--trainer.logger.init_args.save_dir={tmp}",
            f"--model.init_args.clip_teacher.init_args.model_config={EXPERIMENTS / 'teachers' / 'tiny_clip.json'}"]


def _stage2(store: Path, tmp: Path) -> list[str]:
    return ["fit", "-c", str(EXPERIMENTS / "stage2_instruct.yaml"), "-c", str(EXPERIMENTS / "presets" / "stage2_instruct_tiny.yaml"),
            f"--data.init_args.store={store}", f"--trainer.default_root_dir={tmp}",
            f"--trainer.logger.init_args.save_dir={tmp}",
            f"--model.init_args.clip_teacher.init_args.model_config={EXPERIMENTS / 'teachers' / 'tiny_clip.json'}"]


def _llm_dir(tmp: Path) -> Path:
    """A folder that passes the existence check of model.init_args.llm (nothing reads it before the error)."""
    d = tmp / "llm"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text("{}")
    return d


def assert_user_error(code: int, capsys: pytest.CaptureFixture, *names: str) -> str:
    """Exit 2, 1..3 lines on stderr, the last one ``neurovision <cmd>: error: ...`` naming every one of ``names``."""
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == USER_ERROR_EXIT, err
    assert 1 <= len(lines) <= MAX_ERROR_LINES, f"{len(lines)} lines:\n{err}"
    assert "Traceback" not in err and "Namespace(" not in err and "usage:" not in err, err
    error = "\n".join(ln for ln in lines if ": error: " in ln or not ln.startswith(("Seed set", "WARNING")))
    for n in names:
        assert n in error, f"{n!r} not in {error!r}"
    return error


# --------------------------------------------------------------------------------------------- missing inputs
def test_missing_stage1_checkpoint(tiny_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "none.ckpt"
    code = cli([*_stage2(tiny_store, tmp_path), f"--model.init_args.llm={_llm_dir(tmp_path)}",
                    f"--model.init_args.stage1={missing}"])
    assert_user_error(code, capsys, str(missing), "model.init_args.stage1", "flag --model.init_args.stage1")


def test_missing_llm(tiny_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    stage1 = tmp_path / "s1.ckpt"
    stage1.write_bytes(b"x")  # exists: the LLM is the missing input
    code = cli([*_stage2(tiny_store, tmp_path), f"--model.init_args.llm={tmp_path / 'nollm'}",
                    f"--model.init_args.stage1={stage1}"])
    assert_user_error(code, capsys, "nollm", "model.init_args.llm")


def test_missing_clip_teacher(tiny_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The case that printed 110 lines ending in a Namespace dump (jsonargparse wraps the class's error)."""
    code = cli([*_stage1(tiny_store, tmp_path), f"--model.init_args.clip_teacher.init_args.checkpoint={tmp_path / 'clip.pt'}"])
    assert_user_error(code, capsys, "clip.pt", "model.init_args.clip_teacher.init_args.checkpoint")


def test_missing_vae_folder(tiny_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = cli([*_stage1(tiny_store, tmp_path), f"--model.init_args.vae_teacher.init_args.path={tmp_path / 'novae'}"])
    assert_user_error(code, capsys, "novae", "vae_teacher")


def test_missing_store(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = cli(_stage1(tmp_path / "absent.h5", tmp_path))
    assert_user_error(code, capsys, "absent.h5", "data.init_args.store")


# --------------------------------------------------------------------------------------------- wrong inputs
def test_stage1_checkpoint_of_another_grid(tiny_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from neurovision.data.store import Store

    grid = Store(tiny_store).grid
    other = tuple(int(v) + 4 for v in grid.shape)
    ckpt = tmp_path / "other_grid.ckpt"
    torch.save({"hyper_parameters": {"dim": 8, "depth": 1, "heads": 2, "data_spec": {
        "num_active_patches": int(grid.n_active), "patch_size": int(grid.patch_size), "grid_shape": other,
        "patch_coords": [], "num_subjects": 2, "image_shape": [32, 32, 3]}}, "state_dict": {}}, ckpt)
    code = cli([*_stage2(tiny_store, tmp_path), f"--model.init_args.llm={_llm_dir(tmp_path)}",
                    f"--model.init_args.stage1={ckpt}"])
    assert_user_error(code, capsys, "other_grid.ckpt", "data_spec/grid_shape", str(other), "model.init_args.stage1")


@pytest.mark.parametrize("value", ["-1", "0"])
def test_bad_batch_size_flag(tiny_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture, value: str) -> None:
    code = cli([*_stage1(tiny_store, tmp_path), f"--data.init_args.batch_size={value}"])
    assert_user_error(code, capsys, "data.init_args.batch_size", "flag --data.init_args.batch_size")
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("events.out*"))  # stopped before the run


def test_bad_batch_size_in_yaml_names_the_file(tiny_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bs.yaml"
    bad.write_text("data:\n  init_args:\n    batch_size: -8\n")
    code = cli([*_stage1(tiny_store, tmp_path), "-c", str(bad)])
    assert_user_error(code, capsys, "data.init_args.batch_size", "bs.yaml")


def test_unknown_yaml_key_names_key_and_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  class_path: neurovision.tasks.LinearDecoder\n  init_args:\n    thumbnal: 8\n")
    code = cli(["fit", "-c", str(EXPERIMENTS / "baseline_linear.yaml"), "-c", str(bad), "--print_config"])
    assert_user_error(code, capsys, "thumbnal", "bad.yaml")


def test_wrong_type_flag_names_the_flag(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = cli(["fit", "-c", str(EXPERIMENTS / "baseline_linear.yaml"), "--data.init_args.batch_size=abc",
                    "--print_config"])
    assert_user_error(code, capsys, "data.init_args.batch_size", "abc")


def test_config_file_missing_or_not_yaml(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = ["fit", "-c", str(EXPERIMENTS / "baseline_linear.yaml")]
    assert_user_error(cli([*base, "-c", str(tmp_path / "nope.yaml"), "--print_config"]), capsys, "nope.yaml", "-c")
    bad = tmp_path / "syntax.yaml"
    bad.write_text("model: [unclosed\n")
    assert_user_error(cli([*base, "-c", str(bad), "--print_config"]), capsys, "syntax.yaml", "not valid YAML", "line 2")


def test_tool_flag_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """argparse (localize) and jsonargparse (prepare) flag errors: no usage screen."""
    assert_user_error(cli(["localize", "--out", str(tmp_path)]), capsys, "--ckpt")
    assert_user_error(cli(["localize", "--ckpt", "a.ckpt", "--out", str(tmp_path), "--split", "bogus"]), capsys,
                      "--split", "bogus")
    assert_user_error(cli(["prepare", "nsd", "--root", str(tmp_path), "--out", str(tmp_path / "x.h5"),
                           "--subjects", "abc"]), capsys, "subjects", "abc")


def test_corrupt_store_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "text.h5"
    bad.write_text("not an HDF5 file\n")
    assert_user_error(cli(_stage1(bad, tmp_path)), capsys, "text.h5")
    assert_user_error(cli(["inspect", str(bad)]), capsys, "text.h5")


# --------------------------------------------------------------------------------------------- outputs
def _read_only_dir(tmp: Path) -> Path:
    """A folder this process cannot create files in: mode 0555, or (as root, whom modes do not stop) /sys."""
    d = tmp / "ro"
    d.mkdir()
    d.chmod(0o555)
    if os.access(d, os.W_OK):
        d.chmod(0o755)
        d = Path("/sys")
        if not d.is_dir() or os.access(d, os.W_OK) and _can_create(d):
            pytest.skip("no read-only folder on this machine")
    return d


def _can_create(d: Path) -> bool:
    try:
        (d / ".nv_probe").touch()
    except OSError:
        return False
    (d / ".nv_probe").unlink()
    return True


@pytest.mark.parametrize("kind", ["directory", "under_a_file", "read_only"])
def test_prepare_out_that_cannot_be_written(tmp_path: Path, capsys: pytest.CaptureFixture, kind: str) -> None:
    if kind == "directory":
        out = tmp_path
    elif kind == "under_a_file":
        (tmp_path / "f.h5").write_text("x")
        out = tmp_path / "f.h5" / "x.h5"
    else:
        out = _read_only_dir(tmp_path) / "x.h5"
    code = cli(["prepare", "phantom", "--preset", "tiny", "--n_subjects", "1", "--out", str(out)])
    assert_user_error(code, capsys, "--out", str(out))
    assert not list(tmp_path.glob("*.partial"))


def _fake_source(exc: BaseException):  # noqa: ANN202 - a registry entry for prepare_main
    def fake(out: str, preset: str = "tiny") -> Path:
        """A source that fails while writing."""
        raise exc

    return fake


def test_disk_full_names_the_output(tmp_path: Path, capsys: pytest.CaptureFixture,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import neurovision.sources as sources

    out = tmp_path / "x.h5"
    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / ".x.h5.abc.partial"))
    monkeypatch.setattr(sources, "registry", lambda: {"phantom": _fake_source(full)})
    code = cli(["prepare", "phantom", "--out", str(out)])
    assert_user_error(code, capsys, "--out", str(out), "disk full")


# --------------------------------------------------------------------------------------------- not user errors
def test_a_bug_keeps_its_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import neurovision.sources as sources

    monkeypatch.setattr(sources, "registry", lambda: {"phantom": _fake_source(RuntimeError("a bug"))})
    with pytest.raises(RuntimeError, match="a bug"):  # uncaught: Python prints the traceback, exit 1
        cli(["prepare", "phantom", "--out", str(tmp_path / "x.h5")])


@pytest.mark.parametrize("var", ["NEUROVISION_DEBUG", "NEUROVISION_TRACEBACK"])
def test_debug_env_keeps_the_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, var: str) -> None:
    monkeypatch.setenv(var, "1")
    with pytest.raises(FileNotFoundError, match="field 'root'"):
        cli(["prepare", "nsd", "--root", str(tmp_path / "no_nsd"), "--out", str(tmp_path / "x.h5")])


@pytest.mark.slow
def test_whole_process_stderr(tiny_store: Path, tmp_path: Path) -> None:
    """The real process: what reaches the terminal (loggers, warnings and all), and the exit code."""
    store = tmp_path / "tiny.h5"
    shutil.copy(tiny_store, store)
    env = {k: v for k, v in os.environ.items() if k not in ("NEUROVISION_DEBUG", "NEUROVISION_TRACEBACK")}
    r = subprocess.run([sys.executable, "-m", "neurovision.cli", *_stage1(store, tmp_path),
                        f"--model.init_args.clip_teacher.init_args.checkpoint={tmp_path / 'clip.pt'}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == USER_ERROR_EXIT, r.stderr[-3000:]
    assert len(lines) <= MAX_ERROR_LINES and "clip.pt" in lines[-1] and "Traceback" not in r.stderr, r.stderr[-3000:]


def test_the_data_module_itself_refuses_a_non_positive_batch_size(tiny_store):
    from data_modules import FMRIDataModule

    for bad in (0, -3):
        with pytest.raises(ValueError, match=r"data.init_args.batch_size: .*must be an integer >= 1"):
            FMRIDataModule(tiny_store, batch_size=bad)


@pytest.mark.parametrize("class_path, new", [
    ("neurovision.teachers.OpenCLIPImageTeacher", "neurovision.pretrained.teachers"),
    ("neurovision.interpretation.Thing", "neurovision.localization.maps"),
])
def test_a_yaml_naming_a_moved_module_is_told_where_it_went(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                            class_path: str, new: str) -> None:
    """A config written before the package was organised by layer names a module that moved: one line saying
    where it went (not only "module 'neurovision' has no attribute ...")."""
    old = tmp_path / "old.yaml"
    old.write_text(f"model:\n  init_args:\n    clip_teacher:\n      class_path: {class_path}\n")
    code = run_cli(["fit", "-c", str(ROOT / "experiments" / "stage1_vit3d.yaml"), "-c", str(old), "--print_config"])
    err = assert_user_error(code, capsys, str(old), "model.init_args.clip_teacher")
    assert f"moved to {new}" in err


def test_a_sweep_naming_a_moved_after_hook_is_told_where_it_went(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    old = tmp_path / "old_beta.yaml"
    old.write_text((ROOT / "experiments" / "sweeps" / "beta.yaml").read_text().replace(
        "after: [neurovision.runs.beta_figures.figures]", "after: [neurovision.beta_sweep.figures]"))
    code = run_cli(["sweep", str(old), "--dry_run"])
    err = assert_user_error(code, capsys, str(old), "after")
    assert "neurovision.beta_sweep moved to neurovision.runs.beta_figures" in err
