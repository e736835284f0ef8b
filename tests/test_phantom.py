"""The phantom source on the session's tiny store: design, annotations, planted truth, a real signal."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest

from neurovision.data.store import SPLITS, Store
from neurovision.sources import phantom, scenes


@pytest.fixture(scope="module")
def store(tiny_store: Path) -> Iterator[Store]:
    s = Store(tiny_store)
    yield s
    s.close()


def _scene(objs: list[dict]) -> scenes.Scene:
    return scenes.Scene(tuple(scenes.SceneObject(**o) for o in objs))


def _pearson_cols(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(0)
    b = b - b.mean(0)
    return (a * b).sum(0) / np.sqrt((a * a).sum(0) * (b * b).sum(0))


# --------------------------------------------------------------------------------------------- design
def test_subjects_differ_in_shape_and_affine(store: Store) -> None:
    cfg = phantom.PRESETS["tiny"]
    assert len(store.subjects) == cfg.n_subjects == 4
    assert len({s.original_shape for s in store.subjects}) == 4
    affines = [s.affine for s in store.subjects]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not np.allclose(affines[i], affines[j])
    for s in store.subjects:
        assert store.roi(s.name).shape == s.original_shape
        assert 0 < store.roi(s.name).mean() < 0.5
        # the grid affine stretches the subject's field of view onto the common grid: corners coincide
        far = np.array([*(n - 1 for n in s.original_shape), 1.0])
        far_grid = np.array([*(n - 1 for n in store.grid.shape), 1.0])
        np.testing.assert_allclose(s.grid_affine @ far_grid, s.affine @ far, atol=1e-6)
    assert store.grid.shape == cfg.grid and store.grid.patch_size == cfg.patch_size


def test_shared_test_set_and_disjoint_training_images(store: Store) -> None:
    t = store.trials
    cfg = phantom.PRESETS["tiny"]
    seen = {sp: [set(t["stimulus"][(t["subject"] == s.index) & store.split_mask(sp)]) for s in store.subjects]
            for sp in SPLITS}
    test_sets = seen["test"]
    assert len(test_sets[0]) == cfg.n_test and all(ts == test_sets[0] for ts in test_sets)
    for i in range(4):
        assert len(seen["train"][i]) == cfg.n_train and len(seen["val"][i]) == cfg.n_val
        assert not seen["train"][i] & test_sets[0] and not seen["val"][i] & seen["train"][i]
        for j in range(i + 1, 4):
            assert not seen["train"][i] & seen["train"][j]
            assert not seen["val"][i] & seen["val"][j]
    # a stimulus has one split, whoever sees it
    split_of: dict[int, set[int]] = {}
    for st, sp in zip(t["stimulus"], t["split"], strict=True):
        split_of.setdefault(int(st), set()).add(int(sp))
    assert all(len(v) == 1 for v in split_of.values())
    assert len(split_of) == len(store.stimulus_ids)


def test_three_repeats_per_subject_and_stimulus(store: Store) -> None:
    t = store.trials
    reps: dict[tuple[int, int], list[int]] = {}
    for su, st, r in zip(t["subject"], t["stimulus"], t["repeat"], strict=True):
        reps.setdefault((int(su), int(st)), []).append(int(r))
    assert len(reps) == 4 * (24 + 4 + 12)
    assert all(sorted(v) == [0, 1, 2] for v in reps.values())
    # sessions of at most trials_per_session trials, numbered from 1 per subject
    for s in store.subjects:
        sess = t["session"][t["subject"] == s.index]
        assert sess.min() == 1 and np.bincount(sess).max() <= phantom.PRESETS["tiny"].trials_per_session


# --------------------------------------------------------------------------------------------- annotations
def test_annotations_complete_and_consistent_with_scenes(store: Store) -> None:
    n = len(store.stimulus_ids)
    assert {"scenes", "captions", "descriptions", "qa", "dialogues", "sd_prompts", "concepts",
            "boxes"} <= set(store.annotation_kinds)
    ann = {k: store.annotations(k) for k in store.annotation_kinds}
    assert all(len(v) == n for v in ann.values())
    colour_re = re.compile(r"\b(" + "|".join(scenes.COLOURS) + r")\b")
    for i in range(n):
        objs = ann["scenes"][i]
        sc = _scene(objs)
        assert 1 <= len(objs) <= phantom.PRESETS["tiny"].max_objects
        caps = ann["captions"][i]
        assert len(caps) == 5 and all(isinstance(c, str) and c for c in caps)
        assert colour_re.findall(caps[0]) == [o["colour"] for o in objs]
        for o in objs:
            assert o["shape"] in caps[0] and o["size"] in caps[0]
        assert ann["qa"][i] and all({"q", "a", "type"} <= set(x) for x in ann["qa"][i])
        count = next(x["a"] for x in ann["qa"][i] if x["type"] == "count")
        assert count == ("one", "two", "three")[len(objs) - 1]
        assert set(ann["concepts"][i]) <= set(scenes.CONCEPTS)
        assert ann["concepts"][i] == scenes.concepts(sc)
        assert {o["colour"] for o in objs} <= set(ann["concepts"][i])
        assert [b["concepts"] for b in ann["boxes"][i]] == [[o["colour"], o["shape"], o["size"]] for o in objs]
        turns = ann["dialogues"][i]
        assert [x["from"] for x in turns] == ["human", "gpt"] * (len(turns) // 2) and turns


def test_images_match_scenes(store: Store) -> None:
    """Each stored image shows its scene: the scene's colours are present, absent colours are not."""
    ann = store.annotations("scenes")
    for i in range(0, len(ann), 7):
        img = store.image(i)
        np.testing.assert_array_equal(img, scenes.render(_scene(ann[i]), img.shape[0]))
        present = {tuple(c) for c in img.reshape(-1, 3)}
        for name, rgb in scenes.COLOURS.items():
            assert (rgb in present) == any(o["colour"] == name for o in ann[i])


