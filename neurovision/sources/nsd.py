"""Natural Scenes Dataset (NSD) -> neurovision store.

Reads the public NSD layout under ``root``::

    nsddata/experiments/nsd/nsd_expdesign.mat              masterordering, subjectim, sharedix (1-based)
    nsddata/experiments/nsd/nsd_stim_info_merged.csv       nsdId (0-based), cocoId, cocoSplit, shared1000
    nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5           imgBrick uint8 (73000, 425, 425, 3)
    nsddata_stimuli/stimuli/nsd/annotations/captions_{train,val}2017.json   COCO captions (optional)
    nsddata_stimuli/stimuli/nsd/annotations/instances_{train,val}2017.json  COCO objects (optional)
    nsddata/ppdata/subjXX/func1pt8mm/roi/nsdgeneral.nii.gz NIfTI X*Y*Z: -1 outside brain, 0 brain, 1 ROI
    nsddata/ppdata/subjXX/func1pt8mm/brainmask.nii.gz      optional
    nsddata_betas/ppdata/subjXX/func1pt8mm/betas_fithrf_GLMdenoise_RR/betas_sessionYY.hdf5
                                                           betas int16 (trials, Z, Y, X): % signal change * 300

Every subject's single-trial betas (divided by 300, optionally z-scored per voxel within each session, zeroed
outside the brain mask when one exists) are resized trilinearly onto subject ``grid_subject``'s grid (the
paper's choice: subj01, 81x104x83), padded to a multiple of ``patch_size`` and stored as the patches that
touch the union of the subjects' nsdgeneral ROIs. One session is in memory at a time.

Annotations: the COCO captions (the brief-caption references) and, when the COCO instances files are present,
every other instruction type's data derived from the object boxes seen through each image's ``cropBox``
(:mod:`neurovision.sources.coco`: ``boxes``, ``concepts``, ``qa``, ``dialogues``, templated ``descriptions``
and ``sd_prompts``; the concept vocabulary, ``extras/concept_names``, is COCO's 80 categories). Instruction
data in the LLaVA format (``instructions``) is merged in (:mod:`neurovision.sources.llava`).

Splits are per image, so all repeats of an image share one: shared1000 is ``test``; ``val`` is a held-out slice
of each subject's own training images (``val_fraction``, 3 % by default, drawn per subject with ``seed``, see
:func:`draw_val_images`), so the stage-1/2 checkpoints have a validation metric to monitor; the rest ``train``.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np

from neurovision.data.store import StoreError, StoreWriter, fingerprint
from neurovision.sources import log, up_to_date

CONVERTER_VERSION = "3"  # 2: per-subject val images; 3: instruction annotations from COCO instances
N_NSD_SUBJECTS = 8
#: sessions each NSD subject completed (Allen et al. 2022): subjects 1, 2, 5 and 7 all 40 of the design's, 3 and 6
#: 32, 4 and 8 30. The expected count of a subject is the smaller of this and the design's length in sessions
#: (``masterordering`` / trials per session), so a missing session file is an error, not fewer trials.
NSD_SESSIONS = {1: 40, 2: 40, 3: 32, 4: 30, 5: 40, 6: 32, 7: 40, 8: 30}
_TRIAL_BATCH = 32  # trials resampled at once
_STIM_BATCH = 64  # images copied at once
_ZSCORE_BLOCK = 1 << 24  # floats per z-scoring block (64 MB)
DEFAULT_VAL_FRACTION = 0.03
MIN_VAL_IMAGES = 2  # per subject: retrieval and two-way identification need >= 2 items


# --------------------------------------------------------------------------------------------- layout
def expdesign_path(root: Path) -> Path:
    return root / "nsddata" / "experiments" / "nsd" / "nsd_expdesign.mat"


def stim_info_path(root: Path) -> Path:
    return root / "nsddata" / "experiments" / "nsd" / "nsd_stim_info_merged.csv"


def stimuli_path(root: Path) -> Path:
    return root / "nsddata_stimuli" / "stimuli" / "nsd" / "nsd_stimuli.hdf5"


def captions_paths(root: Path) -> list[Path]:
    d = root / "nsddata_stimuli" / "stimuli" / "nsd" / "annotations"
    return [d / "captions_train2017.json", d / "captions_val2017.json"]


def instances_paths(root: Path) -> list[Path]:
    d = root / "nsddata_stimuli" / "stimuli" / "nsd" / "annotations"
    return [d / "instances_train2017.json", d / "instances_val2017.json"]


def nsdgeneral_path(root: Path, subject: int) -> Path:
    return root / "nsddata" / "ppdata" / f"subj{subject:02d}" / "func1pt8mm" / "roi" / "nsdgeneral.nii.gz"


def brainmask_path(root: Path, subject: int) -> Path:
    return root / "nsddata" / "ppdata" / f"subj{subject:02d}" / "func1pt8mm" / "brainmask.nii.gz"


def betas_dir(root: Path, subject: int) -> Path:
    return (root / "nsddata_betas" / "ppdata" / f"subj{subject:02d}" / "func1pt8mm"
            / "betas_fithrf_GLMdenoise_RR")


def betas_path(root: Path, subject: int, session: int) -> Path:
    return betas_dir(root, subject) / f"betas_session{session:02d}.hdf5"


def _need_file(path: Path, field: str, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: field '{field}': file not found ({what})")
    return path


def _session_files(root: Path, subject: int, sessions: int | None) -> list[Path]:
    """The betas files of sessions 1..N (N = ``sessions`` or all found), checked to be contiguous."""
    d = betas_dir(root, subject)
    found = sorted(d.glob("betas_session[0-9][0-9].hdf5")) if d.is_dir() else []
    n = len(found) if sessions is None else sessions
    if n == 0:
        raise FileNotFoundError(f"{betas_path(root, subject, 1)}: field 'betas': file not found "
                                f"(no betas_sessionYY.hdf5 for subject {subject} in {d})")
    paths = [betas_path(root, subject, s) for s in range(1, n + 1)]
    for p in paths:
        _need_file(p, "betas", f"subject {subject} has {len(found)} session file(s), {n} needed")
    return paths


# --------------------------------------------------------------------------------------------- readers
def _load_expdesign(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(masterordering 0-based columns, subjectim 0-based nsdIds (8, C), sharedix 0-based nsdIds)."""
    from scipy.io import loadmat

    _need_file(path, "<file>", "NSD experimental design")
    try:
        mat = loadmat(str(path))
    except Exception as e:  # scipy raises several exception types for foreign files
        raise StoreError(path, "<file>", f"not a readable MATLAB file: {e}") from e
    out = []
    for name in ("masterordering", "subjectim", "sharedix"):
        if name not in mat:
            raise StoreError(path, name, "missing")
        a = np.asarray(mat[name])
        if a.dtype.kind not in "iuf" or a.size == 0:
            raise StoreError(path, name, f"expected a numeric array, got {a.dtype} {a.shape}")
        out.append(a)
    order, subjectim, shared = out
    order = order.reshape(-1).astype(np.int64) - 1
    shared = shared.reshape(-1).astype(np.int64) - 1
    subjectim = subjectim.astype(np.int64) - 1
    if subjectim.ndim != 2:
        raise StoreError(path, "subjectim", f"expected (subjects, images), got shape {subjectim.shape}")
    if order.min() < 0 or order.max() >= subjectim.shape[1]:
        raise StoreError(path, "masterordering", f"values outside 1..{subjectim.shape[1]} (columns of subjectim)")
    if subjectim.min() < 0 or shared.min() < 0:
        raise StoreError(path, "subjectim", "1-based ids expected, found values < 1")
    return order, subjectim, shared


