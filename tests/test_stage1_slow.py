"""Stage 1: resuming from a mid-run checkpoint and 2-process DDP reproduce the uninterrupted 1-process run."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

from tests.helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]
STAGE1 = ROOT / "experiments" / "stage1_vit3d.yaml"
TINY = ROOT / "experiments" / "presets" / "stage1_vit3d_tiny.yaml"
KEYS = ("val/average/loss", "val/average/vae_mse", "val/average/clip_cosine", "val/single/clip_cosine")



def _final(root: Path) -> dict[str, float]:
    rows: dict[str, tuple[int, float]] = {}
    for table in root.rglob("metrics_table.csv"):
        with open(table) as f:
            for r in csv.DictReader(f):
                if r["stage"] == "val" and int(r["epoch"]) >= rows.get(r["metric"], (-1, 0.0))[0]:
                    rows[r["metric"]] = (int(r["epoch"]), float(r["value"]))
    return {k: v for k, (_, v) in rows.items()}


def _args(store: Path, out: Path, *extra: str) -> list[str]:
    return ["fit", "-c", str(STAGE1), "-c", str(TINY), f"--data.init_args.store={store}",
            f"--trainer.default_root_dir={out}", f"--trainer.logger.init_args.save_dir={out}",
            "--trainer.enable_progress_bar=false", "--model.init_args.drop_path=0.0",
            f"--model.init_args.clip_teacher.init_args.model_config={ROOT / 'experiments/teachers/tiny_clip.json'}",
            *extra]


@pytest.fixture(scope="module")
def store(tiny_store, tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("s1slow") / "tiny.h5"
    shutil.copy(tiny_store, p)
    return p


@pytest.fixture(scope="module")
def uninterrupted(store, tmp_path_factory) -> dict[str, float]:
    out = tmp_path_factory.mktemp("full")
    assert run_cli(_args(store, out, "--trainer.max_epochs=3", "--data.init_args.batch_size=16")) == 0
    return _final(out)


@pytest.mark.slow
def test_resume_from_mid_run_checkpoint_gives_the_same_metrics(store, uninterrupted, tmp_path):
    assert run_cli(_args(store, tmp_path, "--trainer.max_epochs=1", "--data.init_args.batch_size=16")) == 0
    (ckpt,) = list(tmp_path.rglob("last.ckpt"))
    assert run_cli(_args(store, tmp_path, "--trainer.max_epochs=3", "--data.init_args.batch_size=16",
                      f"--ckpt_path={ckpt}")) == 0
    resumed = _final(tmp_path)
    for k in KEYS:
        assert resumed[k] == pytest.approx(uninterrupted[k], rel=1e-4, abs=1e-6), k


@pytest.mark.slow
def test_ddp_two_cpu_processes_match_one_process(store, uninterrupted, tmp_path):
    assert run_cli(_args(store, tmp_path, "--trainer.max_epochs=3", "--data.init_args.batch_size=8",
                      "--trainer.devices=2", "--trainer.strategy=ddp_spawn")) == 0
    ddp = _final(tmp_path)
    for k in KEYS:
        assert ddp[k] == pytest.approx(uninterrupted[k], rel=2e-3, abs=1e-5), k
    assert abs(ddp["val/average/retrieval_fmri2img"] - uninterrupted["val/average/retrieval_fmri2img"]) <= 0.07
