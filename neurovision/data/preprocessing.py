"""3-D preprocessing in torch, batched: resample onto the common grid, pad, patchify, keep active patches.

Shen et al. resize every subject's volume by trilinear interpolation onto one grid (NSD: subj01's), zero-pad to
a multiple of the patch size P, cut P**3 cubes and keep the "active" ones: cubes that touch the union of all
subjects' ROI masks. Everything here works on (B, X, Y, Z) tensors; the inverse maps patches back to each
subject's space and to a NIfTI image, so that maps computed later can be written out as brain images.

Affines follow nibabel: ``affine @ [i, j, k, 1]`` is the world (mm) position of voxel (i, j, k). A subject's
*grid affine* maps common-grid voxels to that subject's world space; resampling goes through world space, so
"resize" (the paper's choice: stretch the subject's field of view onto the grid) and "world" (a common world
grid, e.g. MNI) are the same operation with different grid affines.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

Shape3 = tuple[int, int, int]


# --------------------------------------------------------------------------------------------- geometry
def patch_grid_shape(shape: Sequence[int], patch_size: int) -> Shape3:
    """Number of patches along each axis after zero-padding ``shape`` to a multiple of ``patch_size``."""
    if patch_size < 1:
        raise ValueError(f"patch_size must be >= 1, got {patch_size}")
    return tuple(math.ceil(int(s) / patch_size) for s in shape)  # type: ignore[return-value]


def padded_shape(shape: Sequence[int], patch_size: int) -> Shape3:
    return tuple(n * patch_size for n in patch_grid_shape(shape, patch_size))  # type: ignore[return-value]


def resize_grid_affine(src_affine: np.ndarray, src_shape: Sequence[int], grid_shape: Sequence[int]) -> np.ndarray:
    """Grid affine that stretches the subject's whole field of view onto ``grid_shape`` (corner-aligned).

    Resampling with it equals ``F.interpolate(..., mode="trilinear", align_corners=True)``.
    """
    scale = [(s - 1) / max(g - 1, 1) for s, g in zip(src_shape, grid_shape, strict=True)]
    return np.asarray(src_affine, dtype=np.float64) @ np.diag([*scale, 1.0])


def resample(
    volumes: torch.Tensor | np.ndarray,
    src_affine: np.ndarray,
    target_affine: np.ndarray,
    target_shape: Sequence[int],
    mode: Literal["trilinear", "nearest"] = "trilinear",
) -> torch.Tensor:
    """Resample (B, X, Y, Z) or (X, Y, Z) volumes from ``src_affine`` space onto a target voxel grid.

    Target voxel (i, j, k) takes the value at world position ``target_affine @ ijk``; points outside the
    source field of view are 0. All B volumes share one sampling grid, so they go through as channels.
    """
    v = torch.as_tensor(volumes)
    squeeze = v.ndim == 3
    if squeeze:
        v = v[None]
    if v.ndim != 4:
        raise ValueError(f"volumes must be (B, X, Y, Z) or (X, Y, Z), got shape {tuple(v.shape)}")
    dtype = v.dtype if v.is_floating_point() else torch.float32
    v = v.to(dtype)
    src_shape = v.shape[1:]
    m = torch.as_tensor(np.linalg.inv(np.asarray(src_affine, np.float64)) @ np.asarray(target_affine, np.float64),
                        dtype=torch.float64)
    axes = [torch.arange(n, dtype=torch.float64) for n in target_shape]
    ii, jj, kk = torch.meshgrid(*axes, indexing="ij")
    ijk = torch.stack([ii, jj, kk, torch.ones_like(ii)], dim=-1)  # (X', Y', Z', 4)
    src = ijk @ m.T  # source voxel coordinates
    # normalise to [-1, 1] (align_corners=True); grid_sample wants (W, H, D) = (z, y, x) order
    norm = [2 * src[..., a] / max(int(src_shape[a]) - 1, 1) - 1 for a in range(3)]
    grid = torch.stack([norm[2], norm[1], norm[0]], dim=-1)[None].to(dtype)
    out = F.grid_sample(v[None], grid, mode="bilinear" if mode == "trilinear" else "nearest",
                        padding_mode="zeros", align_corners=True)[0]
    return out[0] if squeeze else out


# --------------------------------------------------------------------------------------------- patches
def pad_to_multiple(volumes: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Zero-pad the last three axes at their far end up to a multiple of ``patch_size``."""
    shape = volumes.shape[-3:]
    target = padded_shape(shape, patch_size)
    pad: list[int] = []
    for s, t in zip(reversed(shape), reversed(target), strict=True):
        pad += [0, t - s]
    return F.pad(volumes, pad) if any(pad) else volumes


