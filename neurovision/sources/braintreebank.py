"""Brain Treebank (Wang et al., 2024) -> neurovision events store (the encoding stage's input).

Reads the public Brain Treebank layout under ``root``::

    sub_{s}_trial{t:03}.h5                                  data/electrode_{i}: raw voltage at 2048 Hz, i = the
                                                            electrode's position in the subject's label list
    electrode_labels/sub_{s}/electrode_labels.json          JSON list of labels ("*" and "#" are stripped)
    corrupted_elec.json                                     {"sub_{s}": [labels]}: dropped
    localization/sub_{s}/depth-wm.csv                       Electrode, L, I, P (mm), DesikanKilliany (region)
    subject_timings/sub_{s}_trial{t:03}_timings.csv         index (sample), movie_time (s): trigger alignment
    subject_metadata/sub_{s}_trial{t:03}_metadata.json      filename (movie file; its stem is the movie id) or title
    transcripts/<movie>/features.csv                        one row per word: start, sentence, is_onset, ...

and, from a user-supplied folder ``movies`` (not part of the Brain Treebank download)::

    movies/<movie>/frames.csv                               time (s), file (image path relative to the folder)
    movies/<movie>/scene_cuts.csv                           optional: time (s) of each scene cut

Trigger electrodes (labels starting with DC or TRIG), corrupted electrodes and electrodes missing from
``depth-wm.csv`` (with a warning) are dropped. A movie time ``t`` maps to the sample
``index[r] + round((t - movie_time[r]) * 2048)``, ``r = searchsorted(movie_time, t)`` clipped to the trigger rows.
Time bin ``b`` (centre ``c_b`` s after an event at sample ``i``) averages the ``round(window * 2048)`` samples
starting at ``i + round((c_b - window / 2) * 2048)``; events whose bins do not all lie inside the recording and
the trigger range are dropped (counted in the log).
"""

from __future__ import annotations

import json
import re
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np

from neurovision.data.events import EventStoreWriter, default_bins
from neurovision.data.store import StoreError, fingerprint
from neurovision.sources import log, up_to_date

CONVERTER_VERSION = "1"
SAMPLING_RATE = 2048.0
TRIGGER_PREFIXES = ("DC", "TRIG")
HIGH_GAMMA_BAND = (70.0, 150.0)
_CUT_THUMB = 64  # frames are compared as 64x64 grayscale thumbnails for scene-cut detection
_H5_NAME = re.compile(r"^sub_(\d+)_trial(\d+)\.h5$")


# --------------------------------------------------------------------------------------------- layout
def neural_path(root: Path, subject: int, trial: int) -> Path:
    return Path(root) / f"sub_{subject}_trial{trial:03}.h5"


def labels_path(root: Path, subject: int) -> Path:
    return Path(root) / "electrode_labels" / f"sub_{subject}" / "electrode_labels.json"


def corrupted_path(root: Path) -> Path:
    return Path(root) / "corrupted_elec.json"


def localization_path(root: Path, subject: int) -> Path:
    return Path(root) / "localization" / f"sub_{subject}" / "depth-wm.csv"


def timings_path(root: Path, subject: int, trial: int) -> Path:
    return Path(root) / "subject_timings" / f"sub_{subject}_trial{trial:03}_timings.csv"


def metadata_path(root: Path, subject: int, trial: int) -> Path:
    return Path(root) / "subject_metadata" / f"sub_{subject}_trial{trial:03}_metadata.json"


def transcripts_dir(root: Path) -> Path:
    return Path(root) / "transcripts"


def features_path(root: Path, movie: str) -> Path:
    return transcripts_dir(root) / movie / "features.csv"


def frames_csv_path(movies: Path, movie: str) -> Path:
    return Path(movies) / movie / "frames.csv"


def scene_cuts_path(movies: Path, movie: str) -> Path:
    return Path(movies) / movie / "scene_cuts.csv"


def subject_name(subject: int) -> str:
    return f"sub_{subject}"


def clean_label(label: str) -> str:
    """An electrode label without the ``*`` and ``#`` marks ("T1b2*" -> "T1b2")."""
    return str(label).replace("*", "").replace("#", "")


