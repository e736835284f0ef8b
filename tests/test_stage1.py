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
    from neurovision.pretrained.teachers import OpenCLIPImageTeacher, TeacherCache
    from neurovision.tasks import AlignmentTask

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


def test_bank_infonce_equals_infonce_when_the_bank_is_the_batch():
    from neurovision.tasks.alignment import info_nce, info_nce_bank

    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(6, 16, generator=g), torch.randn(6, 16, generator=g)
    bank = torch.nn.functional.normalize(target, dim=-1)
    same = info_nce_bank(pred, target, torch.arange(6), bank, 0.1)
    assert same.item() == pytest.approx(info_nce(pred, target, 0.1).item(), rel=1e-5)
    # a near-duplicate of item 0's image in the bank (but not in the batch) is a hard negative: the loss rises
    twin = torch.nn.functional.normalize(target[:1] + 0.05 * torch.randn(1, 16, generator=g), dim=-1)
    harder = info_nce_bank(pred, target, torch.arange(6), torch.cat([bank, twin]), 0.1)
    assert harder.item() > same.item()


def test_train_negatives_bank_holds_the_trained_subjects_training_images(tiny_store, tmp_path):
    import lightning as L

    from data_modules import FMRIDataModule
    from neurovision.pretrained.teachers import OpenCLIPImageTeacher, TeacherCache
    from neurovision.tasks import AlignmentTask

    store = tmp_path / "tiny.h5"
    shutil.copy(tiny_store, store)
    dm = FMRIDataModule(store=str(store), batch_size=8, subjects=["sub-01", "sub-02"])
    clip = OpenCLIPImageTeacher(model_name="tiny_clip", model_config=str(ROOT / "experiments/teachers/tiny_clip.json"),
                                device="cpu")
    with pytest.raises(ValueError, match="negatives='train' needs contrastive='infonce'"):
        AlignmentTask(data_spec=dm.spec, clip_teacher=clip, negatives="train")
    seen: dict[str, torch.Tensor] = {}

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            seen["contrastive"] = trainer.callback_metrics["train/contrastive"].clone()

    task = AlignmentTask(data_spec=dm.spec, clip_teacher=clip, vae_teacher=None, dim=32, depth=1, heads=2,
                         head_hidden=32, contrastive="infonce", contrastive_weight=1.0, negatives="train")
    L.Trainer(max_steps=2, limit_val_batches=0, logger=False, enable_checkpointing=False, callbacks=[Spy()],
              enable_progress_bar=False, enable_model_summary=False).fit(task, dm)
    st = dm.store
    t = st.trials
    mask = st.split_mask("train") & np.isin(t["subject"], [0, 1])
    train = np.unique(t["stimulus"][mask])
    assert len(train) < len(np.unique(t["stimulus"][st.split_mask("train")]))  # sub-03/04's images left out
    truth = torch.nn.functional.normalize(torch.from_numpy(np.asarray(TeacherCache().get(st, clip))).float(), dim=-1)
    assert torch.allclose(task.bank, truth[train], atol=1e-6)
    row = task.bank_row.numpy()
    np.testing.assert_array_equal(row[train], np.arange(len(train)))
    assert (np.delete(row, train) == -1).all()
    assert torch.isfinite(seen["contrastive"])


