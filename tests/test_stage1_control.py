"""Stage 1 shuffled-label control (slow, ~3.5 min on 2 cores): trained on another image's targets, the ViT3D's
test retrieval stays at chance, while the same recipe with the true targets is far above it.

One demo-geometry phantom subject (600 training images, 300 test images), a tiny CLIP trained on its
images for 10 epochs, and a small ViT3D trained for a few epochs.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from tests.helpers import run_cli

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
STAGE1 = ROOT / "experiments" / "stage1_vit3d.yaml"
DEMO = ROOT / "experiments" / "presets" / "stage1_vit3d_demo.yaml"
READOUT = ROOT / "experiments" / "presets" / "stage1_vit3d_demo_readout.yaml"
N_TEST = 300


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path, Path]:
    from neurovision.sources import phantom
    from neurovision.tiny.teachers import train_tiny_clip, train_tiny_vae

    tmp = tmp_path_factory.mktemp("control")
    store = phantom.prepare(tmp / "one.h5", preset="demo", n_subjects=1, n_test=N_TEST)
    # a step budget, not a time budget: the teacher must not depend on the machine's load
    train_tiny_clip(store, tmp / "teachers", epochs=10, progress=False, evaluate=False)
    train_tiny_vae(store, tmp / "teachers", steps=150, progress=False, evaluate=False)
    return tmp, store, tmp / "teachers"


def _test_retrieval(setup: tuple[Path, Path, Path], shuffle: bool, recipe: str) -> float:
    tmp, store, teachers = setup
    out = tmp / f"run_{recipe}_shuffle={shuffle}"
    presets = ["-c", str(DEMO)] + (["-c", str(READOUT)] if recipe == "readout" else [])
    args = ["-c", str(STAGE1), *presets, f"--data.init_args.store={store}",
            f"--trainer.default_root_dir={out}", f"--trainer.logger.init_args.save_dir={out}",
            "--trainer.enable_progress_bar=false", "--trainer.max_epochs=4", "--trainer.check_val_every_n_epoch=4",
            "--data.init_args.eval_conditions=[average]",
            f"--model.init_args.clip_teacher.init_args.model_config={teachers / 'tiny_clip.json'}",
            f"--model.init_args.clip_teacher.init_args.checkpoint={teachers / 'tiny_clip.pt'}",
            f"--model.init_args.vae_teacher.init_args.path={teachers / 'tiny_vae'}",
            f"--model.init_args.shuffle_targets={str(shuffle).lower()}"]
    assert run_cli(["fit", *args]) == 0
    assert run_cli(["test", *args, f"--ckpt_path={sorted(out.rglob('last.ckpt'))[0]}"]) == 0
    with open(sorted(out.rglob("metrics_table.csv"))[-1]) as f:
        rows = {r["metric"]: float(r["value"]) for r in csv.DictReader(f) if r["stage"] == "test"}
    assert rows["test/average/retrieval_chance"] == pytest.approx(1 / N_TEST)
    return rows["test/average/retrieval_fmri2img"]


@pytest.mark.parametrize("recipe", ["vit3d", "readout"])  # the demo preset, and with the 64-component read-out
def test_shuffled_targets_stay_at_chance_true_targets_do_not(setup, recipe):
    chance = 1 / N_TEST
    sd = math.sqrt(chance * (1 - chance) / N_TEST)  # one candidate set of all 300 test images
    shuffled = _test_retrieval(setup, shuffle=True, recipe=recipe)
    assert shuffled <= chance + 4 * sd, f"shuffled-label control above chance: {shuffled:.4f} (chance {chance:.4f})"
    real = _test_retrieval(setup, shuffle=False, recipe=recipe)
    assert real >= 5 * chance, f"true targets: {real:.4f}, not clearly above chance {chance:.4f}"
