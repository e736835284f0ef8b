"""Concept localisation: GradCAM, patch -> subject mapping, aggregation, scoring, files, callback, CLI."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from neurovision.data.store import Store
from neurovision.localization.gradcam import concept_cams, gradcam
from neurovision.localization.maps import (
    ModelParts,
    aggregate,
    concept_directions,
    concept_list,
    localize,
    model_maps,
    patch_cam_to_patches,
    pearson,
    score,
    to_subject_volume,
)
from neurovision.localization.options import LocalizationOptions
from neurovision.models import ViT3D, ViT3DOutput
from neurovision.models.stage1 import MLPHead
from tests.helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]
TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 16, "head_width": 8, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def store(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Store:
    """A private copy (the teacher cache of the callback test lands beside it)."""
    return Store(shutil.copy(tiny_store, tmp_path_factory.mktemp("interp") / "tiny.h5"))


@pytest.fixture(scope="module")
def clip_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("clip") / "tiny_clip.json"
    p.write_text(json.dumps(TINY_CLIP))
    return p


@pytest.fixture(scope="module")
def clip(clip_config: Path):
    from neurovision.pretrained.teachers import OpenCLIPImageTeacher

    return OpenCLIPImageTeacher("tiny", model_config=str(clip_config), device="cpu")


def _vit(store: Store, dim: int = 16, depth: int = 2) -> ViT3D:
    torch.manual_seed(0)
    g = store.grid
    return ViT3D(g.patch_size**3, g.active_coords, dim=dim, depth=depth, heads=2)


def _batch(store: Store, n: int = 3) -> torch.Tensor:
    return torch.stack([torch.from_numpy(store.patches(i)).float() for i in range(n)])


# --------------------------------------------------------------------------------------------- GradCAM
def _brute_force(enc: nn.Module, head: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """One sample at a time, the GradCAM formula written out."""
    out = enc(x[None])
    s = F.cosine_similarity(head(out.cls), t[None], dim=-1)[0]
    (g,) = torch.autograd.grad(s, out.penultimate)
    weights = g[0, 1:].mean(0)  # mean gradient of each channel over the patch tokens
    return torch.relu(out.penultimate[0, 1:] @ weights).detach()


def test_gradcam_equals_brute_force_per_sample(store: Store) -> None:
    enc, head = _vit(store).double(), MLPHead(16, 8, 6).double()
    x = _batch(store, 4).double()
    t = torch.randn(3, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cam = gradcam(enc, head, x, t[0])
    assert cam.shape == (4, store.grid.n_active)
    ref = torch.stack([_brute_force(enc, head, x[i], t[0]) for i in range(4)])
    assert ref.abs().max() > 0
    torch.testing.assert_close(cam.double(), ref, rtol=1e-5, atol=1e-10)
    # per-sample targets, and several concepts from one forward pass
    paired = gradcam(enc, head, x[:3], t)
    torch.testing.assert_close(paired, torch.stack([gradcam(enc, head, x[i:i + 1], t[i])[0] for i in range(3)]))
    many = concept_cams(enc, head, x, t)
    assert many.shape == (3, 4, store.grid.n_active)
    torch.testing.assert_close(many[0], cam)
    normed = gradcam(enc, head, x, t[0], normalize=True)
    torch.testing.assert_close(normed.amax(1), torch.ones(4, dtype=normed.dtype))


def test_gradcam_leaves_no_grads_restores_modes_and_runs_under_inference_mode(store: Store) -> None:
    enc, head = _vit(store), MLPHead(16, 8, 6)
    enc.train()
    x, t = _batch(store, 2), torch.randn(6)
    with torch.inference_mode():
        cam = gradcam(enc, head, x, t)
    assert cam.shape == (2, store.grid.n_active) and bool((cam >= 0).all()) and cam.sum() > 0
    assert all(p.grad is None for p in [*enc.parameters(), *head.parameters()])
    assert enc.training and head.training
    signed = gradcam(enc, head, x, t, relu=False)
    assert bool((signed < 0).any())
    torch.testing.assert_close(cam, signed.clamp_min(0))


def _brute_force_at(enc: ViT3D, head: nn.Module, x: torch.Tensor, t: torch.Tensor, layer: int) -> torch.Tensor:
    """The ViT3D forward written out block by block (no hooks); the GradCAM formula at the input of block ``layer``."""
    h = torch.cat([enc.cls_token, enc.patch_embed(x[None]) + enc.position_embedding()], 1)
    states = h
    for i, blk in enumerate(enc.blocks):
        if i == layer % enc.depth:
            states = h = h.detach().requires_grad_()
        h = blk(h)
    s = F.cosine_similarity(head(enc.norm(h)[:, 0]), t[None], dim=-1)[0]
    (g,) = torch.autograd.grad(s, states)
    return torch.relu(states[0, 1:] @ g[0, 1:].mean(0)).detach()


def test_gradcam_at_other_layers_equals_brute_force(store: Store) -> None:
    enc, head = _vit(store, depth=3).double().eval(), MLPHead(16, 8, 6).double()
    x = _batch(store, 3).double()
    t = torch.randn(2, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    cams = {}
    for layer in (0, 1, 2, -1, -3):
        cams[layer] = gradcam(enc, head, x, t[0], layer=layer)
        ref = torch.stack([_brute_force_at(enc, head, x[i], t[0], layer) for i in range(3)])
        assert ref.abs().max() > 0
        torch.testing.assert_close(cams[layer].double(), ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))
    # -1 is the last block's input (the penultimate states), counted from the end like a list index
    torch.testing.assert_close(cams[-1], cams[2], rtol=0, atol=0)
    torch.testing.assert_close(cams[-3], cams[0], rtol=0, atol=0)
    torch.testing.assert_close(cams[-1].double(), torch.stack([_brute_force(enc, head, x[i], t[0]) for i in range(3)]),
                               rtol=1e-5, atol=1e-10)
    assert not torch.allclose(cams[0], cams[2])
    torch.testing.assert_close(concept_cams(enc, head, x, t, layer=0)[0], cams[0])
    # a frozen encoder: the captured states still carry the gradient, and no .grad is left anywhere
    enc.requires_grad_(False)
    torch.testing.assert_close(gradcam(enc, head, x, t[0], layer=0), cams[0])
    torch.testing.assert_close(gradcam(enc, head, x, t[0], layer=-1), cams[-1])
    assert all(p.grad is None for p in [*enc.parameters(), *head.parameters()])
    assert not enc.blocks[0]._forward_pre_hooks  # the hook is removed
    with pytest.raises(ValueError, match=r"layer must be in \[-3, 2\]"):
        gradcam(enc, head, x, t[0], layer=3)
    with pytest.raises(ValueError, match="needs an encoder with .blocks"):
        gradcam(OnePatchEncoder(store.grid.n_active), nn.Linear(store.grid.n_active, 6), x.float(), t[0].float(),
                layer=0)


class OnePatchEncoder(nn.Module):
    """A hand-built encoder whose CLS reads one patch: token n's activation is softplus(mean of patch n) on
    channel n only (a feature map with one channel per location), CLS is the sum of the tokens."""

    def __init__(self, n_patches: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.n = n_patches

    def forward(self, patches: torch.Tensor, subject: torch.Tensor | None = None) -> ViT3DOutput:
        a = F.softplus(self.scale * patches.mean(-1))  # (B, A)
        tokens = torch.diag_embed(a)  # (B, A, A): channel n lives on token n
        pen = torch.cat([torch.zeros_like(tokens[:, :1]), tokens], 1)
        cls = pen[:, 1:].sum(1)
        return ViT3DOutput(cls=cls, tokens=pen, penultimate=pen)


def _one_patch_head(n_patches: int, k: int, t: torch.Tensor) -> nn.Module:
    """CLIP prediction = a_k * t + b: only patch k moves the similarity with ``t``."""
    head = nn.Linear(n_patches, len(t))
    with torch.no_grad():
        head.weight.zero_()
        head.weight[:, k] = t
        head.bias.copy_(torch.roll(t, 1) + 0.3)
    return head


def test_gradcam_finds_the_one_patch_the_similarity_depends_on(store: Store) -> None:
    a = store.grid.n_active
    t = torch.randn(6, generator=torch.Generator().manual_seed(0))
    x = _batch(store, 5)
    for k in (0, a // 2, a - 1):
        cam = gradcam(OnePatchEncoder(a), _one_patch_head(a, k, t), x, t)
        assert (cam.argmax(1) == k).all()
        assert cam[:, k].min() > 0 and torch.count_nonzero(cam) == len(x)


def test_localize_maps_the_one_patch_to_its_voxels_in_subject_space(store: Store, clip) -> None:
    """End to end: the map of a model that reads only patch k peaks inside patch k's subject-space footprint."""
    a, g = store.grid.n_active, store.grid
    k = a // 3
    t = clip.encode_text(["red"])[0]
    parts = ModelParts(OnePatchEncoder(a), _one_patch_head(a, k, t), name="one-patch")
    onehot = np.zeros((a, g.patch_size**3), np.float32)
    onehot[k] = 1
    for upsample in ("trilinear", "nearest"):
        loc = localize([parts], store, clip, None, concepts=["red"], upsample=upsample, target="similarity",
                       progress=False)
        assert {r["concept"] for r in loc.rows} == {"red"} and len(loc.rows) == len(store.subjects)
        for s in store.subject_names:
            footprint = np.asarray(store.to_subject_nifti(onehot, s).dataobj)
            vol = loc.maps[s]["red"]
            assert vol.shape == store.subject(s).original_shape
            assert footprint.flat[np.argmax(vol)] > 0.5, (upsample, s)
            if upsample == "nearest":  # exactly patch k's footprint, scaled
                np.testing.assert_allclose(vol, footprint * vol.max() / footprint.max(), atol=1e-6 * vol.max())


