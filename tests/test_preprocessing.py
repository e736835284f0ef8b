"""Preprocessing: resampling against independent references, patches, active patches, the grid pipeline."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import affine_transform

from neurovision.data.preprocessing import (
    GridSpec,
    active_patch_index,
    pad_to_multiple,
    padded_shape,
    patch_grid_shape,
    patchify,
    resample,
    resize_grid_affine,
    to_nifti,
    unpatchify,
    zscore_by_session,
)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def _smooth_field(shape: tuple[int, int, int]) -> np.ndarray:
    """A smooth (low-frequency) field over the unit cube, sampled on ``shape``."""
    x, y, z = np.meshgrid(*[np.linspace(0, 1, n) for n in shape], indexing="ij")
    return (np.sin(2.1 * x + 0.3) * np.cos(1.7 * y) + 0.5 * z**2 + 0.3 * x * y).astype(np.float32)


# --------------------------------------------------------------------------------------------- resample
@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("grid_shape", [(16, 7, 13), (5, 20, 9)])
def test_resample_resize_equals_trilinear_interpolate(
    rng: np.random.Generator, affine: np.ndarray, batched: bool, grid_shape: tuple[int, int, int]
) -> None:
    src_shape = (10, 12, 9)
    vols = rng.normal(size=(3, *src_shape) if batched else src_shape).astype(np.float32)
    ga = resize_grid_affine(affine, src_shape, grid_shape)
    out = resample(vols, affine, ga, grid_shape)
    t = torch.as_tensor(vols)
    ref = F.interpolate(t[:, None] if batched else t[None, None], size=grid_shape, mode="trilinear",
                        align_corners=True)
    ref = ref[:, 0] if batched else ref[0, 0]
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_resample_integer_translation_shifts_exactly(rng: np.random.Generator, affine: np.ndarray) -> None:
    vol = rng.normal(size=(10, 12, 9)).astype(np.float32)
    shift = np.array([2, -3, 1])
    target = affine.copy()
    target[:3, 3] += affine[:3, :3] @ shift  # target voxel ijk sits where source voxel ijk + shift sits
    out = resample(vol, affine, target, vol.shape).numpy()
    expected = np.zeros_like(vol)
    # out[i] = vol[i + shift] where i + shift is inside the volume, 0 elsewhere
    expected[0:8, 3:12, 0:8] = vol[2:10, 0:9, 1:9]
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_resample_identity_returns_input(volume: np.ndarray, affine: np.ndarray) -> None:
    out = resample(volume, affine, affine, volume.shape)
    np.testing.assert_allclose(out.numpy(), volume, atol=1e-5)
    batch = np.stack([volume, -volume])
    np.testing.assert_allclose(resample(batch, affine, affine, volume.shape).numpy(), batch, atol=1e-5)


def test_resample_nearest_keeps_labels(rng: np.random.Generator) -> None:
    labels = rng.integers(1, 6, size=(8, 9, 7)).astype(np.float32)
    src = np.eye(4)
    # scale 0.7, offset 0.05: source coordinates 0.7 i + 0.05 never fall on a rounding tie (x.5)
    target = np.diag([0.7, 0.7, 0.7, 1.0])
    target[:3, 3] = 0.05
    shape = (11, 12, 10)
    out = resample(labels, src, target, shape, mode="nearest").numpy()
    assert set(np.unique(out)) <= set(np.unique(labels)) | {0.0}
    # brute force: nearest source voxel, 0 outside the source
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1) * 0.7 + 0.05
    idx = np.rint(ijk).astype(int)
    inside = np.all((idx >= 0) & (idx < np.array(labels.shape)), axis=-1)
    expected = np.zeros(shape, np.float32)
    expected[inside] = labels[tuple(idx[inside].T)]
    np.testing.assert_array_equal(out, expected)


def test_resample_matches_scipy_affine_transform(rng: np.random.Generator) -> None:
    src_shape = (20, 22, 18)
    vol = rng.normal(size=src_shape)  # float64 all the way: the comparison can be tight
    src_affine = np.diag([2.0, 2.0, 2.0, 1.0])
    src_affine[:3, 3] = [-20.0, -22.0, -18.0]
    a = np.deg2rad(17.0)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    b = np.deg2rad(-9.0)
    rot = rot @ np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    target_affine = np.eye(4)
    target_affine[:3, :3] = rot @ np.diag([1.7, 2.3, 1.9])
    target_affine[:3, 3] = [-12.0, -15.0, -10.0]
    target_shape = (14, 13, 15)
    out = resample(vol, src_affine, target_affine, target_shape).numpy()
    m = np.linalg.inv(src_affine) @ target_affine  # target voxel -> source voxel
    ref = affine_transform(vol, m[:3, :3], offset=m[:3, 3], output_shape=target_shape, order=1,
                           mode="constant", cval=0.0)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in target_shape], indexing="ij"), -1)
    src = ijk @ m[:3, :3].T + m[:3, 3]
    inner = np.all((src >= 1) & (src <= np.array(src_shape) - 2), axis=-1)  # away from the borders
    assert inner.mean() > 0.3, "the test affine should keep a good part of the grid inside the source"
    np.testing.assert_allclose(out[inner], ref[inner], atol=1e-6)


def test_resample_rejects_bad_rank(affine: np.ndarray) -> None:
    with pytest.raises(ValueError, match="volumes must be"):
        resample(np.zeros((2, 3, 4, 5, 6), np.float32), affine, affine, (4, 5, 6))


# --------------------------------------------------------------------------------------------- patches
@pytest.mark.parametrize("p", [2, 4, 5])
def test_patchify_unpatchify_round_trip(rng: np.random.Generator, p: int) -> None:
    shape = (10, 12, 9)  # 5 divides none of 12, 9; 4 divides none of 10, 9; 2 not 9
    v = torch.as_tensor(rng.normal(size=(3, *shape)).astype(np.float32))
    patches = patchify(v, p)
    n = int(np.prod(patch_grid_shape(shape, p)))
    assert patches.shape == (3, n, p**3)
    torch.testing.assert_close(unpatchify(patches, shape, p), v, rtol=0, atol=0)


def test_patch_order_is_c_order_over_the_patch_grid(rng: np.random.Generator) -> None:
    p, shape = 4, (10, 12, 9)
    v = torch.as_tensor(rng.normal(size=(2, *shape)).astype(np.float32))
    patches = patchify(v, p).numpy()
    padded = pad_to_multiple(v, p).numpy()
    assert padded.shape[1:] == padded_shape(shape, p) == (12, 12, 12)
    np.testing.assert_array_equal(padded[:, :10, :12, :9], v.numpy())
    assert not padded[:, 10:].any() and not padded[:, :, :, 9:].any()  # zero padding at the far end
    pgrid = patch_grid_shape(shape, p)
    for k in range(patches.shape[1]):
        i, j, m = np.unravel_index(k, pgrid)
        cube = padded[:, i * p:(i + 1) * p, j * p:(j + 1) * p, m * p:(m + 1) * p]
        np.testing.assert_array_equal(patches[:, k], cube.reshape(2, -1))


def test_unpatchify_rejects_wrong_patch_count() -> None:
    with pytest.raises(ValueError, match="patches shape"):
        unpatchify(torch.zeros(1, 5, 64), (8, 8, 8), 4)


def test_active_patch_index_matches_brute_force(rng: np.random.Generator) -> None:
    p, shape = 4, (10, 12, 9)
    mask = rng.random(shape) > 0.995  # sparse: some cubes touched by a single voxel, most empty
    mask[9, 11, 8] = True  # a voxel in the far corner cube, which is mostly padding
    idx = active_patch_index(mask, p)
    pgrid = patch_grid_shape(shape, p)
    expected = []
    for k in range(int(np.prod(pgrid))):
        i, j, m = np.unravel_index(k, pgrid)
        if mask[i * p:(i + 1) * p, j * p:(j + 1) * p, m * p:(m + 1) * p].any():
            expected.append(k)
    assert 0 < len(expected) < np.prod(pgrid)
    np.testing.assert_array_equal(idx, expected)
    assert idx.dtype == np.int64
    np.testing.assert_array_equal(active_patch_index(torch.as_tensor(mask), p), expected)


# --------------------------------------------------------------------------------------------- GridSpec
def test_gridspec_forward_to_grid_keeps_active_zeroes_rest(rng: np.random.Generator, affine: np.ndarray) -> None:
    shape, p = (10, 12, 9), 4
    spec = GridSpec(shape, p)
    mask = np.zeros(shape, bool)
    mask[1:3, 2:4, 1:2] = True
    mask[8, 10, 7] = True
    union = spec.set_active_from_masks([mask])
    np.testing.assert_array_equal(union, mask)
    vols = rng.normal(size=(2, *shape)).astype(np.float32)
    patches = spec.forward(vols, affine, affine)  # identity resampling: grid == subject space
    assert patches.shape == (2, len(spec.active_index), p**3)
    back = spec.to_grid(patches).numpy()
    active = np.zeros(patch_grid_shape(shape, p), bool).reshape(-1)
    active[spec.active_index] = True
    voxel_active = np.repeat(np.repeat(np.repeat(active.reshape(patch_grid_shape(shape, p)), p, 0), p, 1), p, 2)
    voxel_active = voxel_active[: shape[0], : shape[1], : shape[2]]
    assert 0 < voxel_active.mean() < 1
    np.testing.assert_allclose(back[:, voxel_active], vols[:, voxel_active], atol=1e-5)
    assert not back[:, ~voxel_active].any()
    # unbatched patches go through too
    np.testing.assert_allclose(spec.to_grid(patches[0].numpy()).numpy(), back[0])


def test_gridspec_forward_needs_active_patches(volume: np.ndarray, affine: np.ndarray) -> None:
    with pytest.raises(RuntimeError, match="set_active_from_masks"):
        GridSpec((10, 12, 9), 4).forward(volume, affine, affine)
    with pytest.raises(ValueError, match="empty"):
        GridSpec((10, 12, 9), 4).set_active_from_masks([np.zeros((10, 12, 9))])


@pytest.mark.parametrize("grid", [(20, 24, 18), (9, 10, 8)], ids=["upsample", "downsample"])
def test_gridspec_to_subject_inverts_forward_on_a_smooth_field(affine: np.ndarray, grid: tuple[int, int, int]) -> None:
    subject_shape = (14, 16, 12)
    field = _smooth_field(subject_shape)
    spec = GridSpec(grid, 4)
    spec.set_active_from_masks([np.ones(grid, bool)])
    ga = resize_grid_affine(affine, subject_shape, grid)
    patches = spec.forward(field[None], affine, ga)
    back = spec.to_subject(patches, affine, ga, subject_shape).numpy()[0]
    assert back.shape == subject_shape
    assert _pearson(back, field) > 0.99
    np.testing.assert_allclose(back, field, atol=0.05)


# --------------------------------------------------------------------------------------------- NIfTI
def test_to_nifti_round_trip(tmp_path: Path, volume: np.ndarray, affine: np.ndarray) -> None:
    img = to_nifti(torch.as_tensor(volume, dtype=torch.float64).requires_grad_(), affine)
    nib.save(img, tmp_path / "map.nii.gz")
    back = nib.load(tmp_path / "map.nii.gz")
    assert back.shape == volume.shape
    assert back.get_data_dtype() == np.float32
    np.testing.assert_allclose(back.affine, affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(back.dataobj), volume)


def test_to_nifti_rejects_4d(affine: np.ndarray) -> None:
    with pytest.raises(ValueError, match="3-D"):
        to_nifti(np.zeros((2, 3, 4, 5), np.float32), affine)


# --------------------------------------------------------------------------------------------- z-score
def test_zscore_by_session(rng: np.random.Generator) -> None:
    n_vox = 30
    sessions = np.array([1, 2, 3] * 12 + [2, 3])  # interleaved, unequal session sizes
    base = {1: (5.0, 3.0), 2: (-2.0, 0.5), 3: (100.0, 10.0)}  # a different offset and scale per session
    x = np.stack([rng.normal(*base[s], size=n_vox) for s in sessions]).astype(np.float32)
    x[:, 3] = 123.456  # constant everywhere
    x[sessions == 2, 7] = -4.0  # constant in one session only
    z = zscore_by_session(x, sessions).numpy()
    assert z.shape == x.shape and np.isfinite(z).all()
    varying = np.ones(n_vox, bool)
    varying[3] = False
    for s in (1, 2, 3):
        zs = z[sessions == s]
        cols = varying.copy()
        if s == 2:
            cols[7] = False
        np.testing.assert_allclose(zs[:, cols].mean(0), 0, atol=1e-5)
        np.testing.assert_allclose(zs[:, cols].std(0), 1, atol=1e-4)
        # an independent reference, in float64
        xs = x[sessions == s][:, cols].astype(np.float64)
        np.testing.assert_allclose(zs[:, cols], (xs - xs.mean(0)) / xs.std(0), atol=1e-4)
    assert not z[:, 3].any()
    assert not z[sessions == 2, 7].any()
    assert z[sessions == 1, 7].std() == pytest.approx(1, abs=1e-4)


def test_zscore_by_session_checks_lengths() -> None:
    with pytest.raises(ValueError, match="session labels"):
        zscore_by_session(np.zeros((4, 3)), np.zeros(5))
