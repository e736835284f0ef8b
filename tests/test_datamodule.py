"""FMRIDataModule: items, conditions, MixUp, subjects, workers, DDP sharding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_modules import FMRIDataModule
from neurovision.data.store import SPLITS, Store


@pytest.fixture()
def dm(tiny_store):
    d = FMRIDataModule(store=str(tiny_store), batch_size=8)
    d.prepare_data()
    d.setup("fit")
    return d


def test_train_items_are_all_train_trials_once(dm, tiny_store):
    s = Store(tiny_store)
    seen = []
    for batch in dm.train_dataloader():
        assert batch["patches"].dtype == torch.float32
        assert batch["patches"].shape[1:] == (s.grid.n_active, s.grid.patch_size**3)
        seen += batch["trial"].tolist()
    expected = np.nonzero(s.split_mask("train"))[0]
    assert sorted(seen) == expected.tolist()


def test_single_trial_item_equals_stored_patches(dm, tiny_store):
    s = Store(tiny_store)
    ds = dm.datasets["train"]
    item = ds[5]
    np.testing.assert_array_equal(item["patches"].numpy(), s.patches(item["trial"]).astype(np.float32))
    assert item["subject"] == s.trials["subject"][item["trial"]]
    assert item["stimulus"] == s.trials["stimulus"][item["trial"]]


def test_eval_conditions_average_and_single(dm, tiny_store):
    s = Store(tiny_store)
    avg, single = dm.datasets["test"]
    t = s.trials
    test = s.split_mask("test")
    n_pairs = len({(a, b) for a, b in zip(t["subject"][test], t["stimulus"][test], strict=True)})
    assert len(avg) == len(single) == n_pairs
    for i in (0, 7, len(avg) - 1):
        a, b = avg[i], single[i]
        assert (a["subject"], a["stimulus"]) == (b["subject"], b["stimulus"])
        rows = np.nonzero(test & (t["subject"] == a["subject"]) & (t["stimulus"] == a["stimulus"]))[0]
        assert a["n_repeats"] == len(rows) == 3
        manual = np.mean([s.patches(r).astype(np.float32) for r in rows], axis=0)
        np.testing.assert_allclose(a["patches"].numpy(), manual, rtol=1e-5, atol=1e-5)
        first = rows[t["repeat"][rows] == 0][0]
        assert b["trial"] == first
        np.testing.assert_array_equal(b["patches"].numpy(), s.patches(first).astype(np.float32))
    assert len(dm.val_dataloader()) == len(dm.test_dataloader()) == 2


def test_mixup_mixes_two_repeats_of_the_same_image(tiny_store):
    d = FMRIDataModule(store=str(tiny_store), mixup_prob=1.0, mixup_alpha=2.0)
    d.setup("fit")
    s = Store(tiny_store)
    ds = d.datasets["train"]
    torch.manual_seed(0)
    t = s.trials
    for i in range(5):
        item = ds[i]
        x = item["patches"].numpy().ravel()
        a = s.patches(item["trial"]).astype(np.float32).ravel()
        assert not np.allclose(x, a)
        same = np.nonzero((t["subject"] == item["subject"]) & (t["stimulus"] == item["stimulus"]))[0]
        fits = []
        for r in same[same != item["trial"]]:
            b = s.patches(r).astype(np.float32).ravel()
            lam = float(np.dot(x - b, a - b) / np.dot(a - b, a - b))
            fits.append((np.abs(lam * a + (1 - lam) * b - x).max(), lam))
        err, lam = min(fits)
        assert err < 1e-4 and 0 <= lam <= 1


def test_subjects_and_zero_shot_eval_subject(tiny_store):
    d = FMRIDataModule(store=str(tiny_store), subjects=["sub-01", "sub-02", "sub-03"], eval_subjects=["sub-04"])
    d.setup("fit")
    train_subj = {d.datasets["train"][i]["subject"] for i in range(len(d.datasets["train"]))}
    assert train_subj == {0, 1, 2}
    assert {it["subject"] for it in d.datasets["val"][0]} == {3}


def test_unknown_subject_and_missing_store_name_the_field(tiny_store, tmp_path):
    d = FMRIDataModule(store=str(tiny_store), subjects=["sub-99"])
    with pytest.raises(ValueError, match=r"field 'subjects'.*sub-99.*data.init_args.subjects"):
        d.setup("fit")
    missing = tmp_path / "nope.h5"
    with pytest.raises(FileNotFoundError, match=r"nope.h5.*data.init_args.store"):
        FMRIDataModule(store=str(missing)).prepare_data()
    with pytest.raises(ValueError, match="eval_conditions"):
        FMRIDataModule(store=str(tiny_store), eval_conditions=["mean"])  # type: ignore[list-item]


def test_images_and_spec(tiny_store):
    d = FMRIDataModule(store=str(tiny_store), return_images=True)
    d.setup("fit")
    item = d.datasets["train"][0]
    s = Store(tiny_store)
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, *s.image_shape[:2])
    np.testing.assert_array_equal(item["image"].permute(1, 2, 0).numpy(), s.image(item["stimulus"]))
    spec = d.spec
    assert spec.num_active_patches == s.grid.n_active and len(spec.patch_coords) == s.grid.n_active
    assert spec.num_subjects == 4 and spec.patch_dim == s.grid.patch_size**3


def test_two_workers_stream_the_same_items(tiny_store):
    d0 = FMRIDataModule(store=str(tiny_store), batch_size=16, num_workers=0)
    d2 = FMRIDataModule(store=str(tiny_store), batch_size=16, num_workers=2)
    for d in (d0, d2):
        d.setup("test")
    b0 = [b for b in d0.test_dataloader()[0]]
    b2 = [b for b in d2.test_dataloader()[0]]
    assert len(b0) == len(b2)
    for x, y in zip(b0, b2, strict=True):
        torch.testing.assert_close(x["patches"], y["patches"])
        assert x["stimulus"].tolist() == y["stimulus"].tolist()


def test_splits_constant():
    assert SPLITS == ("train", "val", "test")


def test_patches_back_to_subject_nifti(tiny_store):
    """The union ROI mask on the grid, cut into active patches and mapped back to a subject's space, covers
    that subject's own ROI (the inverse chain lands where the forward chain came from)."""
    import torch

    from neurovision.data.preprocessing import to_active_patches

    s = Store(tiny_store)
    subj = s.subject("sub-02")
    roi = s.roi("sub-02").astype(bool)
    union = torch.as_tensor(s.union_mask(), dtype=torch.float32)[None]
    patches = to_active_patches(union, s.grid.patch_size, s.grid.active_index)[0].numpy()
    img = s.to_subject_nifti(patches, "sub-02")
    assert img.shape == subj.original_shape
    np.testing.assert_allclose(img.affine, subj.affine)
    data = np.asarray(img.dataobj)
    assert (data[roi] > 0.5).mean() > 0.9  # ROI voxels come back inside the union
    assert (data[~roi] > 0.5).mean() < 0.5  # and the map is not everywhere
    with pytest.raises(ValueError, match="grid/active_index"):
        s.to_subject_nifti(patches[:-1], "sub-02")


