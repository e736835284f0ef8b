"""Concept localisation (Shen et al. 2024, Fig. 6): GradCAM of a concept's CLIP text embedding on the brain.

For a stage-1 (or stage-2) model, the score explained is the similarity between the ViT3D CLIP head's
prediction and a concept's CLIP text direction: ``target="similarity"`` (the paper's) uses the concept's text
embedding, ``s = cos(clip_head(encoder(x).cls), t_c)``; ``target="relative"`` (the default) uses t_c minus the
mean embedding of the store's concepts, i.e. the similarity to the concept minus the mean similarity to all of
them (its zero-shot logit relative to the others, :func:`concept_directions`). GradCAM differentiates the score
with respect to the hidden states entering the encoder's last block (``ViT3DOutput.penultimate``; ``layer=k``:
block k's input, 0 = the token embeddings). Each channel's weight is the mean gradient over the patch tokens and
the map is the ReLU of the weighted sum of that layer's activations: one value per active patch.

The patch maps of the evaluation items are aggregated per subject and concept (default: the mean over the
items whose scene contains the concept, see :func:`aggregate`), spread over each patch's voxels (default:
trilinear upsampling of the patch grid), mapped back to the subject's own voxel space (the inverse of the
store's preprocessing) and written as NIfTI and PNG. ``method="pattern"`` instead gives the model's signed
activation pattern (Haufe et al. 2014: the covariance of each voxel with the score over the items). Several
checkpoints (e.g. the paper's patch sizes 14, 12, 10) are ensembled by averaging their subject-space maps. Where
the store holds planted concept maps (the phantom), every map is scored by its Pearson correlation with the
truth inside the subject's ROI (:func:`score`).

Measured on the demo phantom (the 16-epoch stage-1 demo checkpoint of ``make demo-full``, test split, 4 subjects
x 10 concepts, r in the ROI; README, "Stage 2"): ``method="pattern"`` r = 0.63 with the relative target and 0.50
with the plain similarity; GradCAM r = -0.02 / 0.13 (relative / similarity). Why GradCAM stays low: a gradient
is a filter, not a pattern (Haufe et al.): it weighs voxels by how the model reads them, including the
directions it uses to cancel the other concepts and the noise, and on the phantom's blobs of either sign an
attribution (gradient x activation) is positive on both signs, so it can at best find |M| (r_abs 0.13 at the
penultimate layer).

Entry points: :func:`gradcam` (one batch), :func:`localize` (checkpoints -> files + scores),
``neurovision localize`` (the CLI) and :class:`callbacks.ConceptMaps` (after ``trainer.test``).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from neurovision.data.atomic import atomic_path
from neurovision.data.preprocessing import GridSpec, patch_grid_shape, to_active_patches
from neurovision.data.store import Store
from neurovision.localization.gradcam import concept_cams
from neurovision.localization.options import Aggregate, Mask, Method, Target, Upsample
from neurovision.metrics.correlation import pearson_r
from neurovision.models import with_readout

__all__ = [
    "Localization", "ModelParts", "aggregate", "concept_directions", "concept_list", "ensemble",
    "localize", "model_maps", "patch_cam_to_patches", "pearson", "score", "score_mask", "to_subject_volume", "write_maps",
]



# --------------------------------------------------------------------------------------------- mapping
def _grid_spec(store: Store, patch_size: int | None = None, patch_coords: Any = None) -> GridSpec:
    """The store's GridSpec, or the same grid cut with another patch size / active set (a checkpoint's)."""
    if patch_size is None or patch_coords is None:
        return store.grid_spec()
    coords = np.asarray(patch_coords, np.int64).reshape(-1, 3)
    idx = np.asarray(np.ravel_multi_index(tuple(coords.T), patch_grid_shape(store.grid.shape, int(patch_size))), np.int64)
    return GridSpec(store.grid.shape, int(patch_size), idx)


def patch_cam_to_patches(cam: np.ndarray | Tensor, spec: GridSpec, upsample: Upsample = "trilinear") -> np.ndarray:
    """(..., A) patch values -> (..., A, P**3) voxel values of the active patches.

    ``nearest`` gives every voxel of a patch its patch's value. ``trilinear`` upsamples the patch grid to the
    voxel grid (patch centres at the patch values) by normalised convolution over the active patches only:
    each voxel takes the trilinear-weighted mean of its neighbouring *active* patches, so inactive patches
    (no value) do not pull the map towards zero at the edge of the active region.
    """
    c = torch.as_tensor(np.asarray(cam, np.float32))
    lead = c.shape[:-1]
    c = c.reshape(-1, c.shape[-1])
    p = spec.patch_size
    assert spec.active_index is not None
    if c.shape[-1] != len(spec.active_index):
        raise ValueError(f"cam has {c.shape[-1]} patches, the grid {len(spec.active_index)} active patches")
    if upsample == "nearest":
        out = c[..., None].expand(-1, -1, p**3)
    elif upsample == "trilinear":
        gshape = patch_grid_shape(spec.shape, p)
        n = math.prod(gshape)
        idx = torch.as_tensor(spec.active_index)
        vol = torch.zeros(c.shape[0], n)
        vol[:, idx] = c
        mask = torch.zeros(1, n)
        mask[:, idx] = 1.0
        up = F.interpolate(vol.view(-1, 1, *gshape), scale_factor=p, mode="trilinear", align_corners=False)
        w = F.interpolate(mask.view(1, 1, *gshape), scale_factor=p, mode="trilinear", align_corners=False)
        filled = (up / w.clamp_min(1e-6))[:, 0]  # (N, padded X, Y, Z)
        out = to_active_patches(filled, p, spec.active_index)
    else:
        raise ValueError(f"upsample must be 'nearest' or 'trilinear', got {upsample!r}")
    return out.reshape(*lead, len(spec.active_index), p**3).numpy().astype(np.float32)


def to_subject_volume(store: Store, patches: np.ndarray, subject: str | int, spec: GridSpec | None = None) -> np.ndarray:
    """(A, P**3) active-patch map -> a volume in the subject's own voxel space.

    Uses :meth:`Store.to_subject_nifti` for the store's own patches; a ``spec`` with another patch size (a
    checkpoint trained on the same grid cut differently) goes through the same inverse map.
    """
    if spec is None or (spec.patch_size == store.grid.patch_size and spec.active_index is not None
                        and np.array_equal(spec.active_index, store.grid.active_index)):
        return np.asarray(store.to_subject_nifti(patches, subject).dataobj, np.float32)
    s = store.subject(subject)
    return spec.to_subject(patches, s.affine, s.grid_affine, s.original_shape).numpy().astype(np.float32)


# --------------------------------------------------------------------------------------------- aggregation
def aggregate(cams: np.ndarray, present: np.ndarray, mode: Aggregate = "present") -> np.ndarray:
    """Per-item maps (N, ...) -> one map for a concept from ``present`` (N,) bool (the item's scene has it).

    ``present`` (default): the mean over the items showing the concept. ``contrast``: that mean minus the
    mean over the items without it. On the demo phantom the plain mean correlates better with the planted
    maps (an earlier session's stage-1 demo checkpoint, GradCAM of the plain similarity, 4 subjects x 10
    concepts, ROI, trilinear: mean r -0.06 vs -0.16, and 0.25 vs 0.08 against the maps' absolute value): GradCAM
    already conditions on the concept through its gradient, and the absent items' maps (the evidence
    against the concept) are not the concept's absence map.
    """
    present = np.asarray(present, bool)
    cams = np.asarray(cams)
    if present.shape != cams.shape[:1]:
        raise ValueError(f"present has shape {present.shape}, expected ({cams.shape[0]},)")
    if not present.any():
        raise ValueError("no item shows the concept")
    pos = cams[present].mean(0)
    if mode == "present":
        return pos
    if mode != "contrast":
        raise ValueError(f"aggregate mode must be 'present' or 'contrast', got {mode!r}")
    if present.all():
        return pos
    return pos - cams[~present].mean(0)


# --------------------------------------------------------------------------------------------- scoring
def pearson(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Pearson r between two maps inside ``mask`` (nan when either is constant there)."""
    x = np.asarray(a, np.float64)
    y = np.asarray(b, np.float64)
    if mask is not None:
        m = np.asarray(mask, bool)
        x, y = x[m], y[m]
    return float(pearson_r(x.ravel(), y.ravel(), constant="nan"))


def score_mask(store: Store, subject: str | int, mask: Mask = "roi") -> np.ndarray:
    """Where a subject's maps are scored: ``roi`` (the subject's ROI, where the phantom plants its maps) or
    ``active`` (every subject voxel the active patches cover, i.e. all the model sees; the store keeps no
    whole-brain mask)."""
    if mask == "roi":
        return store.roi(subject) > 0
    if mask == "active":
        g = store.grid
        ones = np.ones((g.n_active, g.patch_size**3), np.float32)
        return np.asarray(store.to_subject_nifti(ones, subject).dataobj) > 0.5
    raise ValueError(f"mask must be 'roi' or 'active', got {mask!r}")


def score(maps: dict[str, dict[str, np.ndarray]], store: Store, mask: Mask = "roi") -> tuple[list[dict[str, Any]], float]:
    """Pearson r of every ``maps[subject][concept]`` with the store's planted map of that concept.

    Returns tidy rows ``{"subject", "concept", "r", "r_abs"}`` and the mean r (nan without planted maps);
    ``r_abs`` correlates with the planted map's absolute value: the phantom plants blobs of either sign and
    an unsigned relevance map (GradCAM) can at best find where they are, not their sign.
    """
    rows: list[dict[str, Any]] = []
    for subject, per_concept in maps.items():
        truth, names = _truth(store, subject)
        if truth is None:
            continue
        m = score_mask(store, subject, mask)
        for concept, vol in per_concept.items():
            if concept in names:
                t = truth[names.index(concept)]
                rows.append({"subject": subject, "concept": concept, "r": pearson(vol, t, m),
                             "r_abs": pearson(vol, np.abs(t), m)})
    rs = [r["r"] for r in rows if np.isfinite(r["r"])]
    return rows, float(np.mean(rs)) if rs else float("nan")


def _truth(store: Store, subject: str) -> tuple[np.ndarray | None, list[str]]:
    key = f"concept_maps_{subject}"
    if key not in store.extras:
        return None, []
    names = _extra_concepts(store, key)
    return store.extra(key), names


def _extra_concepts(store: Store, key: str) -> list[str]:
    raw = store.h5[f"extras/{key}"].attrs.get("concepts")
    if raw is not None:
        return list(json.loads(raw if isinstance(raw, str) else raw.decode()))
    return [n.decode() for n in store.extra("concept_names")]


def concept_list(store: Store) -> list[str]:
    """The concepts to localise: those with planted maps, else every word of the ``concepts`` annotations."""
    keys = [k for k in store.extras if k.startswith("concept_maps_")]
    if keys:
        return _extra_concepts(store, keys[0])
    if "concepts" not in store.annotation_kinds:
        raise KeyError(f"{store.path}: field 'annotations/concepts': missing (no concepts to localise)")
    return sorted({w for ws in store.annotations("concepts") for w in ws})


def concept_directions(clip_teacher: Any, concepts: Sequence[str], *, target: Target = "relative",
                       reference: Sequence[str] = (), prompt: str = "{}") -> Tensor:
    """(C, D) the text directions whose similarity with the predicted CLIP embedding is explained.

    ``similarity``: each concept's normalised CLIP text embedding t_c, so the explained score is
    ``cos(pred, t_c)`` (the paper's). ``relative``: t_c minus the mean normalised embedding of the reference
    concepts (``reference`` together with ``concepts``), so the score is ``cos(pred, t_c) - mean_k cos(pred,
    t_k)`` up to a positive factor per concept: the concept's zero-shot logit relative to the others. The raw
    similarity of a CLIP embedding to every word shares a large common part (how much the image looks like any
    of them), which puts the other concepts' maps into each concept's map; the relative score removes it.
    """
    if target not in ("relative", "similarity"):
        raise ValueError(f"target must be 'relative' or 'similarity', got {target!r}")
    words = list(concepts)
    ref = words if target == "similarity" else list(dict.fromkeys([*words, *reference]))
    if target == "relative" and len(ref) < 2:
        raise ValueError(f"target 'relative' needs at least two concepts (concepts and reference), got {ref}; "
                         "pass more concepts or target='similarity'")
    with torch.inference_mode(False):
        emb = F.normalize(clip_teacher.encode_text([prompt.format(w) for w in ref]).float(), dim=-1)
    return emb if target == "similarity" else emb[: len(words)] - emb.mean(0, keepdim=True)


# --------------------------------------------------------------------------------------------- pipeline
@dataclass
class ModelParts:
    """A model to localise with: its encoder, CLIP head and the patch geometry it was trained on."""

    encoder: nn.Module
    clip_head: nn.Module
    patch_size: int | None = None  # None: the store's own
    patch_coords: Any = None
    name: str = "model"
    skip: nn.Module | None = None  # the stage-1 voxel read-out added to the CLIP head's output (linear_skip)


@dataclass
class Localization:
    """What :func:`localize` returns.

    Attributes:
        maps: ``maps[subject][concept]`` the (ensembled) map in the subject's voxel space.
        rows: tidy ``{"subject", "concept", "r"}`` rows (empty without planted maps).
        r_mean: mean r over the rows.
        per_concept: mean r of each concept over subjects.
        files: paths written.
        mask: where r was computed.
        rows_by_mask: the rows for every mask in ``("roi", "active")``.
    """

    maps: dict[str, dict[str, np.ndarray]]
    rows: list[dict[str, Any]]
    r_mean: float
    per_concept: dict[str, float]
    mask: str
    rows_by_mask: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)