def is_trigger(label: str) -> bool:
    return clean_label(label).upper().startswith(TRIGGER_PREFIXES)


# --------------------------------------------------------------------------------------------- readers
def _need_file(path: Path, field: str, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: field '{field}': file not found ({what})")
    return path


def _read_json(path: Path, what: str) -> Any:
    _need_file(path, "<file>", what)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreError(path, "<file>", f"not a readable JSON file: {e}") from e


def _read_csv(path: Path, columns: Sequence[str], what: str) -> Any:
    import pandas as pd

    _need_file(path, "<file>", what)
    try:
        df = pd.read_csv(path)
    except Exception as e:  # pandas raises several exception types for foreign files
        raise StoreError(path, "<file>", f"not a readable CSV file: {e}") from e
    for col in columns:
        if col not in df.columns:
            raise StoreError(path, col, f"missing column (found {list(df.columns)[:16]})")
    return df


def _numeric(df: Any, col: str, path: Path) -> np.ndarray:
    import pandas as pd

    values = pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=np.float64)
    bad = np.isnan(values) & df[col].notna().to_numpy()
    if bad.any():
        raise StoreError(path, col, f"non-numeric value {df[col][bad].iloc[0]!r} in row {int(np.argmax(bad))}")
    return values


def load_timings(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(movie_time (s), sample index) of the trigger rows, sorted by movie time (rows with NaN dropped)."""
    df = _read_csv(path, ("index", "movie_time"), "trigger timings")
    mt, idx = _numeric(df, "movie_time", path), _numeric(df, "index", path)
    ok = np.isfinite(mt) & np.isfinite(idx)
    mt, idx = mt[ok], idx[ok]
    if len(mt) == 0:
        raise StoreError(path, "movie_time", "no row with a finite movie_time and index")
    if np.any(np.diff(mt) < 0):
        log.warning("%s: movie_time is not sorted; sorting the trigger rows", path)
        order = np.argsort(mt, kind="stable")
        mt, idx = mt[order], idx[order]
    return mt, idx.astype(np.int64)


def movie_to_sample(t: np.ndarray | float, movie_time: np.ndarray, index: np.ndarray,
                    sampling_rate: float = SAMPLING_RATE) -> np.ndarray:
    """Sample index of movie time(s) ``t``: the trigger row ``searchsorted(movie_time, t)`` (clipped to the
    rows) plus the offset from that trigger, rounded."""
    t = np.asarray(t, dtype=np.float64)
    row = np.clip(np.searchsorted(movie_time, t), 0, len(movie_time) - 1)
    return index[row] + np.round((t - movie_time[row]) * sampling_rate).astype(np.int64)


def following_frame(frame_times: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Row of the first frame with time >= ``t`` (-1 where there is none)."""
    r = np.searchsorted(frame_times, np.asarray(t, dtype=np.float64), side="left")
    return np.where(r < len(frame_times), r, -1)


def preceding_onset(onsets: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Row of the latest onset <= ``t`` (-1 where there is none)."""
    return np.searchsorted(onsets, np.asarray(t, dtype=np.float64), side="right") - 1


@dataclass
class Transcript:
    path: Path
    onset_time: np.ndarray  # sentence onsets (s), sorted
    onset_sentence: list[str]
    word_time: np.ndarray  # every word (s), sorted
    word_sentence: list[str]


def load_transcript(path: Path) -> Transcript:
    df = _read_csv(path, ("start", "sentence", "is_onset"), "movie transcript")
    start = _numeric(df, "start", path)
    onset = np.nan_to_num(_numeric(df, "is_onset", path)) == 1
    sentence = ["" if not isinstance(s, str) else s for s in df["sentence"].tolist()]
    ok = np.isfinite(start)
    order = np.nonzero(ok)[0][np.argsort(start[ok], kind="stable")]
    on = order[onset[order]]
    return Transcript(path, start[on], [sentence[i] for i in on], start[order], [sentence[i] for i in order])


@dataclass
class Frames:
    csv: Path
    time: np.ndarray  # sorted (s)
    file: list[Path]


def load_frames(movies: Path, movie: str) -> Frames:
    path = frames_csv_path(movies, movie)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: field '<file>': file not found (frames of movie {movie!r}; extract "
                                f"them with ffmpeg, see `neurovision prepare braintreebank --help`)")
    df = _read_csv(path, ("time", "file"), "movie frames")
    time = _numeric(df, "time", path)
    if not np.isfinite(time).all():
        raise StoreError(path, "time", f"missing value in row {int(np.argmax(~np.isfinite(time)))}")
    order = np.argsort(time, kind="stable")
    files = [path.parent / str(df["file"].iloc[i]) for i in order]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{path}: field 'file': {len(missing)} frame image(s) not found, e.g. {missing[0]}")
    return Frames(path, time[order], files)


def load_frame(path: Path, size: int) -> np.ndarray:
    """A frame as uint8 (size, size, 3): centre-cropped to a square, resized (bicubic)."""
    from PIL import Image

    with Image.open(path) as f:
        im = f.convert("RGB")
        w, h = im.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        im = im.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)
        return np.asarray(im, dtype=np.uint8)


def _thumbnail(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("L").resize((_CUT_THUMB, _CUT_THUMB), Image.Resampling.BILINEAR), dtype=np.float32) / 255


def detect_scene_cuts(frames: Frames, threshold: float, min_gap: float) -> np.ndarray:
    """Times of the frames that start a new shot: the mean absolute difference of consecutive 64x64 grayscale
    frames (in [0, 1]) exceeds ``threshold``, at least ``min_gap`` s after the previous cut."""
    from tqdm.auto import tqdm

    cuts: list[float] = []
    prev = None
    for t, f in tqdm(list(zip(frames.time, frames.file, strict=True)), desc=f"scene cuts {frames.csv.parent.name}",
                     unit="frame", leave=False):
        cur = _thumbnail(f)
        if prev is not None and float(np.abs(cur - prev).mean()) > threshold:
            if not cuts or t - cuts[-1] >= min_gap:
                cuts.append(float(t))
        prev = cur
    return np.asarray(cuts, dtype=np.float64)


def load_scene_cuts(path: Path) -> np.ndarray:
    df = _read_csv(path, ("time",), "scene cuts")
    t = _numeric(df, "time", path)
    return np.sort(t[np.isfinite(t)])


def movie_id(meta_path: Path, root: Path) -> str:
    """The movie of a trial: the metadata's ``filename`` (itself or its stem, whichever is a transcript folder),
    else its ``title``; it must name a folder of ``transcripts/``."""
    meta = _read_json(meta_path, "trial metadata")
    if not isinstance(meta, dict):
        raise StoreError(meta_path, "filename", f"expected a JSON object, got {type(meta).__name__}")
    key = "filename" if meta.get("filename") else "title" if meta.get("title") else None
    if key is None:
        raise StoreError(meta_path, "filename", "missing (and no 'title' either)")
    name = str(meta[key])
    d = transcripts_dir(root)
    for cand in (name, Path(name).stem):
        if cand and (d / cand).is_dir():
            return cand
    available = sorted(p.name for p in d.iterdir() if p.is_dir()) if d.is_dir() else []
    raise StoreError(meta_path, key, f"movie {name!r} (id {Path(name).stem!r}) has no folder in {d} "
                     f"(available: {available})")


# --------------------------------------------------------------------------------------------- electrodes
@dataclass
class SubjectSites:
    positions: np.ndarray  # position of each kept electrode in the label list (-> data/electrode_{i})
    labels: list[str]  # cleaned
    coords: np.ndarray  # (N, 3) L, I, P in mm
    regions: list[str]
    n_labels: int
    dropped: dict[str, list[str]] = field(default_factory=dict)


def subject_sites(root: Path, subject: int, corrupted: dict[str, Any]) -> SubjectSites:
    """The subject's kept electrodes: not trigger, not corrupted, localized (a warning lists the others)."""
    lp = labels_path(root, subject)
    raw = _read_json(lp, f"electrode labels of subject {subject}")
    if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
        raise StoreError(lp, "electrode_labels", "expected a JSON list of strings")
    labels = [clean_label(x) for x in raw]
    bad = corrupted.get(subject_name(subject), [])
    if not isinstance(bad, list):
        raise StoreError(corrupted_path(root), subject_name(subject), "expected a list of labels")
    bad_set = {clean_label(x) for x in bad}
    loc_p = localization_path(root, subject)
    df = _read_csv(loc_p, ("Electrode", "L", "I", "P", "DesikanKilliany"), f"localization of subject {subject}")
    lip = np.stack([_numeric(df, c, loc_p) for c in ("L", "I", "P")], axis=1)
    where: dict[str, int] = {}
    for r, e in enumerate(df["Electrode"].tolist()):
        if isinstance(e, str) and np.isfinite(lip[r]).all():
            where.setdefault(clean_label(e), r)
    dropped: dict[str, list[str]] = {"trigger": [], "corrupted": [], "unlocalized": []}
    keep: list[int] = []
    for i, lab in enumerate(labels):
        if is_trigger(lab):
            dropped["trigger"].append(lab)
        elif lab in bad_set:
            dropped["corrupted"].append(lab)
        elif lab not in where:
            dropped["unlocalized"].append(lab)
        else:
            keep.append(i)
    if dropped["unlocalized"]:
        msg = (f"{loc_p}: field 'Electrode': {len(dropped['unlocalized'])} electrode(s) of {subject_name(subject)} "
               f"have no localization and are dropped: {dropped['unlocalized']}")
        warnings.warn(msg, UserWarning, stacklevel=3)
        log.warning(msg)
    if not keep:
        raise StoreError(lp, "electrode_labels", f"no electrode of {subject_name(subject)} left after dropping "
                         f"{ {k: len(v) for k, v in dropped.items()} }")
    rows = [where[labels[i]] for i in keep]
    region_col = df["DesikanKilliany"].tolist()
    regions = [region_col[r] if isinstance(region_col[r], str) else "" for r in rows]
    return SubjectSites(np.asarray(keep, dtype=np.int64), [labels[i] for i in keep], lip[rows].astype(np.float32),
                        regions, len(labels), dropped)


def _recording_length(path: Path, sites: SubjectSites, labels_file: Path) -> int:
    """Samples in the recording, checking the ``data`` group against the label list."""
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise StoreError(path, "<file>", f"not a readable HDF5 file: {e}") from e
    with f:
        if "data" not in f or not isinstance(f["data"], h5py.Group):
            raise StoreError(path, "data", f"missing group (found {list(f.keys())[:8]})")
        g = f["data"]
        if len(g) != sites.n_labels:
            raise StoreError(path, "data", f"{len(g)} electrode datasets, but {labels_file} lists {sites.n_labels} "
                             "labels (one dataset electrode_{i} per label expected)")
        lengths = set()
        for i in sites.positions:
            name = f"electrode_{i}"
            if name not in g:
                raise StoreError(path, f"data/{name}", f"missing (label {i} of {labels_file})")
            ds = g[name]
            if ds.ndim != 1 or ds.dtype.kind not in "fiu":
                raise StoreError(path, f"data/{name}", f"dtype {ds.dtype} shape {ds.shape}, expected a 1-D number array")
            lengths.add(int(ds.shape[0]))
        if len(lengths) != 1:
            raise StoreError(path, "data", f"electrode datasets differ in length: {sorted(lengths)}")
    return lengths.pop()


# --------------------------------------------------------------------------------------------- events
@dataclass
class TrialEvents:
    """One event set of one trial, after every drop rule."""

    time: np.ndarray
    sample: np.ndarray
    frame_key: list[str]
    sentence: list[str]


@dataclass
class TrialPlan:
    subject: int
    trial: int
    movie: str
    h5: Path
    n_samples: int
    events: dict[str, TrialEvents]


def _frame_key(movie: str, t: float) -> str:
    return f"{movie}@{t:.3f}"


def _select(movie: str, kind: str, t: np.ndarray, frame_rows: np.ndarray,
            sentences: list[str], frames: Frames, timing: tuple[np.ndarray, np.ndarray], n_samples: int,
            lo: np.ndarray, n_win: int, start: float, stop: float, window: float,
            dropped: dict[str, int]) -> TrialEvents:
    mt, idx = timing
    has_frame = frame_rows >= 0
    dropped[f"{kind}: no frame"] += int((~has_frame).sum())
    sample = movie_to_sample(t, mt, idx) if len(t) else np.zeros(0, dtype=np.int64)
    inside = ((t + start - window / 2 >= mt[0]) & (t + stop + window / 2 <= mt[-1])
              & (sample + lo[0] >= 0) & (sample + lo[-1] + n_win <= n_samples))
    dropped[f"{kind}: window outside recording"] += int((has_frame & ~inside).sum())
    keep = np.nonzero(has_frame & inside)[0]
    return TrialEvents(t[keep], sample[keep], [_frame_key(movie, frames.time[frame_rows[i]]) for i in keep],
                       [sentences[i] for i in keep])


def _plan_trial(subject: int, trial: int, movie: str, h5: Path, n_samples: int, timing: tuple[np.ndarray, np.ndarray],
                tr: Transcript, frames: Frames, cuts: np.ndarray, language_events: str, lo: np.ndarray,
                n_win: int, start: float, stop: float, window: float, dropped: dict[str, int]) -> TrialPlan:
    if language_events == "word":
        lt, ls = tr.word_time, tr.word_sentence
    else:
        lt, ls = tr.onset_time, tr.onset_sentence
    common: dict[str, Any] = dict(frames=frames, timing=timing, n_samples=n_samples, lo=lo, n_win=n_win, start=start, stop=stop,
                  window=window, dropped=dropped)
    lang = _select(movie, "language", lt, following_frame(frames.time, lt), ls, **common)
    prev = preceding_onset(tr.onset_time, cuts)
    dropped["vision: before the first sentence"] += int((prev < 0).sum())
    ok = prev >= 0
    vis_t = cuts[ok]
    vis = _select(movie, "vision", vis_t, following_frame(frames.time, vis_t),
                  [tr.onset_sentence[i] for i in prev[ok]], **common)
    return TrialPlan(subject, trial, movie, h5, n_samples, {"language": lang, "vision": vis})


# --------------------------------------------------------------------------------------------- signal
def _high_gamma(x: np.ndarray) -> np.ndarray:
    from scipy.fft import next_fast_len
    from scipy.signal import butter, hilbert, sosfiltfilt

    sos = butter(4, HIGH_GAMMA_BAND, btype="bandpass", fs=SAMPLING_RATE, output="sos")
    y = sosfiltfilt(sos, x)
    return np.abs(hilbert(y, N=next_fast_len(len(y)))[: len(y)])


def _read_signal(f: h5py.File, path: Path, position: int, signal: str) -> np.ndarray:
    name = f"data/electrode_{position}"
    x = f[name][()].astype(np.float64)
    if not np.isfinite(x).all():
        bad = ~np.isfinite(x)
        raise StoreError(path, name, f"{int(bad.sum())} non-finite (NaN/inf) samples, first at sample "
                         f"{int(np.argmax(bad))}")
    return _high_gamma(x) if signal == "high_gamma" else x


def window_means(x: np.ndarray, sample: np.ndarray, lo: np.ndarray, n_win: int) -> np.ndarray:
    """(E, B) means of ``x`` over ``[sample + lo_b, sample + lo_b + n_win)`` by a cumulative sum."""
    mu = float(x.mean()) if len(x) else 0.0
    cs = np.concatenate([[0.0], np.cumsum(x - mu)])
    a = sample[:, None] + lo[None, :]
    return (cs[a + n_win] - cs[a]) / n_win + mu


# --------------------------------------------------------------------------------------------- prepare
def _discover(root: Path, subjects: list[int] | None, trials: list[int] | None) -> list[tuple[int, int]]:
    found = sorted({(int(m.group(1)), int(m.group(2))) for p in root.glob("sub_*_trial*.h5")
                    if (m := _H5_NAME.match(p.name))})
    subs = sorted({s for s, _ in found}) if subjects is None else list(dict.fromkeys(int(s) for s in subjects))
    pairs: list[tuple[int, int]] = []
    for s in subs:
        have = [t for ss, t in found if ss == s]
        want = have if trials is None else list(dict.fromkeys(int(t) for t in trials))
        if not want:
            raise FileNotFoundError(f"{neural_path(root, s, 0)}: field '<file>': no sub_{s}_trial*.h5 in {root}")
        for t in want:
            _need_file(neural_path(root, s, t), "<file>", f"neural recording of subject {s} trial {t}")
            pairs.append((s, t))
    if not pairs:
        raise FileNotFoundError(f"{root}: field '<file>': no sub_*_trial*.h5 recordings found")
    return pairs


def prepare(
    root: Path,
    movies: Path,
    out: Path,
    subjects: list[int] | None = None,
    trials: list[int] | None = None,
    language_events: Literal["sentence", "word"] = "sentence",
    n_bins: int = 161,
    start: float = -2.0,
    stop: float = 2.0,
    window: float = 0.2,
    signal: Literal["voltage", "high_gamma"] = "voltage",
    frame_size: int = 224,
    cut_threshold: float = 0.12,
    min_cut_gap: float = 1.0,
    force: bool = False,
) -> Path:
    """Convert the Brain Treebank at ``root`` (with movie frames from ``movies``) into an events store at ``out``.

    Two event sets per subject: ``language`` (each sentence onset, or each word, with the first movie frame at
    or after it) and ``vision`` (each scene cut with the first frame of the new shot and the latest sentence
    that began at or before the cut; cuts before the first sentence are dropped). Targets: the mean signal of
    each kept electrode in ``window``-s windows centred on ``n_bins`` times from ``start`` to ``stop`` s around
    each event (200 ms windows every 25 ms by default). Trigger (DC*, TRIG*), corrupted and unlocalized
    electrodes are dropped; events whose windows leave the recording or the trigger range are dropped.

    Movie frames are not part of the Brain Treebank download: extract them once per movie into
    ``<movies>/<movie>/`` (``<movie>`` = the folder name in ``transcripts/``), e.g.
    ``ffmpeg -i ant-man.mp4 -vf fps=4 frames/%06d.jpg``, and write ``frames.csv`` with columns ``time`` and
    ``file`` (``time = (n - 1) / 4`` s for ``frames/{n:06d}.jpg``). An optional ``scene_cuts.csv`` (column
    ``time``) gives the scene cuts; without it cuts are detected from consecutive frames (mean absolute
    difference of 64x64 grayscale frames above ``cut_threshold``, at least ``min_cut_gap`` s apart).

    Args:
        root: Brain Treebank root folder (holding ``sub_*_trial*.h5``, ``electrode_labels``, ``localization``,
            ``subject_timings``, ``subject_metadata``, ``transcripts`` and ``corrupted_elec.json``).
        movies: folder with one sub-folder per movie, named like its ``transcripts/`` folder, holding
            ``frames.csv`` (columns ``time`` in s, ``file`` relative to the sub-folder) and optionally
            ``scene_cuts.csv`` (column ``time``). Make the frames with e.g. ``ffmpeg -i <movie>.mp4 -vf fps=4
            frames/%06d.jpg`` and ``time = (n - 1) / 4`` for ``frames/{n:06d}.jpg``.
        out: the events store file to write.
        subjects: Brain Treebank subjects to include; None: every subject with a recording under ``root``.
        trials: trials (recordings) of each subject to include; None: every trial found.
        language_events: ``sentence``: one language event per sentence onset; ``word``: one per word.
        n_bins: time bins per event.
        start: centre of the first bin, in s relative to the event.
        stop: centre of the last bin, in s relative to the event.
        window: length (s) of the averaging window of each bin.
        signal: ``voltage``: the raw voltage; ``high_gamma``: the Hilbert envelope of the 70-150 Hz band
            (4th-order Butterworth, zero-phase).
        frame_size: frames are centre-cropped to a square and resized to this size (pixels).
        cut_threshold: scene-cut detection threshold on the mean absolute difference of consecutive
            grayscale frames (0..1); unused for movies with a ``scene_cuts.csv``.
        min_cut_gap: minimum time (s) between two detected scene cuts.
        force: rebuild even when an up-to-date store exists at ``out``.
    """
    from tqdm.auto import tqdm

    root, movies, out = Path(root), Path(movies), Path(out)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    if not (stop > start or (n_bins == 1 and stop == start)):
        raise ValueError(f"stop must be > start, got start={start}, stop={stop}")
    n_win = int(round(window * SAMPLING_RATE))
    if n_win < 1:
        raise ValueError(f"window must be at least one sample (1/{SAMPLING_RATE:g} s), got {window}")
    if frame_size < 1:
        raise ValueError(f"frame_size must be >= 1, got {frame_size}")
    if not 0 < cut_threshold < 1 or min_cut_gap < 0:
        raise ValueError(f"need 0 < cut_threshold < 1 and min_cut_gap >= 0, got {cut_threshold}, {min_cut_gap}")
    if language_events not in ("sentence", "word") or signal not in ("voltage", "high_gamma"):
        raise ValueError(f"unknown language_events {language_events!r} or signal {signal!r}")
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: field 'root': Brain Treebank root folder not found")
    if not movies.is_dir():
        raise FileNotFoundError(f"{movies}: field 'movies': movie frames folder not found")

    # ---- inputs and fingerprint
    pairs = _discover(root, subjects, trials)
    subs = list(dict.fromkeys(s for s, _ in pairs))
    files: list[Path] = [_need_file(corrupted_path(root), "<file>", "corrupted electrodes")]
    for s in subs:
        files += [_need_file(labels_path(root, s), "<file>", f"electrode labels of subject {s}"),
                  _need_file(localization_path(root, s), "<file>", f"localization of subject {s}")]
    movie_of: dict[tuple[int, int], str] = {}
    for s, t in pairs:
        files += [neural_path(root, s, t), _need_file(timings_path(root, s, t), "<file>", "trigger timings")]
        mp = metadata_path(root, s, t)
        movie_of[(s, t)] = movie_id(mp, root)
        files.append(mp)
    frames: dict[str, Frames] = {}
    for m in dict.fromkeys(movie_of.values()):
        files.append(_need_file(features_path(root, m), "<file>", f"transcript of movie {m!r}"))
        frames[m] = load_frames(movies, m)
        files += [frames[m].csv, *frames[m].file]
        if scene_cuts_path(movies, m).is_file():
            files.append(scene_cuts_path(movies, m))
    options: dict[str, Any] = {
        "root": str(root.resolve()), "movies": str(movies.resolve()), "subject_trials": [list(p) for p in pairs],
        "language_events": language_events, "n_bins": n_bins, "start": start, "stop": stop, "window": window,
        "signal": signal, "frame_size": frame_size, "cut_threshold": cut_threshold, "min_cut_gap": min_cut_gap,
        "sampling_rate": SAMPLING_RATE,
    }
    fp = fingerprint({"converter_version": CONVERTER_VERSION, **options}, files)
    if up_to_date(out, fp, force):
        return out

    # ---- electrodes, movies, events
    corrupted = _read_json(corrupted_path(root), "corrupted electrodes")
    if not isinstance(corrupted, dict):
        raise StoreError(corrupted_path(root), "<file>", "expected a JSON object {\"sub_N\": [labels]}")
    sites = {s: subject_sites(root, s, corrupted) for s in subs}
    transcripts = {m: load_transcript(features_path(root, m)) for m in frames}
    cuts: dict[str, np.ndarray] = {}
    for m, fr in frames.items():
        sc = scene_cuts_path(movies, m)
        cuts[m] = load_scene_cuts(sc) if sc.is_file() else detect_scene_cuts(fr, cut_threshold, min_cut_gap)
        log.info("braintreebank: movie %s: %d frames, %d scene cuts (%s)", m, len(fr.time), len(cuts[m]),
                 sc.name if sc.is_file() else "detected")
    centers = default_bins(n_bins, start, stop)
    lo = np.round((centers - window / 2) * SAMPLING_RATE).astype(np.int64)
    plans: dict[int, list[TrialPlan]] = {s: [] for s in subs}
    for s, t in pairs:
        h5 = neural_path(root, s, t)
        n_samples = _recording_length(h5, sites[s], labels_path(root, s))
        m = movie_of[(s, t)]
        dropped: dict[str, int] = {k: 0 for k in ("language: no frame", "language: window outside recording",
                                                  "vision: before the first sentence", "vision: no frame",
                                                  "vision: window outside recording")}
        plan = _plan_trial(s, t, m, h5, n_samples, load_timings(timings_path(root, s, t)), transcripts[m],
                           frames[m], cuts[m], language_events, lo, n_win, start, stop, window, dropped)
        plans[s].append(plan)
        log.info("braintreebank: %s trial %d (%s): %d language and %d vision events kept; dropped %s",
                 subject_name(s), t, m, len(plan.events["language"].time), len(plan.events["vision"].time),
                 {k: v for k, v in dropped.items() if v})

    # ---- stimuli: every frame and sentence referenced by an event, once
    frame_file = {_frame_key(m, ft): f for m, fr in frames.items() for ft, f in zip(fr.time, fr.file, strict=True)}
    used = {k for ps in plans.values() for p in ps for ev in p.events.values() for k in ev.frame_key}
    frame_keys = sorted(used, key=lambda k: (k.rsplit("@", 1)[0], float(k.rsplit("@", 1)[1])))
    frame_row = {k: i for i, k in enumerate(frame_keys)}
    sentence_row: dict[str, int] = {}
    for ps in plans.values():
        for p in ps:
            for ev in p.events.values():
                for sentence in ev.sentence:
                    sentence_row.setdefault(sentence, len(sentence_row))

    n_bins_ = len(centers)
    out.parent.mkdir(parents=True, exist_ok=True)
    with EventStoreWriter(out, source="braintreebank", converter_version=CONVERTER_VERSION, options=options,
                          fingerprint=fp) as w, tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        w.set_bins(centers, window, SAMPLING_RATE)
        _write_stimuli(w, frame_keys, [frame_file[k] for k in frame_keys], list(sentence_row), frame_size)
        bar = tqdm(total=sum(len(sites[s].positions) * len(plans[s]) for s in subs), desc="braintreebank electrodes",
                   unit="electrode")
        for s in subs:
            name, site = subject_name(s), sites[s]
            w.add_subject(name, electrodes=site.labels, coords=site.coords, regions=site.regions, space="LIP")
            n_ev = {es: sum(len(p.events[es].time) for p in plans[s]) for es in ("language", "vision")}
            targets = {es: _targets_buffer(Path(tmp) / f"{name}_{es}.npy", (n, len(site.labels), n_bins_))
                       for es, n in n_ev.items()}
            offset = {es: 0 for es in n_ev}
            for p in plans[s]:
                with h5py.File(p.h5, "r") as f:
                    for j, pos in enumerate(site.positions):
                        x = _read_signal(f, p.h5, int(pos), signal)
                        for es, ev in p.events.items():
                            if len(ev.sample):
                                targets[es][offset[es]:offset[es] + len(ev.sample), j] = window_means(
                                    x, ev.sample, lo, n_win)
                        del x
                        bar.update(1)
                for es, ev in p.events.items():
                    offset[es] += len(ev.sample)
            for es in ("language", "vision"):
                evs = [p.events[es] for p in plans[s]]
                w.add_events(
                    name, es,
                    time=np.concatenate([e.time for e in evs]),
                    trial=np.concatenate([np.full(len(e.time), p.trial) for e, p in zip(evs, plans[s], strict=True)]),
                    movie=[p.movie for e, p in zip(evs, plans[s], strict=True) for _ in e.time],
                    frame=np.array([frame_row[k] for e in evs for k in e.frame_key], dtype=np.int32),
                    sentence=np.array([sentence_row[x] for e in evs for x in e.sentence], dtype=np.int32),
                    targets=targets[es])
            del targets
        bar.close()
    return out


def _targets_buffer(path: Path, shape: tuple[int, int, int]) -> np.ndarray:
    """A float32 array backed by a temp file (a subject's targets can outgrow memory in ``word`` mode)."""
    if 0 in shape:
        return np.zeros(shape, dtype=np.float32)
    return np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)


def _write_stimuli(w: EventStoreWriter, keys: list[str], files: list[Path], sentences: list[str], size: int) -> None:
    """The events store's /stimuli, streamed frame by frame (tens of thousands of 224x224 frames for the whole
    Brain Treebank need not fit in memory)."""
    from tqdm.auto import tqdm

    ds = w.create_stimuli(keys, sentences, (size, size))
    for i, f in enumerate(tqdm(files, desc="braintreebank frames", unit="frame", leave=False)):
        ds[i] = load_frame(f, size)
