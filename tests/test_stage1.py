"""Stage 1 (AlignmentTask) end to end on the tiny phantom through the CLI, with tiny real teachers."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]
STAGE1 = ROOT / "experiments" / "stage1_vit3d.yaml"
TINY = ROOT / "experiments" / "presets" / "stage1_vit3d_tiny.yaml"



def _metrics(root: Path) -> dict[str, float]:
    (table,) = sorted(root.rglob("metrics_table.csv"))[-1:]
    with open(table) as f:
        return {r["metric"]: float(r["value"]) for r in csv.DictReader(f)}


@pytest.fixture(scope="module")
def stage1_run(tiny_store, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stage1")
    store = tmp / "tiny.h5"
    shutil.copy(tiny_store, store)
    args = ["fit", "-c", str(STAGE1), "-c", str(TINY), f"--data.init_args.store={store}",
            f"--trainer.default_root_dir={tmp}", f"--trainer.logger.init_args.save_dir={tmp}",
            "--trainer.enable_progress_bar=false", "--trainer.max_epochs=1",
            f"--model.init_args.clip_teacher.init_args.model_config={ROOT / 'experiments/teachers/tiny_clip.json'}"]
    assert run_cli(args) == 0
    return tmp, store, args


def test_fit_logs_retrieval_per_condition_and_subject(stage1_run):
    tmp, _, _ = stage1_run
    m = _metrics(tmp)
    for cond in ("average", "single"):
        for k in ("retrieval_fmri2img", "retrieval_img2fmri", "identification", "vae_mse", "retrieval_chance"):
            assert f"val/{cond}/{k}" in m
        assert f"val/{cond}/sub-01/retrieval_fmri2img" in m
    assert m["val/average/retrieval_chance"] == pytest.approx(1 / 4)  # 4 val images per subject


def test_teacher_targets_are_cached_and_reused(stage1_run):
    tmp, store, args = stage1_run
    cache = store.with_name("tiny.teachers.h5")
    assert cache.is_file()
    before = cache.stat().st_mtime_ns
    assert run_cli(["validate", *args[1:-2]]) == 0
    assert cache.stat().st_mtime_ns == before


def test_checkpoint_loads_with_weights_only(stage1_run):
    tmp, _, _ = stage1_run
    ckpt = sorted(tmp.rglob("last.ckpt"))[0]
    state = torch.load(ckpt, weights_only=True, map_location="cpu")
    assert any(k.startswith("encoder.") for k in state["state_dict"])
    assert not any("teacher" in k for k in state["state_dict"])  # frozen teachers are not part of the model


def test_shuffle_targets_trains_on_a_derangement_of_the_training_images(tiny_store, tmp_path):
    import lightning as L

    from data_modules import FMRIDataModule
    from neurovision.tasks import AlignmentTask
    from neurovision.teachers import OpenCLIPImageTeacher, TeacherCache

    store = tmp_path / "tiny.h5"
    shutil.copy(tiny_store, store)
    dm = FMRIDataModule(store=str(store), batch_size=8)
    clip = OpenCLIPImageTeacher(model_name="tiny_clip", model_config=str(ROOT / "experiments/teachers/tiny_clip.json"),
                                device="cpu")
    seen: dict[str, torch.Tensor] = {}

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            seen["index"] = module.train_target_index.clone()
            seen["stimulus"] = batch["stimulus"].clone()
            seen["targets"] = module._targets(module.train_target_index[batch["stimulus"]])["clip"].clone()

    task = AlignmentTask(data_spec=dm.spec, clip_teacher=clip, vae_teacher=None, dim=32, depth=1, heads=2,
                         head_hidden=32, shuffle_targets=True)
    L.Trainer(max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False, callbacks=[Spy()],
              enable_progress_bar=False, enable_model_summary=False).fit(task, dm)
    index = seen["index"].numpy()
    st = dm.store
    train = np.unique(st.trials["stimulus"][st.split_mask("train")])
    others = np.setdiff1d(np.arange(len(index)), train)
    assert sorted(index[train]) == sorted(train)  # a permutation of the training images
    assert (index[train] != train).all()  # none keeps its own target
    np.testing.assert_array_equal(index[others], others)  # val/test images keep theirs (evaluation is honest)
    truth = torch.from_numpy(np.asarray(TeacherCache().get(st, clip))).float()
    assert torch.allclose(seen["targets"], truth[index[seen["stimulus"].numpy()]])
    assert not torch.allclose(seen["targets"], truth[seen["stimulus"]])