def patchify(volumes: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, X, Y, Z) -> (B, N, P**3) with N = nX*nY*nZ patches in C order (zero-pads first)."""
    v = pad_to_multiple(volumes, patch_size)
    b = v.shape[0]
    nx, ny, nz = (s // patch_size for s in v.shape[1:])
    p = patch_size
    v = v.reshape(b, nx, p, ny, p, nz, p).permute(0, 1, 3, 5, 2, 4, 6)
    return v.reshape(b, nx * ny * nz, p**3)


def unpatchify(patches: torch.Tensor, grid_shape: Sequence[int], patch_size: int) -> torch.Tensor:
    """(B, N, P**3) over the full patch grid -> (B, X, Y, Z) cropped back to ``grid_shape``."""
    p = patch_size
    nx, ny, nz = patch_grid_shape(grid_shape, p)
    b = patches.shape[0]
    if patches.shape[1:] != (nx * ny * nz, p**3):
        raise ValueError(f"patches shape {tuple(patches.shape)} != (B, {nx * ny * nz}, {p ** 3})")
    v = patches.reshape(b, nx, ny, nz, p, p, p).permute(0, 1, 4, 2, 5, 3, 6).reshape(b, nx * p, ny * p, nz * p)
    x, y, z = (int(s) for s in grid_shape)
    return v[:, :x, :y, :z]


def active_patch_index(union_mask: np.ndarray | torch.Tensor, patch_size: int) -> np.ndarray:
    """Flat indices (C order over the patch grid) of the patches that touch the mask."""
    m = torch.as_tensor(np.asarray(union_mask) if isinstance(union_mask, np.ndarray) else union_mask)
    counts = patchify(m[None].float(), patch_size)[0].sum(dim=1)
    return torch.nonzero(counts > 0).flatten().numpy().astype(np.int64)


def to_active_patches(volumes: torch.Tensor, patch_size: int, active_index: np.ndarray) -> torch.Tensor:
    """(B, X, Y, Z) on the common grid -> (B, A, P**3) active patches."""
    return patchify(volumes, patch_size)[:, torch.as_tensor(active_index)]


def from_active_patches(
    patches: torch.Tensor, grid_shape: Sequence[int], patch_size: int, active_index: np.ndarray
) -> torch.Tensor:
    """(B, A, P**3) -> (B, X, Y, Z) on the common grid, zeros outside the active patches."""
    n = int(np.prod(patch_grid_shape(grid_shape, patch_size)))
    full = patches.new_zeros(patches.shape[0], n, patch_size**3)
    full[:, torch.as_tensor(active_index)] = patches
    return unpatchify(full, grid_shape, patch_size)


# --------------------------------------------------------------------------------------------- normalisation
def zscore_by_session(volumes: np.ndarray | torch.Tensor, sessions: np.ndarray, eps: float = 1e-6) -> torch.Tensor:
    """Per-voxel z-score within each session (NSD practice): (T, ...) with ``sessions`` of length T.

    Voxels that are constant within a session become 0 (never NaN).
    """
    v = np.array(volumes.detach().cpu() if isinstance(volumes, torch.Tensor) else volumes, dtype=np.float32)
    sessions = np.asarray(sessions)
    if len(sessions) != v.shape[0]:
        raise ValueError(f"{len(sessions)} session labels for {v.shape[0]} volumes")
    for s in np.unique(sessions):
        idx = np.nonzero(sessions == s)[0]
        x = v[idx]
        mu = x.mean(axis=0, dtype=np.float64).astype(np.float32)
        x -= mu
        sd = np.sqrt(np.mean(np.square(x), axis=0, dtype=np.float64)).astype(np.float32)
        ok = sd > eps
        x *= np.where(ok, 1.0 / np.where(ok, sd, 1.0), 0.0).astype(np.float32)
        v[idx] = x
    return torch.from_numpy(v)


# --------------------------------------------------------------------------------------------- pipeline
class GridSpec:
    """The common grid, patch size and active patches: forward (subject -> patches) and inverse maps."""

    def __init__(self, shape: Sequence[int], patch_size: int, active_index: np.ndarray | None = None) -> None:
        self.shape: Shape3 = tuple(int(s) for s in shape)  # type: ignore[assignment]
        if len(self.shape) != 3:
            raise ValueError(f"grid shape must have 3 axes, got {shape}")
        self.patch_size = int(patch_size)
        self.active_index = None if active_index is None else np.asarray(active_index, np.int64)

    @property
    def padded_shape(self) -> Shape3:
        return padded_shape(self.shape, self.patch_size)

    def set_active_from_masks(self, masks_on_grid: Sequence[np.ndarray | torch.Tensor]) -> np.ndarray:
        """Union of the subjects' ROI masks (already on the grid) -> active patches; returns the union."""
        union = torch.zeros(self.shape, dtype=torch.bool)
        for m in masks_on_grid:
            union |= torch.as_tensor(np.asarray(m)) > 0
        self.active_index = active_patch_index(union, self.patch_size)
        if len(self.active_index) == 0:
            raise ValueError("the union of ROI masks is empty on the common grid: no active patches")
        return union.numpy()

    def mask_to_grid(self, mask: np.ndarray, src_affine: np.ndarray, grid_affine: np.ndarray) -> np.ndarray:
        """A subject's ROI on the grid: a grid voxel belongs to it if the trilinear mask value is > 0."""
        return (resample(np.asarray(mask, np.float32), src_affine, grid_affine, self.shape) > 1e-3).numpy()

    def forward(self, volumes: torch.Tensor | np.ndarray, src_affine: np.ndarray, grid_affine: np.ndarray) -> torch.Tensor:
        """(B, X, Y, Z) subject volumes -> (B, A, P**3) active patches on the common grid."""
        if self.active_index is None:
            raise RuntimeError("active patches unknown: call set_active_from_masks first")
        on_grid = resample(volumes, src_affine, grid_affine, self.shape)
        if on_grid.ndim == 3:
            on_grid = on_grid[None]
        return to_active_patches(on_grid, self.patch_size, self.active_index)

    def to_grid(self, patches: torch.Tensor | np.ndarray) -> torch.Tensor:
        """(B, A, P**3) or (A, P**3) active patches -> volume(s) on the grid."""
        assert self.active_index is not None
        p = torch.as_tensor(np.asarray(patches, np.float32) if isinstance(patches, np.ndarray) else patches).float()
        squeeze = p.ndim == 2
        out = from_active_patches(p[None] if squeeze else p, self.shape, self.patch_size, self.active_index)
        return out[0] if squeeze else out

    def to_subject(
        self,
        patches: torch.Tensor | np.ndarray,
        affine: np.ndarray,
        grid_affine: np.ndarray,
        original_shape: Sequence[int],
    ) -> torch.Tensor:
        """Active patches -> volume(s) in the subject's own voxel space (inverse of :meth:`forward`)."""
        return resample(self.to_grid(patches), grid_affine, affine, original_shape)


def to_nifti(volume: torch.Tensor | np.ndarray, affine: np.ndarray):  # -> nibabel.Nifti1Image
    """Wrap a 3-D map in a NIfTI image (float32) with the subject's affine."""
    import nibabel as nib

    data = np.asarray(volume.detach().cpu() if isinstance(volume, torch.Tensor) else volume, dtype=np.float32)
    if data.ndim != 3:
        raise ValueError(f"to_nifti expects a 3-D volume, got shape {data.shape}")
    return nib.Nifti1Image(data, np.asarray(affine, np.float64))