def test_linear_skip_starts_at_zero_and_learns(tiny_store):
    """The linear path beside the ViT3D is zero at initialisation (same predictions as without it), reads every
    active voxel, and gets gradients."""
    from data_modules import FMRIDataModule
    from neurovision.pretrained.teachers import OpenCLIPImageTeacher
    from neurovision.tasks import AlignmentTask

    dm = FMRIDataModule(store=str(tiny_store), batch_size=4)
    clip = OpenCLIPImageTeacher(model_name="tiny_clip", model_config=str(ROOT / "experiments/teachers/tiny_clip.json"),
                                device="cpu")
    kw = dict(data_spec=dm.spec, clip_teacher=clip, vae_teacher=None, dim=32, depth=1, heads=2, head_hidden=32)
    torch.manual_seed(0)
    plain = AlignmentTask(**kw).eval()
    torch.manual_seed(0)
    skip = AlignmentTask(**kw, linear_skip=True).eval()
    patches = torch.randn(3, dm.spec.num_active_patches, dm.spec.patch_dim)
    torch.testing.assert_close(skip(patches)["clip"], plain(patches)["clip"])
    lin = skip.skip.linear
    assert lin.in_features == dm.spec.num_active_patches * dm.spec.patch_dim
    skip.train()
    skip(patches)["clip"].pow(2).sum().backward()
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0


def test_rank_read_out_is_fitted_on_repeat_averaged_training_patterns_and_travels_with_the_checkpoint(
        tiny_store, tmp_path):
    """With ``linear_skip_rank`` the fit fits the principal subspace of the training (subject, stimulus)
    patterns averaged over repeats (recomputed here straight from the store), saves it in the checkpoint,
    ``neurovision test`` restores it, and ``load_stage1`` makes the same CLIP predictions as the task."""
    from neurovision.data.store import Store
    from neurovision.models import VoxelReadout
    from neurovision.models.stage1 import load_stage1
    from neurovision.tasks import AlignmentTask

    store = tmp_path / "tiny.h5"
    shutil.copy(tiny_store, store)
    args = ["-c", str(STAGE1), "-c", str(TINY), f"--data.init_args.store={store}",
            f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.enable_progress_bar=false", "--trainer.max_epochs=1",
            f"--model.init_args.clip_teacher.init_args.model_config={ROOT / 'experiments/teachers/tiny_clip.json'}",
            "--model.init_args.linear_skip=true", "--model.init_args.linear_skip_rank=8"]
    assert run_cli(["fit", *args]) == 0
    ckpt = sorted(tmp_path.rglob("last.ckpt"))[0]
    sd = torch.load(ckpt, weights_only=True, map_location="cpu")["state_dict"]
    assert bool(sd["skip.fitted"]) and sd["skip.basis"].shape[1] == 8

    st = Store(store)
    t = st.trials
    train = np.flatnonzero(st.split_mask("train"))
    keys = sorted({(int(t["subject"][i]), int(t["stimulus"][i])) for i in train})
    pats = torch.stack([torch.from_numpy(np.stack([st.patches(int(i)) for i in train
                                                   if (t["subject"][i], t["stimulus"][i]) == k])).float().mean(0)
                        for k in keys])
    ref = VoxelReadout(pats[0].numel(), 1, rank=8)
    ref.fit(pats)
    torch.testing.assert_close(sd["skip.basis"], ref.basis, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sd["skip.mean"], ref.mean)

    assert run_cli(["test", *args, f"--ckpt_path={ckpt}"]) == 0
    assert "test/average/retrieval_fmri2img" in _metrics(tmp_path)

    from neurovision.pretrained.teachers import OpenCLIPImageTeacher, VAETeacher

    clip = OpenCLIPImageTeacher(model_name="tiny_clip", model_config=str(ROOT / "experiments/teachers/tiny_clip.json"),
                                device="cpu")
    task = AlignmentTask.load_from_checkpoint(ckpt, weights_only=True, clip_teacher=clip,
                                              vae_teacher=VAETeacher(config="tiny", image_size=64, device="cpu")).eval()
    parts = load_stage1(ckpt)
    assert parts.skip is not None and parts.skip.rank == 8
    x = torch.from_numpy(np.stack([st.patches(int(i)) for i in train[:5]])).float()
    with torch.no_grad():
        mine = parts.predict_clip(parts.encoder(x).cls, x)
        theirs = task(x)["clip"]
        torch.testing.assert_close(mine, theirs)
        assert not torch.allclose(mine, parts.clip_head(parts.encoder(x).cls))  # the read-out is in it