def test_direct_chunk_reads_equal_h5py_selection(tiny_store, tmp_path):
    import shutil

    import h5py

    s = Store(tiny_store)
    with h5py.File(tiny_store, "r") as f:
        ref = f["trials/patches"]
        for i in (0, 1, len(s) // 2, len(s) - 1, -1):
            np.testing.assert_array_equal(s.patches(i), ref[i])
    assert not s._direct  # verified reads go through HDF5 (its fletcher32 check)
    u = Store(tiny_store)
    u.verify_checksums = False  # the unverified direct-chunk path (benchmark only) gives the same values
    with h5py.File(tiny_store, "r") as f:
        for i in (0, len(u) - 1):
            np.testing.assert_array_equal(u.patches(i), f["trials/patches"][i])
    assert u._direct
    with pytest.raises(IndexError, match="trials/patches"):
        s.patches(len(s))
    # a re-chunked (compressed) copy takes the h5py path and gives the same values
    copy = tmp_path / "gz.h5"
    shutil.copy(tiny_store, copy)
    with h5py.File(copy, "r+") as f:
        data = f["trials/patches"][:]
        del f["trials/patches"]
        f.create_dataset("trials/patches", data=data, chunks=(4, *data.shape[1:]), compression="gzip",
                         fletcher32=True)
    g = Store(copy)
    np.testing.assert_array_equal(g.patches(3), data[3])
    assert not g._direct


def test_epoch_sampler_is_a_function_of_seed_and_epoch():
    from data_modules.fmri import EpochSampler

    s = EpochSampler(20, shuffle=True, seed=1)
    s.set_epoch(3)
    a = list(s)
    assert all(e == 3 for _, e in a) and sorted(i for i, _ in a) == list(range(20))
    s2 = EpochSampler(20, shuffle=True, seed=1)
    s2.set_epoch(3)
    assert list(s2) == a  # a fresh sampler (e.g. after resuming) gives the same order
    s2.set_epoch(4)
    assert [i for i, _ in s2] != [i for i, _ in a]
    assert [i for i, _ in EpochSampler(5, shuffle=False)] == list(range(5))


def test_training_batches_repeat_exactly_for_the_same_epoch(tiny_store):
    def first_batch(epoch: int) -> dict:
        d = FMRIDataModule(store=str(tiny_store), batch_size=8, mixup_prob=0.7, seed=5)
        d.setup("fit")
        loader = d.train_dataloader()
        loader.sampler.set_epoch(epoch)
        return next(iter(loader))

    a, b, c = first_batch(2), first_batch(2), first_batch(3)
    torch.testing.assert_close(a["patches"], b["patches"])
    assert a["trial"].tolist() == b["trial"].tolist()
    assert a["trial"].tolist() != c["trial"].tolist()