def _items(store: Store, split: str, condition: str, subjects: list[int]):
    from data_modules.fmri import FMRITrials

    return FMRITrials(store, split, subjects, mode=condition)  # type: ignore[arg-type]


def _similarity(encoder: nn.Module, clip_head: nn.Module, patches: Tensor, text: Tensor,
                subject: Tensor | None, skip: nn.Module | None = None) -> Tensor:
    """(B, C) cosine similarity of the predicted CLIP embeddings with C text embeddings (no graph); ``skip``: the
    stage-1 voxel read-out, added to the head's prediction as the task adds it."""
    with torch.no_grad():
        pred = F.normalize(with_readout(clip_head(encoder(patches, subject).cls), skip, patches).float(), dim=-1)
        return pred @ F.normalize(text.float().to(pred.device), dim=-1).T


def model_maps(parts: ModelParts, store: Store, text_embs: Tensor, concepts: Sequence[str], *, split: str = "test",
               condition: Literal["average", "single"] = "average", method: Method = "gradcam",
               aggregate_mode: Aggregate = "present", upsample: Upsample = "trilinear", relu: bool = True,
               layer: int = -1, batch_size: int = 64, device: str | torch.device = "cpu", subjects: Sequence[str] | None = None,
               progress: bool = False) -> dict[str, dict[str, np.ndarray]]:
    """One model's maps ``[subject][concept]`` in subject space from the split's items.

    ``method="gradcam"``: per-item GradCAMs (:func:`concept_cams`) aggregated per subject and concept
    (:func:`aggregate`), spread over the voxels (:func:`patch_cam_to_patches`), taken at the states entering
    block ``layer`` (see :func:`gradcam`). ``method="pattern"``: the
    model's activation pattern (Haufe et al. 2014): the covariance over the subject's items of each voxel
    with the model's concept similarity ``cos(clip_head(cls), t_c)``: a signed map at voxel resolution
    (``aggregate_mode``, ``upsample``, ``relu`` and ``layer`` do not apply).
    """
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    if method not in ("gradcam", "pattern"):
        raise ValueError(f"method must be 'gradcam' or 'pattern', got {method!r}")
    spec = _grid_spec(store, parts.patch_size, parts.patch_coords)
    store_spec = store.grid_spec()
    repatch = not (spec.patch_size == store.grid.patch_size and spec.active_index is not None
                   and np.array_equal(spec.active_index, store.grid.active_index))
    subj_idx = [store.subject(s).index for s in (subjects or store.subject_names)]
    ds = _items(store, split, condition, subj_idx)
    if len(ds) == 0:
        raise ValueError(f"{store.path}: no {split!r} items for subjects {subjects or store.subject_names}")
    present_words = store.annotations("concepts")
    dev = torch.device(device)
    text = text_embs.to(dev)
    n_c = len(concepts)
    cams: list[np.ndarray] = []
    subj_of: list[np.ndarray] = []
    stim_of: list[np.ndarray] = []
    sums: dict[int, dict[str, Any]] = {}  # pattern: running sums per subject
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0)
    for batch in tqdm(loader, desc=f"{method}[{parts.name}]", disable=not progress, leave=False):
        x = batch["patches"].float()
        xm = to_active_patches(store_spec.to_grid(x), spec.patch_size, spec.active_index) if repatch else x  # type: ignore[arg-type]
        sub = batch["subject"]
        if method == "gradcam":
            cam = concept_cams(parts.encoder, parts.clip_head, xm.to(dev), text, sub.to(dev), relu=relu,
                               layer=layer)
            cams.append(cam.cpu().numpy().transpose(1, 0, 2))  # (B, C, A)
            subj_of.append(sub.numpy())
            stim_of.append(batch["stimulus"].numpy())
            continue
        sim = _similarity(parts.encoder, parts.clip_head, xm.to(dev), text, sub.to(dev), parts.skip).cpu().double()
        xd = x.double()
        for si in sub.unique().tolist():
            m = sub == si
            acc = sums.setdefault(si, {"n": 0, "s": torch.zeros(n_c, dtype=torch.float64),
                                       "x": torch.zeros(x.shape[1:], dtype=torch.float64),
                                       "sx": torch.zeros(n_c, *x.shape[1:], dtype=torch.float64)})
            acc["n"] += int(m.sum())
            acc["s"] += sim[m].sum(0)
            acc["x"] += xd[m].sum(0)
            acc["sx"] += torch.einsum("bc,bav->cav", sim[m], xd[m])
    out: dict[str, dict[str, np.ndarray]] = {}
    if method == "pattern":
        for si in subj_idx:
            name = store.subject(si).name
            acc = sums[si]
            n = acc["n"]
            cov = (acc["sx"] / n - (acc["s"] / n)[:, None, None] * (acc["x"] / n)[None]).float().numpy()
            out[name] = {c: to_subject_volume(store, cov[ci], name) for ci, c in enumerate(concepts)}
        return out
    all_cams = np.concatenate(cams)
    subj = np.concatenate(subj_of)
    stim = np.concatenate(stim_of)
    for si in subj_idx:
        name = store.subject(si).name
        m = subj == si
        words = [set(present_words[int(s)]) for s in stim[m]]
        agg: dict[int, np.ndarray] = {}
        for ci, c in enumerate(concepts):
            present = np.array([c in w for w in words])
            if present.any():  # a concept no item shows gets no map
                agg[ci] = aggregate(all_cams[m][:, ci], present, aggregate_mode)
        if not agg:
            out[name] = {}
            continue
        keys = sorted(agg)
        patches = patch_cam_to_patches(np.stack([agg[k] for k in keys]), spec, upsample)  # (C', A, P**3)
        out[name] = {concepts[k]: to_subject_volume(store, patches[i], name, spec) for i, k in enumerate(keys)}
    return out


