"""A tiny, seeded, layout-faithful fake of the Natural Scenes Dataset.

Same file names, dataset names, dtypes and axis orders as the public NSD release; only the sizes shrink:
volumes of ~12^3 voxels, 16x16 images, ``trials_per_session`` trials per session and an image set sized to the
design (each image shown 3 times per subject, a shared set seen by all 8 design subjects).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pandas as pd
from scipy.io import savemat

# h5py order (Z, Y, X), as in the betas files; the NIfTI volumes are the transpose (X, Y, Z)
DEFAULT_SHAPES: dict[int, tuple[int, int, int]] = {1: (12, 14, 11), 2: (11, 13, 12)}
OTHER_SHAPE = (12, 13, 11)
IMAGE_SIZE = 16
N_DESIGN_SUBJECTS = 8
#: a few of COCO's 80 categories, with their real ids
CATEGORIES: dict[int, str] = {1: "person", 2: "bicycle", 3: "car", 6: "bus", 16: "bird", 17: "cat", 18: "dog",
                              38: "kite", 44: "bottle", 62: "chair", 67: "dining table"}
LANDSCAPE_CROP = "(0, 0, 0.125, 0.125)"  # (top, bottom, left, right): 640x480 -> the central 480x480
PORTRAIT_CROP = "(0.125, 0.125, 0, 0)"  # 480x640 -> the central 480x480


def _affine(subject: int, shape_xyz: Sequence[int]) -> np.ndarray:
    """A 1.8 mm LPI-ish affine centred on the volume, offset a little per subject."""
    a = np.diag([1.8, 1.8, 1.8, 1.0])
    a[:3, 3] = [-0.9 * (n - 1) + 0.3 * subject for n in shape_xyz]
    return a


def _brain_and_roi(shape_xyz: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """An ellipsoid 'brain' and a posterior ROI inside it (NIfTI order)."""
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape_xyz], indexing="ij")
    r2 = sum(g**2 for g in grids)
    brain = r2 < 0.9
    roi = brain & (grids[1] < -0.2) & (np.abs(grids[2]) < 0.6)
    return brain, roi


def _write_instances(d: Path, coco_ids: np.ndarray, coco_split: np.ndarray, landscape: np.ndarray, planted_at: int,
                     planted: Sequence[tuple[str, Sequence[float], bool]] | None, rng: np.random.Generator) -> None:
    by_name = {v: k for k, v in CATEGORIES.items()}
    cats = [{"id": k, "name": v, "supercategory": "thing"} for k, v in CATEGORIES.items()]
    for split in ("train2017", "val2017"):
        images, anns = [], []
        for i in np.flatnonzero(coco_split == split):
            w, h = (640, 480) if landscape[i] else (480, 640)
            images.append({"id": int(coco_ids[i]), "width": w, "height": h, "file_name": f"{int(coco_ids[i]):012d}.jpg"})
            if i == planted_at and planted is not None:
                objs = [(by_name[c], [float(v) for v in box], bool(crowd)) for c, box, crowd in planted]
            else:
                objs = []
                for _ in range(int(rng.integers(0, 5))):
                    bw, bh = rng.uniform(0.1, 0.6) * w, rng.uniform(0.1, 0.6) * h
                    x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
                    objs.append((int(rng.choice(list(CATEGORIES))), [round(x, 2), round(y, 2), round(bw, 2),
                                                                     round(bh, 2)], False))
            for cat, box, crowd in objs:
                anns.append({"id": len(anns) + 1, "image_id": int(coco_ids[i]), "category_id": cat, "bbox": box,
                             "area": box[2] * box[3], "iscrowd": int(crowd), "segmentation": []})
        anns.append({"id": len(anns) + 1, "image_id": 999_999_999, "category_id": 1, "bbox": [0, 0, 9, 9],
                     "area": 81, "iscrowd": 0, "segmentation": []})  # a COCO image not in NSD
        doc = {"info": {"description": "fake COCO 2017"}, "licenses": [], "images": images, "annotations": anns,
               "categories": cats}
        (d / f"instances_{split}.json").write_text(json.dumps(doc))


def make_fake_nsd(
    root: Path,
    subjects: Sequence[int] = (1, 2),
    n_sessions: int = 2,
    trials_per_session: int = 750,
    shapes: dict[int, tuple[int, int, int]] | None = None,
    seed: int = 0,
    instances: bool = True,
    planted: Sequence[tuple[str, Sequence[float], bool]] | None = None,
) -> Path:
    """Write the fake NSD under ``root`` and return ``root``.

    ``shapes`` maps subject -> betas volume shape in h5py order (Z, Y, X); subjects not in ``subjects`` get
    nothing on disk but still have a row in ``subjectim`` (as in the real design, 8 subjects).
    ``instances`` writes COCO ``instances_{train,val}2017.json``: every image 640x480 (cropBox cutting the left
    and right eighths) or 480x640 (top and bottom), with 0-4 random objects of :data:`CATEGORIES`;
    ``planted`` replaces the objects of the first shared image (landscape) by these ``(category, [x, y, w, h]
    in pixels, iscrowd)``.
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    shapes = {**DEFAULT_SHAPES, **(shapes or {})}
    exp = root / "nsddata" / "experiments" / "nsd"
    stim = root / "nsddata_stimuli" / "stimuli" / "nsd"
    for d in (exp, stim / "annotations"):
        d.mkdir(parents=True, exist_ok=True)

    # ---- design: every column shown 3 times; the first n_shared columns are the shared images
    n_trials = n_sessions * trials_per_session
    n_cols = math.ceil(n_trials / 3)
    n_shared = max(1, n_cols // 5)
    n_own = n_cols - n_shared
    n_images = n_shared + N_DESIGN_SUBJECTS * n_own
    perm = rng.permutation(n_images)
    shared = np.sort(perm[:n_shared])
    subjectim = np.stack([np.concatenate([shared, perm[n_shared + k * n_own: n_shared + (k + 1) * n_own]])
                          for k in range(N_DESIGN_SUBJECTS)])
    masterordering = rng.permutation(np.repeat(np.arange(n_cols), 3))
    savemat(exp / "nsd_expdesign.mat", {
        "masterordering": (masterordering + 1)[None].astype(np.float64),
        "subjectim": (subjectim + 1).astype(np.float64),
        "sharedix": (shared + 1)[None].astype(np.float64),
        "stimpattern": np.zeros((2, 2)),  # present in the real file, unused
    })

    # ---- stimulus info (first column: an unnamed pandas index, as in the real csv)
    coco_ids = rng.choice(np.arange(1, 600_000), size=n_images, replace=False)
    coco_split = np.where(rng.random(n_images) < 0.8, "train2017", "val2017")
    landscape = rng.random(n_images) < 0.7
    landscape[shared[0]] = True
    info = pd.DataFrame({
        "cocoId": coco_ids, "cocoSplit": coco_split,
        "cropBox": np.where(landscape, LANDSCAPE_CROP, PORTRAIT_CROP), "loss": np.zeros(n_images),
        "nsdId": np.arange(n_images), "flagged": False, "BOLD5000": False,
        "shared1000": np.isin(np.arange(n_images), shared),
    })
    info.to_csv(exp / "nsd_stim_info_merged.csv")

    # ---- images and COCO captions
    with h5py.File(stim / "nsd_stimuli.hdf5", "w") as f:
        f.create_dataset("imgBrick", data=rng.integers(0, 256, (n_images, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8))
    for split in ("train2017", "val2017"):
        ids = coco_ids[coco_split == split]
        anns = [{"image_id": int(c), "id": int(c) * 10 + k, "caption": f" image {int(c)} caption {k}. "}
                for c in ids for k in range(5 + int(c) % 2)]
        anns.append({"image_id": 999_999_999, "id": 1, "caption": "a COCO image not in NSD"})
        doc = {"info": {"description": "fake COCO 2017"}, "licenses": [],
               "images": [{"id": int(c), "file_name": f"{int(c):012d}.jpg"} for c in ids], "annotations": anns}
        (stim / "annotations" / f"captions_{split}.json").write_text(json.dumps(doc))
    if instances:
        _write_instances(stim / "annotations", coco_ids, coco_split, landscape, shared[0], planted, rng)

    # ---- per subject: ROI, brain mask, betas sessions
    for s in subjects:
        zyx = shapes.get(s, OTHER_SHAPE)
        xyz = zyx[::-1]
        affine = _affine(s, xyz)
        brain, roi = _brain_and_roi(xyz)
        func = root / "nsddata" / "ppdata" / f"subj{s:02d}" / "func1pt8mm"
        (func / "roi").mkdir(parents=True, exist_ok=True)
        labels = np.where(roi, 1, np.where(brain, 0, -1)).astype(np.int16)
        nib.save(nib.Nifti1Image(labels, affine), func / "roi" / "nsdgeneral.nii.gz")
        nib.save(nib.Nifti1Image(brain.astype(np.int16), affine), func / "brainmask.nii.gz")
        bdir = (root / "nsddata_betas" / "ppdata" / f"subj{s:02d}" / "func1pt8mm"
                / "betas_fithrf_GLMdenoise_RR")
        bdir.mkdir(parents=True, exist_ok=True)
        image_pattern = rng.normal(0, 1.0, (n_images, *xyz)).astype(np.float32)
        for k in range(n_sessions):
            trials = np.arange(k * trials_per_session, (k + 1) * trials_per_session)
            nsd = subjectim[s - 1, masterordering[trials]]
            psc = image_pattern[nsd] + rng.normal(0.3 * k, 2.0, (trials_per_session, *xyz))  # % signal change
            raw = np.clip(np.round(psc * 300), -32768, 32767).astype(np.int16) * brain
            with h5py.File(bdir / f"betas_session{k + 1:02d}.hdf5", "w") as f:
                f.create_dataset("betas", data=raw.astype(np.int16).transpose(0, 3, 2, 1), chunks=True)
    return root