def test_a_model_with_another_patch_size_gets_recut_volumes_and_maps_back(store: Store, clip) -> None:
    """Ensemble members may use another patch size on the same grid: the store's volumes are re-cut for them
    and their maps go back through their own geometry (here: patch 5 on the tiny store's patch-4 grid)."""
    from neurovision.data.preprocessing import GridSpec, active_patch_index

    p = 5
    idx = active_patch_index(store.union_mask(), p)
    spec = GridSpec(store.grid.shape, p, idx)
    coords = np.stack(np.unravel_index(idx, [-(-s // p) for s in store.grid.shape]), 1)
    k = len(idx) // 2
    t = clip.encode_text(["red"])[0]
    parts = ModelParts(OnePatchEncoder(len(idx)), _one_patch_head(len(idx), k, t), patch_size=p, patch_coords=coords)
    maps = model_maps(parts, store, t[None], ["red"], upsample="nearest")
    onehot = np.zeros((len(idx), p**3), np.float32)
    onehot[k] = 1
    for s in store.subject_names:
        sub = store.subject(s)
        footprint = spec.to_subject(onehot, sub.affine, sub.grid_affine, sub.original_shape).numpy()
        vol = maps[s]["red"]
        np.testing.assert_allclose(vol, footprint * vol.max() / footprint.max(), atol=1e-6 * vol.max())


def test_pattern_is_the_covariance_of_voxels_with_the_similarity(store: Store, clip) -> None:
    from data_modules.fmri import FMRITrials

    enc, head = _vit(store), MLPHead(16, 8, clip.dim)
    text = clip.encode_text(["red", "square"])
    maps = model_maps(ModelParts(enc, head), store, text, ["red", "square"], method="pattern", subjects=["sub-03"],
                      batch_size=5)
    ds = FMRITrials(store, "test", [2], mode="average")
    x = torch.stack([ds[i]["patches"] for i in range(len(ds))])
    with torch.no_grad():
        sim = F.normalize(head(enc(x).cls), dim=-1) @ F.normalize(text, dim=-1).T
    xf = x.reshape(len(x), -1).double().numpy()
    for ci, c in enumerate(["red", "square"]):
        cov = ((xf - xf.mean(0)) * (sim[:, ci].double().numpy() - sim[:, ci].double().numpy().mean())[:, None]).mean(0)
        expected = to_subject_volume(store, cov.reshape(x.shape[1:]).astype(np.float32), "sub-03")
        np.testing.assert_allclose(maps["sub-03"][c], expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())


def test_pattern_of_a_model_with_a_voxel_read_out_uses_its_prediction(store: Store, clip) -> None:
    """With a stage-1 read-out (``linear_skip``) the similarity is of the task's prediction: head + read-out."""
    from data_modules.fmri import FMRITrials
    from neurovision.models import VoxelReadout

    enc, head = _vit(store), MLPHead(16, 8, clip.dim)
    g = store.grid
    skip = VoxelReadout(len(g.active_coords) * g.patch_size**3, clip.dim, rank=4, dropout=0.0)
    skip.fit(torch.randn(40, len(g.active_coords) * g.patch_size**3, generator=torch.Generator().manual_seed(0)))
    torch.nn.init.normal_(skip.linear.weight)
    text = clip.encode_text(["red"])
    kw = dict(method="pattern", subjects=["sub-03"], batch_size=5)
    with_skip = model_maps(ModelParts(enc, head, skip=skip.eval()), store, text, ["red"], **kw)["sub-03"]["red"]
    without = model_maps(ModelParts(enc, head), store, text, ["red"], **kw)["sub-03"]["red"]
    ds = FMRITrials(store, "test", [2], mode="average")
    x = torch.stack([ds[i]["patches"] for i in range(len(ds))])
    with torch.no_grad():
        sim = (F.normalize(head(enc(x).cls) + skip(x), dim=-1) @ F.normalize(text, dim=-1).T)[:, 0].double().numpy()
    xf = x.reshape(len(x), -1).double().numpy()
    cov = ((xf - xf.mean(0)) * (sim - sim.mean())[:, None]).mean(0)
    expected = to_subject_volume(store, cov.reshape(x.shape[1:]).astype(np.float32), "sub-03")
    np.testing.assert_allclose(with_skip, expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())
    assert not np.allclose(with_skip, without, atol=1e-6 * np.abs(expected).max())


def test_relative_target_is_the_similarity_minus_the_mean_similarity_to_the_reference(clip) -> None:
    words, ref = ["red", "square"], ["red", "blue", "large"]
    pred = F.normalize(torch.randn(7, clip.dim, generator=torch.Generator().manual_seed(0)), dim=-1)
    t = F.normalize(clip.encode_text(["red", "square", "blue", "large"]), dim=-1)  # the union, words first
    cos = pred @ t.T
    d = concept_directions(clip, words, reference=ref)
    torch.testing.assert_close(pred @ d.T, cos[:, :2] - cos.mean(1, keepdim=True), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(concept_directions(clip, words, target="similarity"), t[:2], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(concept_directions(clip, ["red"], reference=["red", "square"])[0],
                               (t[0] - t[1]) / 2, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="at least two concepts"):
        concept_directions(clip, ["red"], reference=["red"])
    with pytest.raises(ValueError, match="target must be"):
        concept_directions(clip, words, target="cosine")  # type: ignore[arg-type]


def test_localize_relative_pattern_is_the_covariance_with_the_relative_similarity(store: Store, clip) -> None:
    """``target="relative"`` (the default) explains cos(pred, t_c) - mean over the store's concepts of
    cos(pred, t_k), each concept's score scaled by 1 / |t_c - mean t|; one concept still gets the store's
    concepts as its reference."""
    from data_modules.fmri import FMRITrials

    enc, head = _vit(store), MLPHead(16, 8, clip.dim)
    kw = dict(method="pattern", subjects=["sub-03"], batch_size=5, progress=False)
    rel = localize([ModelParts(enc, head)], store, clip, None, concepts=["green"], **kw).maps["sub-03"]["green"]
    sim = localize([ModelParts(enc, head)], store, clip, None, concepts=["green"], target="similarity",
                   **kw).maps["sub-03"]["green"]
    words = concept_list(store)
    t = F.normalize(clip.encode_text(words), dim=-1)
    c = words.index("green")
    ds = FMRITrials(store, "test", [2], mode="average")
    x = torch.stack([ds[i]["patches"] for i in range(len(ds))])
    with torch.no_grad():
        cos = F.normalize(head(enc(x).cls), dim=-1) @ t.T
    y = ((cos[:, c] - cos.mean(1)) / (t[c] - t.mean(0)).norm()).double().numpy()
    xf = x.reshape(len(x), -1).double().numpy()
    cov = ((xf - xf.mean(0)) * (y - y.mean())[:, None]).mean(0)
    expected = to_subject_volume(store, cov.reshape(x.shape[1:]).astype(np.float32), "sub-03")
    np.testing.assert_allclose(rel, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    assert not np.allclose(rel / np.abs(rel).max(), sim / np.abs(sim).max(), atol=1e-3)  # another score


# --------------------------------------------------------------------------------------------- mapping
def test_patch_to_subject_round_trip(store: Store) -> None:
    g, spec = store.grid, store.grid_spec()
    k = 3
    cam = np.zeros(g.n_active, np.float32)
    cam[k] = 2.0
    patches = patch_cam_to_patches(cam, spec, "nearest")
    expected = np.zeros((g.n_active, g.patch_size**3), np.float32)
    expected[k] = 2.0
    np.testing.assert_array_equal(patches, expected)
    for s in store.subject_names:
        vol = to_subject_volume(store, patches, s)
        np.testing.assert_allclose(vol, np.asarray(store.to_subject_nifti(expected, s).dataobj), atol=1e-6)
        assert vol.max() > 0
    # trilinear: a constant map stays constant over the active patches (no pull towards the inactive ones),
    # and a one-patch map peaks inside its patch
    np.testing.assert_allclose(patch_cam_to_patches(np.full(g.n_active, 3.0), spec, "trilinear"), 3.0, rtol=1e-5)
    tri = patch_cam_to_patches(cam, spec, "trilinear")
    assert np.unravel_index(np.argmax(tri), tri.shape)[0] == k
    assert patch_cam_to_patches(np.stack([cam, cam]), spec, "trilinear").shape == (2, *tri.shape)


# --------------------------------------------------------------------------------------------- aggregation
def test_aggregate_present_and_contrast() -> None:
    cams = np.arange(12, dtype=np.float32).reshape(4, 3)
    present = np.array([True, False, True, False])
    np.testing.assert_allclose(aggregate(cams, present, "present"), cams[[0, 2]].mean(0))
    np.testing.assert_allclose(aggregate(cams, present, "contrast"), cams[[0, 2]].mean(0) - cams[[1, 3]].mean(0))
    with pytest.raises(ValueError, match="no item shows"):
        aggregate(cams, np.zeros(4, bool))


def test_model_maps_average_the_items_showing_the_concept(store: Store, clip) -> None:
    from data_modules.fmri import FMRITrials

    enc, head = _vit(store), MLPHead(16, 8, clip.dim)
    text = clip.encode_text(["red", "circle"])
    maps = model_maps(ModelParts(enc, head), store, text, ["red", "circle"], subjects=["sub-02"],
                      upsample="nearest")
    assert list(maps) == ["sub-02"]
    ds = FMRITrials(store, "test", [1], mode="average")
    items = [ds[i] for i in range(len(ds))]
    x = torch.stack([it["patches"] for it in items])
    words = store.annotations("concepts")
    for ci, c in enumerate(["red", "circle"]):
        present = np.array([c in words[it["stimulus"]] for it in items])
        assert 0 < present.sum() < len(items)
        cams = gradcam(enc, head, x, text[ci]).numpy()
        expected = to_subject_volume(store, patch_cam_to_patches(cams[present].mean(0), store.grid_spec(), "nearest"),
                                     "sub-02")
        np.testing.assert_allclose(maps["sub-02"][c], expected, rtol=1e-4, atol=1e-7)


# --------------------------------------------------------------------------------------------- scoring
def test_pearson_equals_corrcoef_and_score_rows(store: Store, rng: np.random.Generator) -> None:
    a, b = rng.normal(size=(5, 6, 7)), rng.normal(size=(5, 6, 7))
    m = rng.random((5, 6, 7)) > 0.4
    assert pearson(a, b, m) == pytest.approx(np.corrcoef(a[m], b[m])[0, 1], abs=1e-12)
    assert pearson(a, b) == pytest.approx(np.corrcoef(a.ravel(), b.ravel())[0, 1], abs=1e-12)
    assert np.isnan(pearson(np.ones(5), b.ravel()[:5]))
    truth = store.extra("concept_maps_sub-01")
    names = concept_list(store)
    maps = {"sub-01": {"red": truth[names.index("red")], "blue": -truth[names.index("blue")]}}
    rows, mean = score(maps, store)
    assert [(r["subject"], r["concept"]) for r in rows] == [("sub-01", "red"), ("sub-01", "blue")]
    assert rows[0]["r"] == pytest.approx(1.0) and rows[1]["r"] == pytest.approx(-1.0)
    assert mean == pytest.approx(0.0, abs=1e-9)
    roi = store.roi("sub-01") > 0
    rnd = rng.normal(size=truth.shape[1:])
    rows, _ = score({"sub-01": {"green": rnd}}, store)
    assert rows[0]["r"] == pytest.approx(np.corrcoef(rnd[roi], truth[names.index("green")][roi])[0, 1])
    rows_active, _ = score({"sub-01": {"green": rnd}}, store, mask="active")
    assert rows_active[0]["r"] != pytest.approx(rows[0]["r"])


# --------------------------------------------------------------------------------------------- files
def test_localize_writes_nifti_png_and_csv(store: Store, clip, tmp_path: Path) -> None:
    parts = [ModelParts(_vit(store), MLPHead(16, 8, clip.dim), name="a"),
             ModelParts(_vit(store, depth=1), MLPHead(16, 8, clip.dim), name="b")]
    loc = localize(parts, store, clip, tmp_path / "maps", concepts=["red", "large"], subjects=["sub-01", "sub-03"],
                   progress=False)
    for s in ("sub-01", "sub-03"):
        for c in ("red", "large"):
            img = nib.load(tmp_path / "maps" / s / f"{c}.nii.gz")
            assert img.shape == store.subject(s).original_shape
            np.testing.assert_allclose(img.affine, store.subject(s).affine)
            np.testing.assert_allclose(np.asarray(img.dataobj), loc.maps[s][c])
            png = tmp_path / "maps" / s / f"{c}.png"
            assert png.read_bytes()[:4] == b"\x89PNG"
    with open(tmp_path / "maps" / "concept_r.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["subject"], r["concept"]) for r in rows] == [(r["subject"], r["concept"]) for r in loc.rows]
    assert len(rows) == 4 and all(-1 <= float(r["r"]) <= 1 for r in rows)
    assert loc.r_mean == pytest.approx(np.mean([float(r["r"]) for r in rows]), abs=1e-6)
    assert not list((tmp_path / "maps").rglob(".*"))  # no temp files left
    # the ensemble: the mean of the models' subject-space maps, each scaled to max |value| 1
    single = [localize([p], store, clip, None, concepts=["red", "large"], subjects=["sub-01", "sub-03"],
                       progress=False).maps for p in parts]
    for s in ("sub-01", "sub-03"):
        for c in ("red", "large"):
            unit = [m[s][c] / np.abs(m[s][c]).max() for m in single]
            np.testing.assert_allclose(loc.maps[s][c], np.mean(unit, 0), rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------------------- callback
@pytest.fixture(scope="module")
def tested(store: Store, clip, tmp_path_factory: pytest.TempPathFactory):
    """A tiny AlignmentTask through ``trainer.test`` with the callback; its checkpoint."""
    import lightning as L

    from callbacks import ConceptMaps
    from data_modules import FMRIDataModule
    from neurovision.tasks import AlignmentTask

    tmp = tmp_path_factory.mktemp("callback")
    dm = FMRIDataModule(store=str(store.path), batch_size=16, eval_conditions=["average"])
    task = AlignmentTask(data_spec=dm.spec, clip_teacher=clip, vae_teacher=None, dim=16, depth=1, heads=2,
                         head_hidden=16)
    cb = ConceptMaps(png=False)
    # logger=False: a logger would dump hparams_initial, which still holds the teacher object (slow YAML)
    trainer = L.Trainer(logger=False, default_root_dir=tmp, callbacks=[cb], limit_test_batches=1,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.test(task, dm)
    ckpt = tmp / "stage1.ckpt"
    trainer.save_checkpoint(ckpt)
    return trainer, cb, ckpt


def test_concept_maps_callback_logs_and_writes_after_test(tested, store: Store) -> None:
    import lightning as L

    from callbacks import ConceptMaps

    trainer, cb, _ = tested
    m = trainer.callback_metrics
    assert "test/concepts/r_mean" in m and "test/concepts/red/r" in m
    assert float(m["test/concepts/r_mean"]) == pytest.approx(cb.last.r_mean, abs=1e-6)
    out = Path(trainer.log_dir) / "concept_maps"
    assert len(list(out.glob("sub-*/*.nii.gz"))) == len(store.subjects) * len(concept_list(store))
    assert (out / "concept_r.csv").is_file()
    with pytest.raises(ValueError, match="lacks encoder, clip_head, clip_teacher"):
        ConceptMaps().setup(trainer, L.LightningModule(), "test")


def test_concept_maps_callback_explains_the_prediction_with_the_read_out(store: Store, clip, tmp_path: Path) -> None:
    """A task with a voxel read-out (``linear_skip``): the callback's pattern maps are those of head + read-out."""
    import lightning as L

    from callbacks import ConceptMaps
    from data_modules import FMRIDataModule
    from neurovision.tasks import AlignmentTask

    dm = FMRIDataModule(store=str(store.path), batch_size=16, eval_conditions=["average"])
    task = AlignmentTask(data_spec=dm.spec, clip_teacher=clip, vae_teacher=None, dim=16, depth=1, heads=2,
                         head_hidden=16, linear_skip=True, linear_skip_dropout=0.0)
    torch.nn.init.normal_(task.skip.linear.weight, std=0.1)  # zero-initialised: give it something to read
    cb = ConceptMaps(LocalizationOptions(method="pattern", concepts=["red"]), png=False, out_dir=str(tmp_path / "maps"))
    trainer = L.Trainer(logger=False, default_root_dir=tmp_path, callbacks=[cb], limit_test_batches=1,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.test(task, dm)
    kw = dict(concepts=["red"], method="pattern", progress=False)
    with_skip = localize([ModelParts(task.encoder, task.clip_head, skip=task.skip)], store, clip, None, **kw).maps
    without = localize([ModelParts(task.encoder, task.clip_head)], store, clip, None, **kw).maps
    for s in store.subject_names:
        np.testing.assert_allclose(cb.last.maps[s]["red"], with_skip[s]["red"], rtol=1e-5, atol=1e-8)
        assert not np.allclose(cb.last.maps[s]["red"], without[s]["red"], rtol=1e-3, atol=1e-8)


def test_callback_resolves_from_yaml(capsys: pytest.CaptureFixture) -> None:
    stage1 = ROOT / "experiments" / "stage1_vit3d.yaml"
    assert run_cli(["test", "-c", str(stage1), "--trainer.callbacks+=callbacks.ConceptMaps",
                    "--trainer.callbacks.init_args.options.concepts=[red]", "--trainer.callbacks.init_args.options.layer=0",
                    "--print_config"]) == 0
    out = capsys.readouterr().out
    assert "class_path: callbacks.ConceptMaps" in out and "- red" in out and "layer: 0" in out


# --------------------------------------------------------------------------------------------- CLI
def test_cli_localizes_a_checkpoint(tested, store: Store, clip, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _, _, ckpt = tested
    args = ["localize", "--ckpt", str(ckpt), "--store", str(store.path), "--out", str(tmp_path / "cli"),
            "--clip-model-name", "tiny", "--clip-config", clip.model_config, "--concepts", "red", "blue",
            "--subjects", "sub-01", "--png", "none"]
    assert run_cli(args) == 0
    out = capsys.readouterr().out
    assert "red" in out and "mean" in out
    assert (tmp_path / "cli" / "sub-01" / "blue.nii.gz").is_file()
    with open(tmp_path / "cli" / "concept_r.csv") as f:
        assert [r["concept"] for r in csv.DictReader(f)] == ["red", "blue"]


def test_cli_layer_flag(tested, store: Store, clip, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _, _, ckpt = tested  # depth 1: layer 0 is the last block's input, the default's
    base = ["localize", "--ckpt", str(ckpt), "--store", str(store.path), "--clip-model-name", "tiny",
            "--clip-config", clip.model_config, "--concepts", "red", "--subjects", "sub-02", "--png", "none"]
    assert run_cli([*base, "--out", str(tmp_path / "l0"), "--layer", "0"]) == 0
    assert run_cli([*base, "--out", str(tmp_path / "default")]) == 0
    vols = [np.asarray(nib.load(tmp_path / d / "sub-02" / "red.nii.gz").dataobj) for d in ("l0", "default")]
    assert np.abs(vols[0]).max() > 0
    np.testing.assert_array_equal(*vols)
    capsys.readouterr()
    assert run_cli([*base, "--out", str(tmp_path / "l1"), "--layer", "1"]) == 2
    assert "layer must be in [-1, 0]" in capsys.readouterr().err


def test_cli_target_flag(tested, store: Store, clip, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _, _, ckpt = tested
    base = ["localize", "--ckpt", str(ckpt), "--store", str(store.path), "--clip-model-name", "tiny",
            "--clip-config", clip.model_config, "--concepts", "red", "--subjects", "sub-02", "--png", "none",
            "--method", "pattern"]
    assert run_cli([*base, "--out", str(tmp_path / "sim"), "--target", "similarity"]) == 0
    assert run_cli([*base, "--out", str(tmp_path / "rel")]) == 0
    sim, rel = (np.asarray(nib.load(tmp_path / d / "sub-02" / "red.nii.gz").dataobj) for d in ("sim", "rel"))
    loc = localize([ckpt], store, clip, None, concepts=["red"], subjects=["sub-02"], method="pattern", progress=False)
    np.testing.assert_allclose(rel, loc.maps["sub-02"]["red"], rtol=1e-5, atol=1e-7)
    assert not np.allclose(rel / np.abs(rel).max(), sim / np.abs(sim).max(), atol=1e-3)
    capsys.readouterr()
    assert run_cli([*base, "--out", str(tmp_path / "bad"), "--target", "cosine"]) != 0
    assert "--target" in capsys.readouterr().err


def test_cli_reads_teacher_and_store_from_the_run_config(tested, store: Store, clip, tmp_path: Path) -> None:
    import yaml

    ckpt = tmp_path / "run.ckpt"
    shutil.copy(tested[2], ckpt)
    cfg = {"model": {"init_args": {"clip_teacher": {
        "class_path": "neurovision.pretrained.teachers.OpenCLIPImageTeacher",
        "init_args": {"model_name": "tiny", "model_config": clip.model_config, "checkpoint": None, "seed": 0}}}},
        "data": {"init_args": {"store": str(store.path)}}}
    (tmp_path / "run.config.yaml").write_text(yaml.safe_dump(cfg))
    assert run_cli(["localize", "--ckpt", str(ckpt), "--out", str(tmp_path / "o"), "--concepts", "green",
                    "--subjects", "sub-04", "--png", "none"]) == 0
    assert (tmp_path / "o" / "sub-04" / "green.nii.gz").is_file()


def test_localize_refuses_another_clip_teacher(tested, store: Store, clip_config: Path, tmp_path: Path) -> None:
    from neurovision.pretrained.teachers import OpenCLIPImageTeacher

    other = OpenCLIPImageTeacher("tiny", model_config=str(clip_config), seed=1, device="cpu")
    with pytest.raises(ValueError, match="trained towards"):
        localize([tested[2]], store, other, tmp_path, concepts=["red"], progress=False)


def test_cli_missing_checkpoint_is_one_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "nope.ckpt"
    assert run_cli(["localize", "--ckpt", str(missing), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "does not exist" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_localization_options_are_stated_once() -> None:
    """The options dataclass is what `neurovision localize` parses and what `localize` defaults to: the CLI's
    defaults, the callback's and the library function's cannot drift apart."""
    import dataclasses
    import inspect

    from neurovision.cli import localize_parser

    defaults = LocalizationOptions().localize_kwargs()
    sig = inspect.signature(localize).parameters
    assert {k: sig[k].default for k in defaults} == defaults
    parsed = localize_parser().parse_args(["--ckpt", "a.ckpt", "--out", "o"])
    assert LocalizationOptions.from_namespace(parsed) == LocalizationOptions()
    changed = localize_parser().parse_args(["--ckpt", "a.ckpt", "--out", "o", "--method", "pattern", "--no-relu",
                                            "--batch-size", "8", "--concepts", "red", "blue", "--layer", "0"])
    assert LocalizationOptions.from_namespace(changed) == dataclasses.replace(
        LocalizationOptions(), method="pattern", relu=False, batch_size=8, concepts=["red", "blue"], layer=0)
    with pytest.raises(ValueError, match="localization option method='patern': one of gradcam, pattern"):
        LocalizationOptions(method="patern")  # type: ignore[arg-type]