def _unit(vol: np.ndarray) -> np.ndarray:
    s = float(np.abs(vol).max())
    return vol / s if s > 0 else vol


def ensemble(per_model: Sequence[dict[str, dict[str, np.ndarray]]]) -> dict[str, dict[str, np.ndarray]]:
    """Average several models' subject-space maps, each scaled to max |value| 1 first (models' GradCAM
    scales differ)."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for subject in per_model[0]:
        out[subject] = {}
        for concept in per_model[0][subject]:
            vols = [_unit(m[subject][concept]) for m in per_model if concept in m.get(subject, {})]
            out[subject][concept] = np.mean(vols, 0).astype(np.float32)
    return out


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def write_maps(maps: dict[str, dict[str, np.ndarray]], store: Store, out_dir: str | Path, *,
               rows: Sequence[dict[str, Any]] = (), png: bool = True, png_kind: Literal["glass", "stat"] = "glass",
               progress: bool = False) -> list[Path]:
    """Write ``<out>/<subject>/<concept>.nii.gz`` (+ ``.png``) for every map, and ``<out>/concept_r.csv``."""
    import nibabel as nib
    from tqdm.auto import tqdm

    from neurovision.data.preprocessing import to_nifti

    out = Path(out_dir)
    files: list[Path] = []
    r_of = {(r["subject"], r["concept"]): r["r"] for r in rows}
    concepts = list(dict.fromkeys(c for per in maps.values() for c in per))
    for concept in tqdm(concepts, desc="concept maps", disable=not progress):
        for subject, per in maps.items():
            if concept not in per:
                continue
            img = to_nifti(per[concept], store.subject(subject).affine)
            path = out / subject / f"{_safe(concept)}.nii.gz"
            with atomic_path(path, suffix=".nii.gz") as tmp:
                nib.save(img, tmp)
            files.append(path)
            if png:
                r = r_of.get((subject, concept))
                title = f"{subject} {concept}" + (f" (r={r:.2f})" if r is not None and np.isfinite(r) else "")
                files.append(_plot(img, out / subject / f"{_safe(concept)}.png", title, png_kind))
    if rows:
        path = out / "concept_r.csv"
        with atomic_path(path, suffix=".csv") as tmp, open(tmp, "w", newline="") as f:
            cols = ["subject", "concept", "r"] + (["r_abs"] if all("r_abs" in r for r in rows) else [])
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows({k: r[k] for k in cols} for r in rows)
        files.append(path)
    return files


def _plot(img: Any, path: Path, title: str, kind: str) -> Path:
    import matplotlib

    if matplotlib.get_backend().lower() != "agg":
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from nilearn import plotting

    data = np.asarray(img.dataobj)
    vmax = float(np.abs(data).max()) or 1.0
    fig = plt.figure(figsize=(7, 2.6))
    if kind == "glass":
        disp = plotting.plot_glass_brain(img, figure=fig, title=title, colorbar=True, plot_abs=False,
                                         vmax=vmax, vmin=-vmax, threshold=0.3 * vmax, cmap="RdBu_r")
    else:
        disp = plotting.plot_stat_map(img, bg_img=None, figure=fig, title=title, colorbar=True,
                                      vmax=vmax, threshold=0.3 * vmax, cmap="RdBu_r", draw_cross=False)
    with atomic_path(path, suffix=".png") as tmp:
        disp.savefig(str(tmp), dpi=80)
    disp.close()
    plt.close(fig)
    return path


def localize(checkpoints: Sequence[str | Path | ModelParts], store: str | Path | Store, clip_teacher: Any,
             out_dir: str | Path | None, concepts: Sequence[str] | None = None, split: str = "test", *,
             condition: Literal["average", "single"] = "average", method: Method = "gradcam",
             aggregate_mode: Aggregate = "present", upsample: Upsample = "trilinear", mask: Mask = "roi",
             relu: bool = True, layer: int = -1, target: Target = "relative",
             prompt: str = "{}", batch_size: int = 64, device: str | torch.device = "cpu",
             subjects: Sequence[str] | None = None, png: bool = True, png_kind: Literal["glass", "stat"] = "glass",
             check_teacher: bool = True, progress: bool = True) -> Localization:
    """Concept maps of one or more stage-1 checkpoints (ensembled in subject space), written and scored.

    Args:
        checkpoints: stage-1 checkpoint paths (or :class:`ModelParts`). Checkpoints trained on the same grid
            with another patch size are fed the store's volumes re-cut to their patch size.
        store: the store (path or :class:`Store`) whose ``split`` items are explained.
        clip_teacher: the CLIP teacher the heads were trained towards (its ``encode_text`` embeds concepts).
        out_dir: where NIfTI, PNG and ``concept_r.csv`` go (None: nothing written).
        concepts: concept words (default: the store's, :func:`concept_list`).
        split: the items' split.
        condition: ``average`` (each image's repeats averaged, one item per subject and image) or ``single``.
        method: ``gradcam`` (the paper's) or ``pattern`` (signed activation pattern), see :func:`model_maps`.
        aggregate_mode: see :func:`aggregate` (default ``present``: the mean over the items showing it).
        upsample: patch -> voxel spreading, see :func:`patch_cam_to_patches`.
        mask: where r is reported (default ``roi``: the phantom plants its maps only there; both masks are
            computed, see :func:`score_mask`).
        relu: GradCAM's ReLU (False: signed maps).
        layer: GradCAM at the states entering this encoder block (-1: the last, the paper's penultimate
            layer; 0: the token embeddings), see :func:`gradcam`.
        target: the explained score: ``relative`` (default: the concept's similarity minus the mean similarity
            to the store's concepts) or ``similarity`` (the plain cosine, the paper's), see
            :func:`concept_directions`.
        prompt: text template of a concept (``"{}"``: the bare word).
        check_teacher: refuse a CLIP teacher other than the one the checkpoint's head was trained towards.
    """
    from tqdm.auto import tqdm

    from neurovision.models.stage1 import load_stage1

    st = store if isinstance(store, Store) else Store(store)
    words = list(concepts) if concepts is not None else concept_list(st)
    if not words:
        raise ValueError("no concepts to localise")
    models: list[ModelParts] = []
    for ck in checkpoints:
        if isinstance(ck, ModelParts):
            models.append(ck)
            continue
        parts = load_stage1(ck, map_location=device, key="--ckpt")
        tid = (parts.teacher_ids or {}).get("clip")
        if check_teacher and tid and getattr(clip_teacher, "id", tid) != tid:
            raise ValueError(f"{ck}: its CLIP head was trained towards {tid}, but the given CLIP teacher is "
                             f"{clip_teacher.id} (pass the run's clip teacher: --clip-config/--clip-checkpoint)")
        if tuple(parts.spec.grid_shape) != tuple(st.grid.shape):
            raise ValueError(f"{ck}: trained on grid {tuple(parts.spec.grid_shape)}, the store {st.path} has "
                             f"{tuple(st.grid.shape)}")
        models.append(ModelParts(parts.encoder.to(device), parts.clip_head.to(device), parts.spec.patch_size,
                                 parts.spec.patch_coords, name=Path(ck).stem,
                                 skip=None if parts.skip is None else parts.skip.to(device)))
    if not models:
        raise ValueError("localize needs at least one checkpoint")
    reference: list[str] = []
    if target == "relative" and concepts is not None:
        try:
            reference = concept_list(st)
        except KeyError:  # a store without concept words: the given concepts are the reference
            reference = []
    text = concept_directions(clip_teacher, words, target=target, reference=reference, prompt=prompt)
    per_model = []
    for parts in tqdm(models, desc="models", disable=not progress or len(models) < 2):
        per_model.append(model_maps(parts, st, text, words, split=split, condition=condition, method=method,
                                    aggregate_mode=aggregate_mode, upsample=upsample, relu=relu,
                                    layer=layer, batch_size=batch_size, device=device, subjects=subjects, progress=progress))
    maps = per_model[0] if len(per_model) == 1 else ensemble(per_model)
    scored = {m: score(maps, st, m) for m in ("roi", "active")}
    rows, r_mean = scored[mask]
    rows_by_mask = {m: rs for m, (rs, _) in scored.items()}
    per_concept = {c: float(np.nanmean([r["r"] for r in rows if r["concept"] == c]))
                   for c in words if any(r["concept"] == c for r in rows)}
    loc = Localization(maps, rows, r_mean, per_concept, mask, rows_by_mask)
    if out_dir is not None:
        loc.files = write_maps(maps, st, out_dir, rows=rows, png=png, png_kind=png_kind, progress=progress)
    return loc
