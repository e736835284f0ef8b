"""The phantom source: a seeded, procedural fMRI experiment with planted ground truth.

Scenes (:mod:`neurovision.sources.scenes`) are shown to K subjects, 3 repeats each; every subject sees its own
training images and one shared test set of distinct scenes (like NSD's shared1000). Each subject's brain is
nilearn's bundled MNI152 brain mask, warped by a subject-specific affine (scale, small rotation, shift) and
sampled on the subject's own voxel grid (its field of view = its brain's bounding box), with an
occipito-temporal ROI.

A trial's response, in the subject's space, is

    gain_s * (sum_c presence_c * M_c + lambda * sum_k contrast_k * G_k) + subject pattern + session drift
        + trial noise,

where M_c are planted concept maps (smooth blobs inside the ROI, one per concept word), G_k a low-level
retinotopic term (6x6 receptive fields of image contrast, laid out in occipital cortex), and the trial-noise
level follows the requested SNR (variance of the signal / variance of the noise, in the ROI). The planted
maps are stored (``extras/concept_maps_<subject>``) and exported as NIfTI for scoring concept localisation.
The volumes then go through exactly the pipeline real data goes through: per-session z-scoring, trilinear
resize onto the common grid, patches, active patches.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from neurovision.data.preprocessing import GridSpec, resample, resize_grid_affine, to_nifti, zscore_by_session
from neurovision.data.store import SPLITS, Store, StoreWriter, fingerprint
from neurovision.sources import scenes, up_to_date

CONVERTER_VERSION = "phantom-3"  # 2: the shared test scenes are distinct; 3: boxes carry a label
_RF = 6  # receptive fields per image axis for the retinotopic term


@dataclass(frozen=True)
class PhantomConfig:
    n_subjects: int = 4
    n_train: int = 24  # training images per subject (each subject its own)
    n_val: int = 4  # validation images per subject
    n_test: int = 12  # shared test images (seen by every subject)
    repeats: int = 3
    image_size: int = 32
    voxel_mm: float = 8.0  # subject voxel size (jittered +-4 % per subject)
    grid: tuple[int, int, int] = (20, 24, 20)
    patch_size: int = 4
    trials_per_session: int = 60
    snr: float = 1.0
    blob_mm: float = 14.0  # width (sigma) of the planted concept blobs
    retinotopic: float = 0.5  # weight of the low-level term relative to the concept maps
    max_objects: int = 2
    zscore: bool = True


PRESETS: dict[str, PhantomConfig] = {
    "tiny": PhantomConfig(),
    "demo": PhantomConfig(
        n_train=600, n_val=40, n_test=300, image_size=64, voxel_mm=4.0, grid=(36, 44, 36), patch_size=6,
        trials_per_session=300, snr=3.0, blob_mm=10.0,
    ),
    "nsd": PhantomConfig(
        n_train=1500, n_val=50, n_test=1000, image_size=128, voxel_mm=1.8, grid=(83, 104, 81), patch_size=14,
        trials_per_session=750, snr=0.5, blob_mm=8.0,
    ),
}


# --------------------------------------------------------------------------------------------- anatomy
def _mni_mask() -> tuple[np.ndarray, np.ndarray]:
    from nilearn.datasets import load_mni152_brain_mask

    img = load_mni152_brain_mask(resolution=2)
    return np.asarray(img.get_fdata() > 0, dtype=np.float32), np.asarray(img.affine, dtype=np.float64)


def _warp(rng: np.random.Generator) -> np.ndarray:
    """Subject-specific world->world affine (MNI -> the subject's own head)."""
    sx, sy, sz = rng.uniform(0.93, 1.07, 3)
    a = np.deg2rad(rng.uniform(-3, 3))
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    w = np.eye(4)
    w[:3, :3] = rot @ np.diag([sx, sy, sz])
    w[:3, 3] = rng.uniform(-5, 5, 3)
    return w


def _world(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def _roi_mni(xyz: np.ndarray) -> np.ndarray:
    """Occipito-temporal ROI in MNI mm: posterior cortex plus ventral temporal cortex."""
    x, y, z = xyz.T
    occipital = (y < -55) & (z > -25) & (z < 40)
    ventral = (y < -20) & (y >= -55) & (z < 5) & (z > -35) & (np.abs(x) > 20)
    return occipital | ventral


def _blobs(xyz: np.ndarray, centres: np.ndarray, weights: np.ndarray, sigma: float) -> np.ndarray:
    d2 = ((xyz[:, None, :] - centres[None]) ** 2).sum(-1)
    return (np.exp(-d2 / (2 * sigma**2)) * weights[None]).sum(1).astype(np.float32)


@dataclass
class _Brain:
    name: str
    affine: np.ndarray
    shape: tuple[int, int, int]
    mask: np.ndarray  # bool, subject space
    roi: np.ndarray  # bool, subject space
    mni_xyz: np.ndarray  # (n_brain, 3) MNI position of each brain voxel
    gain: float


def _make_brain(name: str, cfg: PhantomConfig, rng: np.random.Generator, mni: tuple[np.ndarray, np.ndarray]) -> _Brain:
    mask_mni, aff_mni = mni
    warp = _warp(rng)
    vox = cfg.voxel_mm * rng.uniform(0.96, 1.04)
    inside = _world(aff_mni, mask_mni.shape)[mask_mni.reshape(-1) > 0] @ warp[:3, :3].T + warp[:3, 3]
    lo, hi = inside.min(0) - vox, inside.max(0) + vox
    shape = tuple(int(np.ceil((h - lo_) / vox)) + 1 for lo_, h in zip(lo, hi, strict=True))
    affine = np.diag([vox, vox, vox, 1.0])
    affine[:3, 3] = lo
    mask = resample(mask_mni, warp @ aff_mni, affine, shape, mode="nearest").numpy() > 0.5
    xyz = _world(affine, shape)[mask.reshape(-1)]
    mni_xyz = (xyz - warp[:3, 3]) @ np.linalg.inv(warp[:3, :3]).T
    roi = np.zeros(shape, bool)
    roi[mask] = _roi_mni(mni_xyz)
    return _Brain(name, affine, shape, mask, roi, mni_xyz, float(rng.uniform(0.8, 1.2)))  # type: ignore[arg-type]


def _planted_maps(cfg: PhantomConfig, rng: np.random.Generator, roi_points: np.ndarray) -> dict[str, np.ndarray]:
    """Blob centres/weights (MNI) for each concept and each retinotopic receptive field."""
    n_c = len(scenes.CONCEPTS)
    centres = roi_points[rng.choice(len(roi_points), size=(n_c, 3))]
    weights = rng.choice([-1.0, 1.0], size=(n_c, 3)) * rng.uniform(0.7, 1.3, size=(n_c, 3))
    u, v = np.meshgrid((np.arange(_RF) + 0.5) / _RF, (np.arange(_RF) + 0.5) / _RF, indexing="xy")
    # retinotopy: left visual field -> right hemisphere, upper field -> lower bank; eccentricity -> anterior
    ecc = np.hypot(u - 0.5, v - 0.5).reshape(-1)
    rf_centres = np.stack([(0.5 - u.reshape(-1)) * 70, -100 + 40 * ecc, (0.5 - v.reshape(-1)) * 40 + 5], 1)
    return {"centres": centres, "weights": weights, "rf_centres": rf_centres}


def _concept_maps(brain: _Brain, maps: dict[str, np.ndarray], cfg: PhantomConfig, rng: np.random.Generator):
    """(C, n_brain) concept maps and (K, n_brain) receptive fields for one subject (ROI-restricted)."""
    roi_in_brain = brain.roi[brain.mask].astype(np.float32)
    mc = np.stack([_blobs(brain.mni_xyz, c, w, cfg.blob_mm) for c, w in
                   zip(maps["centres"], maps["weights"], strict=True)]) * roi_in_brain
    # a little subject-specific deviation, so subjects are similar but not identical
    jitter = maps["centres"] + rng.normal(0, cfg.blob_mm / 3, maps["centres"].shape)
    mc_s = np.stack([_blobs(brain.mni_xyz, c, w, cfg.blob_mm) for c, w in
                     zip(jitter, maps["weights"], strict=True)]) * roi_in_brain
    rf_sigma = max(cfg.blob_mm * 0.8, 1.2 * cfg.voxel_mm)
    g = np.stack([_blobs(brain.mni_xyz, c[None], np.ones(1), rf_sigma) for c in maps["rf_centres"]])
    return mc, mc_s.astype(np.float32), g.astype(np.float32)


def _contrast(img: np.ndarray) -> np.ndarray:
    """(K,) mean absolute difference from the background in each receptive field."""
    d = np.abs(img.astype(np.float32) - np.asarray(scenes.BACKGROUND, np.float32)).mean(-1) / 128
    h = img.shape[0] // _RF * _RF
    d = d[:h, :h].reshape(_RF, h // _RF, _RF, h // _RF).mean((1, 3))
    return d.reshape(-1)


# --------------------------------------------------------------------------------------------- design
def _design(cfg: PhantomConfig, rng: np.random.Generator):
    """Stimulus list and, per subject, its trial list (stimulus, repeat, split) in presentation order."""
    n_own = cfg.n_train + cfg.n_val
    n_stim = cfg.n_test + cfg.n_subjects * n_own
    stim_split = np.zeros(n_stim, np.uint8)
    stim_split[: cfg.n_test] = SPLITS.index("test")
    trials = []
    for s in range(cfg.n_subjects):
        own = cfg.n_test + s * n_own + np.arange(n_own)
        stim_split[own[cfg.n_train:]] = SPLITS.index("val")
        seen = np.concatenate([own, np.arange(cfg.n_test)])
        # repeats spread over the experiment: every image once per block, in a new random order
        order = np.concatenate([rng.permutation(seen) for _ in range(cfg.repeats)])
        reps = np.repeat(np.arange(cfg.repeats), len(seen))
        trials.append((order, reps))
    return n_stim, stim_split, trials


def _anatomy(cfg: PhantomConfig, rng: np.random.Generator, mni: tuple[np.ndarray, np.ndarray]):
    """Subjects' brains, their grid affines, the common GridSpec with its active patches, and the union mask."""
    brains = [_make_brain(f"sub-{i + 1:02d}", cfg, rng, mni) for i in range(cfg.n_subjects)]
    spec = GridSpec(cfg.grid, cfg.patch_size)
    grid_affines = [resize_grid_affine(b.affine, b.shape, cfg.grid) for b in brains]
    union = spec.set_active_from_masks(
        [spec.mask_to_grid(b.roi, b.affine, ga) for b, ga in zip(brains, grid_affines, strict=True)])
    return brains, grid_affines, spec, union


def geometry(preset: Literal["tiny", "demo", "nsd"] = "nsd", seed: int = 0, n_subjects: int | None = None) -> GridSpec:
    """The common grid and active patches ``prepare`` would produce for these options, without any trials
    (for benchmarks and model sizing)."""
    cfg = PRESETS[preset]
    cfg = dataclasses.replace(cfg, n_subjects=n_subjects or cfg.n_subjects)
    rng_anat = np.random.default_rng(np.random.SeedSequence(seed).spawn(2)[1])  # the stream prepare uses
    return _anatomy(cfg, rng_anat, _mni_mask())[2]


# --------------------------------------------------------------------------------------------- prepare
def prepare(
    out: Path,
    preset: Literal["tiny", "demo", "nsd"] = "tiny",
    seed: int = 0,
    n_subjects: int | None = None,
    n_train: int | None = None,
    n_test: int | None = None,
    snr: float | None = None,
    patch_size: int | None = None,
    force: bool = False,
) -> Path:
    """Generate the phantom experiment into a store.

    Args:
        out: the store file to write (``.h5``); planted maps also go to ``<out stem>_truth/`` as NIfTI.
        preset: size preset: ``tiny`` (seconds, tests), ``demo`` (a few minutes of CPU training), ``nsd``
            (NSD-like geometry: 83x104x81 grid, patch 14, thousands of images).
        seed: everything (scenes, brains, maps, noise) follows from it.
        n_subjects: override the preset's number of subjects.
        n_train: override the preset's training images per subject.
        n_test: override the preset's number of shared test images.
        snr: override the preset's signal-to-noise ratio (signal variance / noise variance in the ROI).
        patch_size: override the preset's patch size.
        force: rebuild even when an up-to-date store exists.
    """
    out = Path(out)
    cfg = PRESETS[preset]
    overrides = {"n_subjects": n_subjects, "n_train": n_train, "n_test": n_test, "snr": snr,
                 "patch_size": patch_size}
    given: dict[str, Any] = {k: v for k, v in overrides.items() if v is not None}
    cfg = dataclasses.replace(cfg, **given)
    if cfg.n_subjects < 1 or cfg.n_test < 1 or cfg.n_train < 1 or cfg.snr <= 0:
        raise ValueError(f"phantom: n_subjects, n_train, n_test and snr must be positive, got {cfg}")
    options = {"preset": preset, "seed": seed, **dataclasses.asdict(cfg)}
    fp = fingerprint({"converter": CONVERTER_VERSION, **options})
    if up_to_date(out, fp, force):
        return out

    root = np.random.SeedSequence(seed)
    rng_design, rng_anat, rng_maps, *rng_subj = (np.random.default_rng(s) for s in root.spawn(3 + cfg.n_subjects))
    n_stim, stim_split, trial_lists = _design(cfg, rng_design)
    scene_list = scenes.sample_distinct(rng_design, cfg.n_test, cfg.max_objects)  # test stimuli come first
    scene_list += [scenes.sample_scene(rng_design, cfg.max_objects) for _ in range(n_stim - cfg.n_test)]
    images = np.stack([scenes.render(sc, cfg.image_size) for sc in scene_list])
    presence = np.stack([scenes.presence(sc) for sc in scene_list])
    contrast = np.stack([_contrast(im) for im in images])

    mni = _mni_mask()
    brains, grid_affines, spec, union = _anatomy(cfg, rng_anat, mni)
    mni_xyz = _world(mni[1], mni[0].shape)[mni[0].reshape(-1) > 0]
    maps = _planted_maps(cfg, rng_maps, mni_xyz[_roi_mni(mni_xyz)])

    with StoreWriter(out, source="phantom", converter_version=CONVERTER_VERSION, options=options,
                     fingerprint=fp) as w:
        w.set_grid(cfg.grid, cfg.patch_size, spec.active_index, union)
        w.set_stimuli(images)
        w.set_annotations("scenes", [sc.to_json() for sc in scene_list])
        w.set_annotations("captions", [scenes.captions(sc) for sc in scene_list])
        w.set_annotations("descriptions", [scenes.description(sc) for sc in scene_list])
        w.set_annotations("qa", [scenes.qa(sc) for sc in scene_list])
        w.set_annotations("dialogues", [scenes.dialogue(sc, rng_design) for sc in scene_list])
        w.set_annotations("sd_prompts", [scenes.sd_prompt(sc) for sc in scene_list])
        w.set_annotations("concepts", [scenes.concepts(sc) for sc in scene_list])
        w.set_annotations("boxes", [scenes.boxes(sc) for sc in scene_list])
        w.set_extra("concept_names", np.array(scenes.CONCEPTS, dtype=object).astype("S"))
        total = sum(len(o) for o, _ in trial_lists)
        bar = tqdm(total=total, desc=f"phantom[{preset}] trials", unit="trial")
        for si, (brain, ga, (order, reps)) in enumerate(zip(brains, grid_affines, trial_lists, strict=True)):
            idx = w.add_subject(brain.name, affine=brain.affine, grid_affine=ga, original_shape=brain.shape,
                                roi=brain.roi)
            rng = rng_subj[si]
            mc, mc_s, g = _concept_maps(brain, maps, cfg, rng)
            truth = np.zeros((len(scenes.CONCEPTS), *brain.shape), np.float32)
            truth[:, brain.mask] = mc
            w.set_extra(f"concept_maps_{brain.name}", truth, concepts=json.dumps(scenes.CONCEPTS))
            def signal_of(st: np.ndarray, b: _Brain = brain, m: np.ndarray = mc_s, g: np.ndarray = g) -> np.ndarray:
                return b.gain * (presence[st] @ m + cfg.retinotopic * contrast[st] @ g)

            ref = signal_of(np.arange(cfg.n_test))[:, brain.roi[brain.mask]]
            noise_sd = float(np.sqrt(ref.var(0).mean() / cfg.snr))
            n_brain = int(brain.mask.sum())
            pattern = rng.normal(0, noise_sd * 0.5, n_brain).astype(np.float32)  # subject-specific offset
            n_sessions = int(np.ceil(len(order) / cfg.trials_per_session))
            for sess in range(n_sessions):
                sl = slice(sess * cfg.trials_per_session, (sess + 1) * cfg.trials_per_session)
                st = order[sl]
                drift = rng.normal(0, noise_sd, n_brain).astype(np.float32)
                x = signal_of(st) + pattern + drift + rng.normal(0, noise_sd, (len(st), n_brain)).astype(np.float32)
                xt = zscore_by_session(x, np.zeros(len(st))) if cfg.zscore else torch.as_tensor(x)
                for b0 in range(0, len(st), 64):
                    b1 = min(b0 + 64, len(st))
                    vol = torch.zeros((b1 - b0, *brain.shape))
                    vol[:, torch.as_tensor(brain.mask)] = xt[b0:b1]
                    w.append_trials(
                        subject=idx, stimulus=st[b0:b1], repeat=reps[sl][b0:b1],
                        session=np.full(b1 - b0, sess + 1), split=stim_split[st[b0:b1]],
                        patches=spec.forward(vol, brain.affine, ga).numpy(),
                    )
                    bar.update(b1 - b0)
        bar.close()
    export_truth(out)
    return out


def export_truth(store_path: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write the planted concept maps of a phantom store as NIfTI: ``<dir>/<subject>/concept-<word>.nii.gz``."""
    import nibabel as nib

    store = Store(store_path)
    out_dir = Path(out_dir) if out_dir else Path(store_path).with_name(Path(store_path).stem + "_truth")
    names = [n.decode() for n in store.extra("concept_names")]
    for s in store.subjects:
        d = out_dir / s.name
        d.mkdir(parents=True, exist_ok=True)
        maps = store.extra(f"concept_maps_{s.name}")
        for word, m in zip(names, maps, strict=True):
            final = d / f"concept-{word}.nii.gz"
            tmp = d / f".concept-{word}.tmp.nii.gz"
            nib.save(to_nifti(m, s.affine), tmp)
            tmp.replace(final)
        nib.save(nib.Nifti1Image(store.roi(s.name).astype(np.uint8), s.affine), d / "roi.nii.gz")
    store.close()
    return out_dir