# --------------------------------------------------------------------------------------------- truth
def test_planted_concept_maps_inside_roi(store: Store) -> None:
    names = [n.decode() for n in store.extra("concept_names")]
    assert names == list(scenes.CONCEPTS)
    for s in store.subjects:
        maps = store.extra(f"concept_maps_{s.name}")
        assert maps.shape == (len(scenes.CONCEPTS), *s.original_shape)
        roi = store.roi(s.name).astype(bool)
        assert not maps[:, ~roi].any()
        assert (np.abs(maps[:, roi]).max(axis=1) > 0.1).all()  # every concept planted somewhere in the ROI


def test_export_truth_nifti(store: Store, tiny_store: Path) -> None:
    root = tiny_store.with_name(tiny_store.stem + "_truth")
    for s in store.subjects:
        maps = store.extra(f"concept_maps_{s.name}")
        d = root / s.name
        assert sorted(p.name for p in d.iterdir()) == sorted(
            [f"concept-{w}.nii.gz" for w in scenes.CONCEPTS] + ["roi.nii.gz"])
        for k, word in enumerate(scenes.CONCEPTS):
            img = nib.load(d / f"concept-{word}.nii.gz")
            assert img.shape == s.original_shape
            np.testing.assert_allclose(img.affine, s.affine, atol=1e-4)
            np.testing.assert_array_equal(np.asarray(img.dataobj, dtype=np.float32), maps[k])
        roi = nib.load(d / "roi.nii.gz")
        np.testing.assert_allclose(roi.affine, s.affine, atol=1e-4)
        np.testing.assert_array_equal(np.asarray(roi.dataobj), store.roi(s.name))