def _load_stim_info(path: Path) -> dict[int, tuple[int, str, str | None]]:
    """nsdId -> (cocoId, cocoSplit, cropBox text or None when the column is absent)."""
    import pandas as pd

    _need_file(path, "<file>", "NSD stimulus info")
    try:
        df = pd.read_csv(path)
    except Exception as e:  # pandas raises parser, decode and empty-data errors for a foreign file
        raise StoreError(path, "<file>", f"not a readable CSV file: {type(e).__name__}: {e}") from e
    for col in ("nsdId", "cocoId"):
        if col not in df.columns:
            raise StoreError(path, col, f"missing column (found {list(df.columns)[:12]})")
    split = df["cocoSplit"].astype(str) if "cocoSplit" in df.columns else pd.Series([""] * len(df))
    crop = df["cropBox"].astype(str) if "cropBox" in df.columns else pd.Series([None] * len(df))
    return {int(n): (int(c), s, b) for n, c, s, b in zip(df["nsdId"], df["cocoId"], split, crop, strict=True)}


def _load_captions(paths: Sequence[Path], coco_ids: Sequence[int]) -> list[list[str]]:
    """COCO captions per stimulus; empty lists (and a warning) when the annotation files are absent."""
    present = [p for p in paths if p.is_file()]
    if not present:
        warnings.warn(f"{paths[0].parent}: COCO caption files not found; captions will be empty",
                      UserWarning, stacklevel=3)
        return [[] for _ in coco_ids]
    wanted = set(int(c) for c in coco_ids)
    by_image: dict[int, list[str]] = {}
    for p in present:
        try:
            anns = json.loads(p.read_text(encoding="utf-8"))["annotations"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise StoreError(p, "annotations", f"not a COCO caption file: {e!r}") from e
        for a in anns:
            i = int(a["image_id"])
            if i in wanted:
                by_image.setdefault(i, []).append(str(a["caption"]).strip())
    missing = sum(1 for c in coco_ids if int(c) not in by_image)
    if missing:
        warnings.warn(f"{present[0].parent}: {missing} stimuli have no COCO caption", UserWarning, stacklevel=3)
    return [by_image.get(int(c), []) for c in coco_ids]


def _annotations(root: Path, info_path: Path, info: dict[int, tuple[int, str, str | None]], stim_ids: np.ndarray,
                 coco_ids: np.ndarray, captions: list[list[str]], seed: int, instructions: str | None,
                 skip_unmatched: bool) -> tuple[dict[str, list[Any]], list[str] | None]:
    """Every annotation kind per stimulus (captions, the COCO-derived kinds, the imported instruction data) and
    the concept vocabulary (COCO's categories; None without the instances files)."""
    from neurovision.data.instructions import NEEDS
    from neurovision.sources import coco, llava

    ann: dict[str, list[Any]] = {"captions": captions}
    vocabulary: list[str] | None = None
    inst_p = [p for p in instances_paths(root) if p.is_file()]
    if inst_p:
        if next(iter(info.values()))[2] is None:  # before parsing ~450 MB of JSON
            raise StoreError(info_path, "cropBox", "missing column (needed to map COCO boxes into the stimuli)")
        inst = coco.load_instances(inst_p, coco_ids.tolist())
        vocabulary = inst.categories
        missing = sum(1 for c in coco_ids if int(c) not in inst.images)
        if missing:
            warnings.warn(f"{inst_p[0].parent}: {missing} stimuli are not in the COCO instances files; they get no "
                          "objects", UserWarning, stacklevel=3)
        per = []
        for row, (nsd_id, c) in enumerate(zip(stim_ids.tolist(), coco_ids.tolist(), strict=True)):
            crop = coco.parse_crop_box(info[int(nsd_id)][2], info_path, int(nsd_id))
            per.append(coco.annotate(coco.objects_in_view(inst, int(c), crop), captions[row], vocabulary,
                                     np.random.default_rng((int(seed), int(nsd_id)))))
        ann.update({k: [a[k] for a in per] for k in coco.DERIVED_KINDS})
    if instructions is not None:
        row_of = {int(i): r for r, i in enumerate(stim_ids.tolist())}
        nsd_of_coco = {v[0]: k for k, v in info.items()}

        def resolve(field: str, ident: int) -> int | None:
            nsd_id = ident if field == "nsd_id" else nsd_of_coco.get(ident)
            if nsd_id is None:
                raise KeyError(f"COCO image {ident} is not one of NSD's images")
            if nsd_id not in info:
                raise KeyError(f"nsdId {nsd_id} is not an NSD image (see {info_path.name})")
            return row_of.get(nsd_id)  # None: an NSD image no converted subject saw

        imported = llava.read_instructions(instructions, resolve, skip_unmatched=skip_unmatched)
        log.info("nsd: %d instruction entries imported from %s (%s), %d skipped (images not in this store)",
                 imported.n_entries - imported.n_skipped, instructions, ", ".join(imported.kinds) or "nothing",
                 imported.n_skipped)
        ann = llava.merge(ann, imported, len(stim_ids))
    unavailable = [t for t, kinds in NEEDS.items() if any(k not in ann for k in kinds)]
    if unavailable:
        warnings.warn(f"{instances_paths(root)[0].parent}: COCO instances files (instances_train2017.json, "
                      f"instances_val2017.json) not found: instruction types {unavailable} are unavailable in this "
                      "store; train captions only with -c experiments/presets/stage2_instruct_captions_only.yaml",
                      UserWarning, stacklevel=3)
    return ann, vocabulary


def _load_nifti(path: Path, field: str) -> tuple[np.ndarray, np.ndarray]:
    """(voxels, affine) of a mask volume, refusing what would silently zero trials: a NaN/inf affine maps every
    voxel nowhere (the resampled trials are all zero), a NaN voxel is neither in nor out of the mask."""
    import nibabel as nib

    _need_file(path, field, "NIfTI volume")
    try:
        img = nib.load(str(path))
        if not isinstance(img, nib.spatialimages.SpatialImage):
            raise TypeError(f"a {type(img).__name__}, not a volume")
        data = np.asarray(img.dataobj)
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as e:  # nibabel, gzip and zlib raise several types for a foreign or truncated file
        raise StoreError(path, field, f"not a readable NIfTI volume: {type(e).__name__}: {e}") from e
    if data.ndim != 3:
        raise StoreError(path, field, f"expected a 3-D volume, got shape {data.shape}")
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise StoreError(path, "affine", f"{int((~np.isfinite(affine)).sum())} NaN/inf values in the voxel-to-world "
                         f"affine ({field}): every voxel would map nowhere and the subject's trials be zero")
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        raise StoreError(path, field, f"{int((~np.isfinite(data)).sum())} NaN/inf voxels (a mask is finite)")
    return data, affine


def _betas_header(path: Path) -> tuple[int, tuple[int, int, int]]:
    """(trials, NIfTI-order shape) of a betas file, validating dataset, dtype and rank."""
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise StoreError(path, "<file>", f"not a readable HDF5 file: {e}") from e
    with f:
        if "betas" not in f:
            raise StoreError(path, "betas", f"missing dataset (found {list(f.keys())})")
        ds = f["betas"]
        if ds.dtype != np.int16 or ds.ndim != 4:
            raise StoreError(path, "betas", f"dtype {ds.dtype} shape {ds.shape}, expected int16 (trials, Z, Y, X)")
        t, z, y, x = (int(s) for s in ds.shape)
    return t, (x, y, z)


def _read_betas(path: Path) -> np.ndarray:
    """(trials, X, Y, Z) float32 percent signal change."""
    try:
        with h5py.File(path, "r") as f:
            raw = f["betas"][()]
    except (OSError, KeyError) as e:  # a truncated or corrupt file whose header read fine
        raise StoreError(path, "betas", f"not readable: {e}") from e
    out = np.ascontiguousarray(raw.transpose(0, 3, 2, 1), dtype=np.float32)
    del raw
    out /= 300.0
    return out


def _zscore_inplace(vols: np.ndarray) -> None:
    """Per-voxel z-score over the trials of one session, in voxel blocks to bound memory."""
    from neurovision.data.preprocessing import zscore_by_session

    t = vols.shape[0]
    flat = vols.reshape(t, -1)
    labels = np.zeros(t, dtype=np.int64)
    step = max(1, _ZSCORE_BLOCK // max(t, 1))
    for j in range(0, flat.shape[1], step):
        flat[:, j:j + step] = zscore_by_session(flat[:, j:j + step], labels).numpy()


# --------------------------------------------------------------------------------------------- trial table
def _repeats(ids: np.ndarray) -> np.ndarray:
    """0-based count of earlier occurrences of each id."""
    seen: dict[int, int] = {}
    out = np.empty(len(ids), dtype=np.int64)
    for i, v in enumerate(ids.tolist()):
        out[i] = seen.get(v, 0)
        seen[v] = out[i] + 1
    return out


def draw_val_images(shown: dict[int, np.ndarray], test: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """The validation images: per subject, ``round(val_fraction * n)`` of its ``n`` non-test images (at least
    :data:`MIN_VAL_IMAGES`, never all of them; none when ``val_fraction`` is 0), drawn by a generator seeded with
    ``(seed, subject)``, so a subject's draw does not depend on which other subjects are converted.

    Args:
        shown: NSD subject (1-based) -> store rows (indices into the stimulus table) of its trials.
        test: bool per store row, True for the test images (shared1000), which are never drawn.
    Returns:
        bool per store row, True for the validation images.
    """
    val = np.zeros(len(test), dtype=bool)
    if val_fraction <= 0:
        return val
    for s, rows in shown.items():
        own = np.unique(rows)
        own = own[~test[own]]
        n = min(len(own) - 1, max(MIN_VAL_IMAGES, int(round(val_fraction * len(own)))))
        if n > 0:
            val[np.random.default_rng((int(seed), int(s))).choice(own, n, replace=False)] = True
    return val


def _image_batches(brick: h5py.Dataset, ids: np.ndarray, image_size: int | None) -> Iterator[np.ndarray]:
    from PIL import Image

    for b in range(0, len(ids), _STIM_BATCH):
        imgs = brick[ids[b:b + _STIM_BATCH]]  # h5py fancy indexing: increasing ids
        if image_size is not None:
            imgs = np.stack([np.asarray(Image.fromarray(im).resize((image_size, image_size), Image.Resampling.BICUBIC))
                             for im in imgs])
        yield imgs


def _check_stimuli(path: Path, ids: np.ndarray) -> None:
    """Open the image file and check ``imgBrick`` before any session is converted (it is copied last)."""
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise StoreError(path, "<file>", f"not a readable HDF5 file: {e}") from e
    with f:
        if "imgBrick" not in f:
            raise StoreError(path, "imgBrick", f"missing dataset (found {list(f.keys())})")
        brick = f["imgBrick"]
        if brick.dtype != np.uint8 or brick.ndim != 4 or brick.shape[-1] != 3:
            raise StoreError(path, "imgBrick", f"dtype {brick.dtype} shape {brick.shape}, expected uint8 (N, H, W, 3)")
        if len(ids) and int(ids.max()) >= brick.shape[0]:
            raise StoreError(path, "imgBrick", f"{brick.shape[0]} images, but nsdId {int(ids.max())} is used")
        if len(ids):  # the first and last used images: a truncated file fails here, not after every session
            try:
                _ = brick[int(ids[0])], brick[int(ids[-1])]
            except OSError as e:
                raise StoreError(path, "imgBrick", f"not readable: {e}") from e


def _write_stimuli(writer: StoreWriter, path: Path, ids: np.ndarray, image_size: int | None) -> None:
    """Stream the used images into /stimuli (StoreWriter.set_stimuli needs them all in memory: 73k*0.5 MB)."""
    if np.any(np.diff(ids) <= 0):
        raise ValueError("stimulus ids must be strictly increasing")  # checked by _check_stimuli in prepare
    with h5py.File(path, "r") as f:
        brick = f["imgBrick"]
        hw = brick.shape[1:3] if image_size is None else (image_size, image_size)
        ds = writer.create_stimuli(len(ids), (*hw, 3), ids)
        start = 0
        try:
            for batch in _image_batches(brick, ids, image_size):
                ds[start:start + len(batch)] = batch
                start += len(batch)
        except OSError as e:
            if e.errno in (28, 122):  # ENOSPC, EDQUOT: the store's disk, not the image file
                raise
            raise StoreError(path, "imgBrick", f"not readable near nsdId {int(ids[start])}: {e}") from e


# --------------------------------------------------------------------------------------------- prepare
def prepare(
    root: Path,
    out: Path,
    subjects: list[int] = [1, 2, 5, 7],  # noqa: B006 - never mutated; a list for the CLI
    sessions: int | None = None,
    patch_size: int = 14,
    grid_subject: int = 1,
    zscore: bool = True,
    image_size: int | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = 0,
    instructions: str | None = None,
    instructions_unmatched: Literal["error", "skip"] = "error",
    force: bool = False,
) -> Path:
    """Convert the Natural Scenes Dataset at ``root`` into a neurovision store at ``out``.

    Args:
        root: NSD root folder (holding ``nsddata``, ``nsddata_betas`` and ``nsddata_stimuli``).
        out: the store file to write.
        subjects: NSD subjects (1..8) to include; the paper uses 1, 2, 5 and 7 (those who did all 40 sessions).
        sessions: use the first N sessions of each subject; None uses every session file found.
        patch_size: edge of the cubic patches the grid is cut into.
        grid_subject: the subject whose voxel grid is the common grid (the paper: subj01).
        zscore: z-score each voxel within each session (NSD practice) before resampling.
        image_size: resize stimuli to this square size (PIL bicubic); None keeps 425x425.
        val_fraction: the validation split (``--val_fraction``): this fraction of each subject's training images
            (never shared1000), with all their repeats, drawn per subject (at least 2 images each; 0 = no val split,
            and checkpoints monitoring a val metric find none).
        seed: seed of the val-image draw (same seed, same split) and of the derived QA/dialogue picks.
        instructions: a LLaVA-format JSON file of instruction data to import (see :mod:`neurovision.sources.llava`):
            entries naming images by ``nsd_id``, ``coco_id``, ``image`` or ``id``.
        instructions_unmatched: ``error``: an entry naming an image NSD does not have is an error; ``skip``: such
            entries are skipped and counted (to import a superset such as LLaVA-Instruct-150K). Entries naming
            NSD images no converted subject saw are always skipped.
        force: rebuild even when an up-to-date store exists at ``out``.
    """
    from tqdm.auto import tqdm

    from neurovision.data.preprocessing import GridSpec, resize_grid_affine

    root, out = Path(root), Path(out)
    subjects = [int(s) for s in subjects]
    if not subjects or len(set(subjects)) != len(subjects):
        raise ValueError(f"subjects must be distinct NSD subjects, got {subjects}")
    for s in [*subjects, grid_subject]:
        if not 1 <= s <= N_NSD_SUBJECTS:
            raise ValueError(f"NSD subjects are 1..{N_NSD_SUBJECTS}, got {s}")
    if sessions is not None and sessions < 1:
        raise ValueError(f"sessions must be >= 1 or None, got {sessions}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if image_size is not None and image_size < 1:
        raise ValueError(f"image_size must be >= 1 or None, got {image_size}")
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: field 'root': NSD root folder not found")

    # ---- inputs and fingerprint
    design_p, info_p, stim_p = expdesign_path(root), stim_info_path(root), stimuli_path(root)
    for p, what in ((design_p, "NSD experimental design"), (info_p, "NSD stimulus info"),
                    (stim_p, "NSD stimulus images")):
        _need_file(p, "<file>", what)
    roi_p = {s: _need_file(nsdgeneral_path(root, s), "nsdgeneral", f"ROI of subject {s}")
             for s in dict.fromkeys([*subjects, grid_subject])}
    mask_p = {s: brainmask_path(root, s) for s in subjects if brainmask_path(root, s).is_file()}
    sess_p = {s: _session_files(root, s, sessions) for s in subjects}
    cap_p = [p for p in captions_paths(root) if p.is_file()]
    inst_p = [p for p in instances_paths(root) if p.is_file()]
    if instructions is not None:
        _need_file(Path(instructions), "instructions", "LLaVA-format instruction data")
    if instructions_unmatched not in ("error", "skip"):
        raise ValueError(f"instructions_unmatched must be 'error' or 'skip', got {instructions_unmatched!r}")
    options: dict[str, Any] = {
        "root": str(root.resolve()), "subjects": subjects, "sessions": sessions, "patch_size": patch_size,
        "grid_subject": grid_subject, "zscore": zscore, "image_size": image_size,
        "val_fraction": val_fraction, "seed": seed, "instructions": instructions,
        "instructions_unmatched": instructions_unmatched,
    }
    files = [design_p, info_p, stim_p, *roi_p.values(), *mask_p.values(), *cap_p, *inst_p,
             *([Path(instructions)] if instructions is not None else []),
             *(p for ps in sess_p.values() for p in ps)]
    fp = fingerprint({"converter_version": CONVERTER_VERSION, **options}, files)
    if up_to_date(out, fp, force):
        return out

    # ---- experimental design and betas headers
    order, subjectim, shared = _load_expdesign(design_p)
    if subjectim.shape[0] < max(subjects):
        raise StoreError(design_p, "subjectim", f"{subjectim.shape[0]} rows, subject {max(subjects)} requested")
    rois: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for s, p in roi_p.items():
        data, affine = _load_nifti(p, "nsdgeneral")
        rois[s] = (data > 0, affine)
    brains: dict[int, np.ndarray] = {}
    for s, p in mask_p.items():
        bm, _ = _load_nifti(p, "brainmask")
        if bm.shape != rois[s][0].shape:
            raise StoreError(p, "brainmask", f"shape {bm.shape} != nsdgeneral {rois[s][0].shape}")
        brains[s] = bm > 0
    first = sess_p[subjects[0]][0]
    n_per_session = _betas_header(first)[0]  # 750 in NSD; read from the data, checked against the design
    for s in subjects:
        shape = rois[s][0].shape
        for p in sess_p[s]:
            t, bshape = _betas_header(p)
            if bshape != shape:
                raise StoreError(p, "betas", f"volume shape {bshape} (X, Y, Z) differs from the subject's "
                                 f"nsdgeneral {shape} ({roi_p[s]})")
            if t != n_per_session or t == 0:
                raise StoreError(p, "betas", f"{t} trials, expected {n_per_session} like {first}")
        if len(sess_p[s]) * n_per_session > len(order):
            raise StoreError(design_p, "masterordering", f"{len(order)} trials, but subject {s} has "
                             f"{len(sess_p[s])} sessions of {n_per_session} trials")
        expected = min(len(order) // n_per_session, NSD_SESSIONS[s])
        if sessions is None and len(sess_p[s]) < expected:
            raise FileNotFoundError(
                f"{betas_path(root, s, len(sess_p[s]) + 1)}: field 'betas': file not found (subject {s} did "
                f"{expected} sessions of {n_per_session} trials by {design_p.name}, {len(sess_p[s])} found; "
                f"convert fewer with --sessions {len(sess_p[s])})")

    # ---- trial table and stimuli
    nsd_ids: dict[int, np.ndarray] = {}
    repeats: dict[int, np.ndarray] = {}
    sess_of: dict[int, np.ndarray] = {}
    for s in subjects:
        n = len(sess_p[s]) * n_per_session
        nsd_ids[s] = subjectim[s - 1, order[:n]]
        repeats[s] = _repeats(nsd_ids[s])
        sess_of[s] = np.arange(n) // n_per_session + 1
    stim_ids = np.unique(np.concatenate(list(nsd_ids.values())))
    is_test = np.isin(stim_ids, shared)
    is_val = draw_val_images({s: np.searchsorted(stim_ids, v) for s, v in nsd_ids.items()}, is_test,
                             val_fraction, seed)
    stim_split = np.where(is_test, 2, np.where(is_val, 1, 0)).astype(np.uint8)
    info = _load_stim_info(info_p)
    missing = [int(i) for i in stim_ids if int(i) not in info]
    if missing:
        raise StoreError(info_p, "nsdId", f"{len(missing)} used images missing, e.g. nsdId {missing[0]}")
    coco_ids = np.array([info[int(i)][0] for i in stim_ids], dtype=np.int64)
    _check_stimuli(stim_p, stim_ids)
    captions = _load_captions(captions_paths(root), coco_ids.tolist())
    annotations, vocabulary = _annotations(root, info_p, info, stim_ids, coco_ids, captions, seed, instructions,
                                           instructions_unmatched == "skip")

    # ---- common grid and active patches
    grid_shape = rois[grid_subject][0].shape
    spec = GridSpec(grid_shape, patch_size)
    grid_aff = {s: resize_grid_affine(rois[s][1], rois[s][0].shape, grid_shape) for s in subjects}
    union = spec.set_active_from_masks([spec.mask_to_grid(rois[s][0], rois[s][1], grid_aff[s]) for s in subjects])
    assert spec.active_index is not None
    log.info("nsd: grid %s, %d active patches of %d^3, %d stimuli (train %d, val %d, test %d), %d subjects",
             grid_shape, len(spec.active_index), patch_size, len(stim_ids), int((stim_split == 0).sum()),
             int((stim_split == 1).sum()), int((stim_split == 2).sum()), len(subjects))

    with StoreWriter(out, source="nsd", converter_version=CONVERTER_VERSION, options=options,
                     fingerprint=fp) as w:
        w.set_grid(grid_shape, patch_size, spec.active_index, union)
        for s in subjects:
            w.add_subject(f"subj{s:02d}", affine=rois[s][1], grid_affine=grid_aff[s],
                          original_shape=rois[s][0].shape, roi=rois[s][0])
        bar = tqdm(total=sum(len(v) for v in sess_p.values()), desc="nsd sessions", unit="session")
        for si, s in enumerate(subjects):
            brain = brains.get(s)
            stim_row = np.searchsorted(stim_ids, nsd_ids[s])
            for k, p in enumerate(sess_p[s]):
                vols = _read_betas(p)
                if zscore:
                    _zscore_inplace(vols)
                if brain is not None:
                    vols *= brain
                lo = k * n_per_session
                for b in range(0, n_per_session, _TRIAL_BATCH):
                    e = min(b + _TRIAL_BATCH, n_per_session)
                    patches = spec.forward(vols[b:e], rois[s][1], grid_aff[s]).numpy()
                    rows = stim_row[lo + b:lo + e]
                    try:  # the writer checks the values (finite after the float16 cast); name the file and trials
                        w.append_trials(subject=si, stimulus=rows, repeat=repeats[s][lo + b:lo + e],
                                        session=sess_of[s][lo + b:lo + e], split=stim_split[rows], patches=patches)
                    except ValueError as err:
                        raise StoreError(p, "betas", f"trials {b}..{e - 1} after scaling"
                                         f"{' and z-scoring' if zscore else ''} and resampling: {err}") from err
                del vols
                bar.update(1)
        bar.close()
        _write_stimuli(w, stim_p, stim_ids, image_size)
        for kind, values in annotations.items():
            w.set_annotations(kind, values)
        if vocabulary is not None:
            w.set_extra("concept_names", np.array(vocabulary, dtype=object).astype("S"))
        w.set_extra("coco_ids", coco_ids)
        w.set_extra("shared1000", np.isin(stim_ids, shared).astype(np.uint8))
    return out
