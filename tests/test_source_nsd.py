"""The NSD converter on a tiny layout-faithful fake: structure, design bookkeeping, values, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
from scipy.io import loadmat
from scipy.ndimage import zoom

from neurovision.data.store import Store
from neurovision.sources import nsd
from tests.fakes.nsd import make_fake_nsd

TPS = 30  # trials per session in the fake
P = 4  # patch size (the fake grid is 11x14x12)


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_fake_nsd(tmp_path_factory.mktemp("nsd"), subjects=(1, 2), n_sessions=2, trials_per_session=TPS)


@pytest.fixture(scope="module")
def store(fake: Path, tmp_path_factory: pytest.TempPathFactory) -> Store:
    out = tmp_path_factory.mktemp("store") / "nsd.h5"
    nsd.prepare(fake, out, subjects=[1, 2], patch_size=P)  # the default val split
    return Store(out)


def _design(root: Path) -> dict[str, np.ndarray]:
    m = loadmat(str(nsd.expdesign_path(root)))
    return {"order": m["masterordering"].ravel().astype(int) - 1, "subjectim": m["subjectim"].astype(int) - 1,
            "shared": m["sharedix"].ravel().astype(int) - 1}


def _copy(fake: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(fake, tmp_path / "nsd"))


def test_structure_and_design(store: Store, fake: Path) -> None:
    d = _design(fake)
    assert store.subject_names == ["subj01", "subj02"]
    assert store.grid.shape == (11, 14, 12)  # subj01's NIfTI-order shape
    assert store.subject("subj02").original_shape == (12, 13, 11)
    assert len(store) == 2 * 2 * TPS
    t = store.trials
    ids = store.stimulus_ids
    assert np.all(np.diff(ids) > 0)
    for si, s in enumerate((1, 2)):
        m = t["subject"] == si
        assert [int((m & (t["session"] == k)).sum()) for k in (1, 2)] == [TPS, TPS]
        expected = d["subjectim"][s - 1, d["order"][: 2 * TPS]]
        shown = ids[t["stimulus"][m]]
        np.testing.assert_array_equal(shown, expected)
        reps = t["repeat"][m]
        assert reps.max() == 2
        for i in range(len(shown)):
            assert reps[i] == int((shown[:i] == shown[i]).sum())
    # every used image, and only those
    used = np.unique(np.concatenate([d["subjectim"][s - 1, d["order"][: 2 * TPS]] for s in (1, 2)]))
    np.testing.assert_array_equal(ids, used)
    # splits: shared -> test; the rest train or val (the val split: see the tests below)
    is_shared = np.isin(ids[t["stimulus"]], d["shared"])
    assert np.all(t["split"][is_shared] == 2) and np.all(t["split"][~is_shared] < 2)
    np.testing.assert_array_equal(store.extra("shared1000").astype(bool), np.isin(ids, d["shared"]))
    # images
    with h5py.File(nsd.stimuli_path(fake), "r") as f:
        brick = f["imgBrick"][()]
    for r in (0, len(ids) - 1):
        np.testing.assert_array_equal(store.image(r), brick[ids[r]])
    assert store.attrs["source"] == "nsd"


def _image_splits(store: Store) -> dict[int, dict[int, int]]:
    """subject -> {stimulus row: split}, asserting all repeats of an image (of every subject) share one split."""
    t = store.trials
    split_of: dict[int, int] = {}
    out: dict[int, dict[int, int]] = {}
    for su, st, sp in zip(t["subject"].tolist(), t["stimulus"].tolist(), t["split"].tolist(), strict=True):
        assert split_of.setdefault(st, sp) == sp, f"stimulus {st}: trials in splits {split_of[st]} and {sp}"
        out.setdefault(su, {})[st] = sp
    return out


def _val_images(store: Store) -> dict[str, set[int]]:
    """subject name -> the nsdIds of its validation images."""
    ids = store.stimulus_ids
    return {store.subject_names[su]: {int(ids[st]) for st, sp in rows.items() if sp == 1}
            for su, rows in _image_splits(store).items()}


def test_default_val_split_is_a_slice_of_each_subjects_training_images(store: Store, fake: Path) -> None:
    d = _design(fake)
    assert json.loads(store.attrs["options"])["val_fraction"] == nsd.DEFAULT_VAL_FRACTION > 0  # provenance
    splits = _image_splits(store)  # all repeats of an image in one split
    ids = store.stimulus_ids
    for su, rows in splits.items():
        val = {st for st, sp in rows.items() if sp == 1}
        train = {st for st, sp in rows.items() if sp == 0}
        test = {st for st, sp in rows.items() if sp == 2}
        assert len(val) >= nsd.MIN_VAL_IMAGES and train, f"subject {su}: {len(val)} val, {len(train)} train images"
        assert not val & train and not val & test
        assert not {int(ids[st]) for st in val} & set(d["shared"].tolist())  # never a shared1000 image
        n_own = len(val) + len(train)
        assert len(val) == max(nsd.MIN_VAL_IMAGES, round(nsd.DEFAULT_VAL_FRACTION * n_own))
    # every split has trials for every subject, all repeats included
    t = store.trials
    for su in splits:
        for sp in (0, 1, 2):
            assert ((t["subject"] == su) & (t["split"] == sp)).any()
    val_trials = t["split"] == 1
    assert t["repeat"][val_trials].max() >= 1  # repeats of a val image are val too


def test_val_split_is_seeded_and_per_subject(store: Store, fake: Path, tmp_path: Path) -> None:
    base = _val_images(store)
    again = tmp_path / "again.h5"
    nsd.prepare(fake, again, subjects=[1, 2], patch_size=P, seed=0)
    assert _val_images(Store(again)) == base  # same seed, same split
    other = tmp_path / "seed1.h5"
    nsd.prepare(fake, other, subjects=[1, 2], patch_size=P, seed=1)
    assert _val_images(Store(other)) != base
    # drawn per subject: subj02's val images do not depend on subj01 being converted too
    alone = tmp_path / "subj02.h5"
    nsd.prepare(fake, alone, subjects=[2], patch_size=P)
    assert _val_images(Store(alone))["subj02"] == base["subj02"]


@pytest.mark.parametrize("fraction", [0.0, 0.5])
def test_val_fraction_option(fake: Path, tmp_path: Path, fraction: float) -> None:
    out = tmp_path / "nsd.h5"
    nsd.prepare(fake, out, subjects=[1], sessions=1, patch_size=P, val_fraction=fraction)
    s = Store(out)
    assert json.loads(s.attrs["options"])["val_fraction"] == fraction
    (rows,) = _image_splits(s).values()
    n_val = sum(sp == 1 for sp in rows.values())
    n_own = sum(sp < 2 for sp in rows.values())
    assert n_val == (0 if fraction == 0 else round(fraction * n_own))


def test_bad_val_fraction(fake: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="val_fraction must be in"):
        nsd.prepare(fake, tmp_path / "x.h5", subjects=[1], patch_size=P, val_fraction=1.0)


def test_captions(store: Store, fake: Path) -> None:
    import pandas as pd

    info = pd.read_csv(nsd.stim_info_path(fake), index_col=0).set_index("nsdId")
    by_coco: dict[int, list[str]] = {}
    for p in nsd.captions_paths(fake):
        for a in json.loads(p.read_text())["annotations"]:
            by_coco.setdefault(a["image_id"], []).append(a["caption"].strip())
    caps = store.annotations("captions")
    coco = store.extra("coco_ids")
    for r, nsd_id in enumerate(store.stimulus_ids):
        c = int(info.loc[int(nsd_id), "cocoId"])
        assert coco[r] == c
        assert caps[r] == by_coco[c] and len(caps[r]) >= 5


@pytest.mark.parametrize("subject", [1, 2])
def test_values_match_independent_pipeline(store: Store, fake: Path, subject: int) -> None:
    si = subject - 1
    idx = np.nonzero((store.trials["subject"] == si) & (store.trials["session"] == 2))[0]
    trial, within = int(idx[7]), 7
    with h5py.File(nsd.betas_path(fake, subject, 2), "r") as f:
        betas = f["betas"][()].astype(np.float64).transpose(0, 3, 2, 1) / 300  # (T, X, Y, Z)
    mu, sd = betas.mean(0), betas.std(0)
    z = np.where(sd > 1e-6, (betas[within] - mu) / np.where(sd > 1e-6, sd, 1), 0)
    z *= np.asarray(nib.load(nsd.brainmask_path(fake, subject)).dataobj) > 0
    grid = np.array(store.grid.shape)
    on_grid = zoom(z, grid / np.array(z.shape), order=1, mode="nearest", grid_mode=False)
    assert on_grid.shape == tuple(grid)
    padded = np.zeros(store.grid.padded_shape)
    padded[: grid[0], : grid[1], : grid[2]] = on_grid
    n = [s // P for s in store.grid.padded_shape]
    patches = padded.reshape(n[0], P, n[1], P, n[2], P).transpose(0, 2, 4, 1, 3, 5).reshape(-1, P**3)
    expected = patches[store.grid.active_index]
    got = store.patches(trial).astype(np.float64)
    np.testing.assert_allclose(got, expected, atol=5e-3, rtol=1e-3)
    assert np.abs(got).max() > 0.5  # not trivially zero


def test_active_patches_touch_union_of_rois(store: Store) -> None:
    union = store.union_mask()
    assert union.any() and union.shape == store.grid.shape
    n_active = store.grid.n_active
    assert 0 < n_active < store.grid.n_patches  # the ROI is posterior: some patches are inactive
    for s in store.subjects:
        assert store.roi(s.name).shape == s.original_shape


def test_rerun_is_noop_and_options_rebuild(fake: Path, tmp_path: Path) -> None:
    out = tmp_path / "nsd.h5"
    nsd.prepare(fake, out, subjects=[2], sessions=1, patch_size=P, image_size=8, zscore=False)
    s = Store(out)
    assert len(s) == TPS and set(s.trials["session"]) == {1} and s.image_shape == (8, 8, 3)
    assert s.grid.shape == (11, 14, 12)  # grid_subject 1's shape even when subject 1 is not selected
    mtime = out.stat().st_mtime_ns
    nsd.prepare(fake, out, subjects=[2], sessions=1, patch_size=P, image_size=8, zscore=False)
    assert out.stat().st_mtime_ns == mtime
    nsd.prepare(fake, out, subjects=[2], sessions=1, patch_size=P, image_size=8, zscore=False, grid_subject=2)
    assert Store(out).grid.shape == (12, 13, 11)


def test_missing_captions_warn(fake: Path, tmp_path: Path) -> None:
    root = _copy(fake, tmp_path)
    for p in nsd.captions_paths(root):
        p.unlink()
    out = tmp_path / "nsd.h5"
    with pytest.warns(UserWarning, match="caption"):
        nsd.prepare(root, out, subjects=[1], sessions=1, patch_size=P)
    assert all(c == [] for c in Store(out).annotations("captions"))


def test_missing_betas_session(fake: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"subj01.*betas_session03\.hdf5: field 'betas'"):
        nsd.prepare(fake, tmp_path / "x.h5", subjects=[1], sessions=3, patch_size=P)
    assert not (tmp_path / "x.h5").exists()


def test_gap_in_session_files(fake: Path, tmp_path: Path) -> None:
    root = _copy(fake, tmp_path)
    nsd.betas_path(root, 2, 1).unlink()
    with pytest.raises(FileNotFoundError, match=r"subj02.*betas_session01\.hdf5: field 'betas'"):
        nsd.prepare(root, tmp_path / "x.h5", subjects=[1, 2], patch_size=P)


def test_wrong_betas_dtype(fake: Path, tmp_path: Path) -> None:
    root = _copy(fake, tmp_path)
    p = nsd.betas_path(root, 2, 2)
    with h5py.File(p, "r+") as f:
        data = f["betas"][()]
        del f["betas"]
        f.create_dataset("betas", data=data.astype(np.float32))
    with pytest.raises(ValueError, match=r"betas_session02\.hdf5: field 'betas': dtype float32"):
        nsd.prepare(root, tmp_path / "x.h5", subjects=[1, 2], patch_size=P)


def test_wrong_betas_shape(fake: Path, tmp_path: Path) -> None:
    root = _copy(fake, tmp_path)
    p = nsd.betas_path(root, 1, 1)
    with h5py.File(p, "r+") as f:
        data = f["betas"][()]
        del f["betas"]
        f.create_dataset("betas", data=data[:, :, :, :-1])
    with pytest.raises(ValueError, match=r"subj01.*betas_session01\.hdf5: field 'betas': volume shape"):
        nsd.prepare(root, tmp_path / "x.h5", subjects=[1], patch_size=P)


def test_missing_subject(fake: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"subj03.*nsdgeneral\.nii\.gz: field 'nsdgeneral'"):
        nsd.prepare(fake, tmp_path / "x.h5", subjects=[1, 3], patch_size=P)


def test_missing_design_field(fake: Path, tmp_path: Path) -> None:
    root = _copy(fake, tmp_path)
    p = nsd.expdesign_path(root)
    m = {k: v for k, v in loadmat(str(p)).items() if not k.startswith("__") and k != "sharedix"}
    from scipy.io import savemat

    savemat(p, m)
    with pytest.raises(ValueError, match=r"nsd_expdesign\.mat: field 'sharedix': missing"):
        nsd.prepare(root, tmp_path / "x.h5", subjects=[1], patch_size=P)


def test_inconsistent_trial_count(fake: Path, tmp_path: Path) -> None:
    root = _copy(fake, tmp_path)
    p = nsd.betas_path(root, 2, 2)
    with h5py.File(p, "r+") as f:
        data = f["betas"][()]
        del f["betas"]
        f.create_dataset("betas", data=data[:-1])
    with pytest.raises(ValueError, match=rf"subj02.*betas_session02\.hdf5: field 'betas': {TPS - 1} trials"):
        nsd.prepare(root, tmp_path / "x.h5", subjects=[1, 2], patch_size=P)


def test_stage1_fit_on_the_default_nsd_store_logs_its_checkpoint_monitor(store: Store, tmp_path: Path) -> None:
    """The shipped stage-1 YAML (tiny model) on an NSD store prepared with the defaults: the val split exists,
    so the ModelCheckpoint's monitor is logged and it keeps a best checkpoint."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from neurovision.runs.lightning import NeuroVisionCLI

    root = Path(__file__).resolve().parents[1] / "experiments"
    local = tmp_path / "nsd.h5"
    shutil.copy(store.path, local)  # the teacher cache is written beside the store
    cli = NeuroVisionCLI(args=[
        "fit", "-c", str(root / "stage1_vit3d.yaml"), "-c", str(root / "presets" / "stage1_vit3d_tiny.yaml"),
        f"--data.init_args.store={local}", "--data.init_args.pin_memory=false",
        f"--model.init_args.clip_teacher.init_args.model_config={root / 'teachers' / 'tiny_clip.json'}",
        f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.enable_progress_bar=false"])
    (ckpt,) = [c for c in cli.trainer.callbacks if type(c) is ModelCheckpoint]
    assert ckpt.monitor == "val/average/retrieval_fmri2img"
    assert ckpt.monitor in cli.trainer.callback_metrics
    for name in store.subject_names:
        assert f"val/average/{name}/retrieval_fmri2img" in cli.trainer.callback_metrics
    assert ckpt.best_model_score is not None and Path(ckpt.best_model_path).is_file()