# --------------------------------------------------------------------------------------------- signal
def _ridge(x: np.ndarray, lam: float):
    """Dual-form ridge on centred features; returns fit(y) -> predict(z) closures sharing one inverse."""
    mx = x.mean(0)
    xc = x - mx
    kinv = np.linalg.inv(xc @ xc.T + lam * np.eye(len(x)))

    def fit(y: np.ndarray):
        w = xc.T @ (kinv @ (y - y.mean(0)))
        return lambda z: (z - mx) @ w + y.mean(0)

    return fit


def test_concepts_decodable_from_patches(store: Store) -> None:
    t = store.trials
    x = store.h5["trials/patches"][:].astype(np.float32).reshape(len(store), -1)
    y = np.stack([scenes.presence(_scene(o)) for o in store.annotations("scenes")])
    tr, te = store.split_mask("train"), store.split_mask("test")
    items = sorted(set(zip(t["subject"][te].tolist(), t["stimulus"][te].tolist(), strict=True)))
    x_te = np.stack([x[te & (t["subject"] == su) & (t["stimulus"] == st)].mean(0) for su, st in items])
    y_te = y[[st for _, st in items]]
    fit = _ridge(x[tr], 1e3)
    y_tr = y[t["stimulus"][tr]]
    r = _pearson_cols(fit(y_tr)(x_te), y_te)
    assert r.mean() > 0.5, r
    # control: the same regression on shuffled training labels. A random linear read-out of a brain that
    # encodes 10 concepts still correlates with each concept at |r| ~ 1/sqrt(10) by chance, so the
    # shuffled mean |r| sits near 0.27 (not a safe margin below 0.3); over 10 shuffles we require the signed
    # mean to vanish and the mean |r| to stay far below the real decoder's.
    rng = np.random.default_rng(0)
    null = np.stack([_pearson_cols(fit(y_tr[rng.permutation(len(y_tr))])(x_te), y_te) for _ in range(10)])
    assert abs(null.mean()) < 0.1, null.mean(1)
    assert np.abs(null).mean() < 0.4, np.abs(null).mean(1)
    assert np.abs(null).mean() < r.mean() / 2


# --------------------------------------------------------------------------------------------- determinism
def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    small = {"preset": "tiny", "n_subjects": 1, "n_train": 2, "n_test": 2}
    a = phantom.prepare(tmp_path / "a.h5", seed=0, **small)
    b = phantom.prepare(tmp_path / "b.h5", seed=0, **small)
    c = phantom.prepare(tmp_path / "c.h5", seed=1, **small)

    def raw(p: Path) -> bytes:
        with h5py.File(p, "r") as f:
            return f["trials/patches"][:].tobytes()

    assert len(raw(a)) > 0
    assert raw(a) == raw(b)
    assert raw(a) != raw(c)
    sa, sc = Store(a), Store(c)
    assert sa.attrs["fingerprint"] != sc.attrs["fingerprint"]
    assert sa.annotations("captions") != sc.annotations("captions")


def test_shared_test_scenes_are_distinct(store: Store) -> None:
    test = np.unique(store.trials["stimulus"][store.split_mask("test")])
    keys = [_scene(store.annotations("scenes", int(i))).key for i in test]
    assert len(set(keys)) == len(keys) == phantom.PRESETS["tiny"].n_test


def test_sample_distinct_draws_distinct_scenes_or_says_it_cannot() -> None:
    rng = np.random.default_rng(0)
    got = scenes.sample_distinct(rng, 200)
    assert len({s.key for s in got}) == 200
    # one object per scene: 4 shapes x 4 colours x 2 sizes x 9 cells = 288 distinct scenes exist
    assert len({s.key for s in scenes.sample_distinct(rng, 288, max_objects=1)}) == 288
    with pytest.raises(ValueError, match="289 distinct"):
        scenes.sample_distinct(rng, 289, max_objects=1)


def test_geometry_matches_the_prepared_grid(store: Store) -> None:
    spec = phantom.geometry("tiny")
    assert spec.shape == store.grid.shape and spec.patch_size == store.grid.patch_size
    np.testing.assert_array_equal(spec.active_index, store.grid.active_index)
