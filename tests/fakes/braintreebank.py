"""A tiny, seeded, layout-faithful fake of the Brain Treebank (plus the user-supplied movie frames folder).

Same file names, groups, columns and JSON keys as the public release (see
:mod:`neurovision.sources.braintreebank`); only the sizes shrink: ~8 electrodes per subject, ~40 s recordings at
2048 Hz, triggers every second, one short movie per trial shared by every subject (so frames are shared), small
PNG frames at 4 fps made of solid-colour shots (the planted scene cuts), and a transcript of a handful of
sentences. Planted on electrode ``LA2`` (``"LA2*"`` in the label list) after every sentence onset: a Gaussian
voltage bump at +0.5 s and a 110 Hz burst at +1.0 s (seen by ``signal="high_gamma"``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
from PIL import Image

FS = 2048
FPS = 4.0
FRAME_HW = (32, 48)
PLANT = {"electrode": "LA2", "latency": 0.5, "sd": 0.08, "amplitude": 40.0,
         "gamma_latency": 1.0, "gamma_duration": 0.3, "gamma_freq": 110.0, "gamma_amplitude": 20.0}
NOISE_SD = 5.0
# consecutive shots differ by >= 67/255 in luma; within a shot only a small square moves
SHOT_COLOURS = [(30, 30, 30), (230, 230, 230), (200, 60, 60), (240, 200, 40), (60, 60, 200), (60, 200, 60)]
WORDS = ["the", "ant", "shrinks", "into", "a", "tiny", "world", "and", "runs", "home", "fast", "now"]
POS = ["DET", "NOUN", "VERB", "ADP", "DET", "ADJ", "NOUN", "CCONJ", "VERB", "NOUN", "ADV", "ADV"]


def _labels(n_electrodes: int) -> list[str]:
    if n_electrodes < 7:
        raise ValueError("the fake needs at least 7 electrodes")
    return ["LA1", "LA2*", "LA3", "LB1#", "LB2", "DC4", *[f"RH{k}" for k in range(1, n_electrodes - 5)]]


def _movie(rng: np.random.Generator, movies: Path, root: Path, movie: str, length: float) -> dict[str, Any]:
    """Frames (4 fps), planted cuts and a transcript for one movie."""
    # shots: a cut before the first sentence (dropped from `vision`), then every ~5 s, some off the frame grid
    cuts = [2.5]
    while cuts[-1] + 6.5 < length - 1.0:
        cuts.append(round(cuts[-1] + float(rng.uniform(4.5, 6.5)), 2))
    cuts_a = np.asarray(cuts)
    d = movies / movie
    (d / "frames").mkdir(parents=True)
    times = np.arange(0.0, length, 1.0 / FPS)
    h, w = FRAME_HW
    rows = []
    for n, t in enumerate(times, start=1):
        shot = int(np.searchsorted(cuts_a, t, side="right"))
        img = np.empty((h, w, 3), dtype=np.float64)
        img[:] = SHOT_COLOURS[shot % len(SHOT_COLOURS)]
        img += rng.normal(0, 3, size=img.shape)
        x = int(4 + (n * 2) % (w - 12))
        img[10:16, x:x + 6] = 255 - img[10:16, x:x + 6]
        name = f"frames/{n:06d}.png"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(d / name)
        rows.append({"time": (n - 1) / FPS, "file": name})
    pd.DataFrame(rows).to_csv(d / "frames.csv", index=False)

    # transcript: the first sentence after the first cut; the last one too close to the end (dropped)
    onsets = [3.1]
    while onsets[-1] + 5.6 < length - 3.0:
        onsets.append(round(onsets[-1] + float(rng.uniform(4.3, 5.5)), 3))
    onsets.append(round(length - 1.5, 3))
    words = []
    sentences = []
    for on in onsets:
        k = int(rng.integers(3, 6))
        first = int(rng.integers(0, len(WORDS) - k))
        ws = WORDS[first:first + k]
        sentence = " ".join(ws).capitalize() + "."
        sentences.append(sentence)
        for j, wd in enumerate(ws):
            words.append({"bin_head": 0, "start": round(on + 0.35 * j, 3), "end": round(on + 0.35 * j + 0.3, 3),
                          "text": wd, "sentence": sentence, "idx_in_sentence": j, "is_onset": int(j == 0),
                          "pos": POS[first + j], "gpt2_surprisal": float(rng.uniform(1, 12)),
                          "face_num": int(rng.integers(0, 3))})
    t_dir = root / "transcripts" / movie
    t_dir.mkdir(parents=True)
    pd.DataFrame(words).to_csv(t_dir / "features.csv")  # with the unnamed index column, as released
    return {"cuts": cuts_a, "frame_times": times, "onsets": np.asarray(onsets), "sentences": sentences,
            "word_times": np.asarray([wd["start"] for wd in words])}


def make_fake_braintreebank(
    root: Path,
    *,
    seed: int = 0,
    subjects: Sequence[int] = (1, 2),
    trials_per_subject: int = 1,
    duration_s: float = 40.0,
    n_electrodes: int = 8,
) -> dict[str, Any]:
    """Write the fake under ``root`` (``root/braintreebank`` and ``root/movies``) and return what tests need:

    ``root``, ``movies`` (paths), ``movie_of`` {trial: movie id}, ``movie`` {movie: cuts, frame_times, onsets,
    sentences, word_times}, ``labels`` {subject: raw labels}, ``kept`` {subject: cleaned kept labels, in order},
    ``trigger``/``corrupted``/``unlocalized`` {subject: [cleaned labels]}, ``coords`` {subject: {label: (L, I,
    P)}}, ``regions`` {subject: {label: region}}, ``plant`` (the planted waveform's parameters).
    """
    rng = np.random.default_rng(seed)
    base = Path(root)
    root, movies = base / "braintreebank", base / "movies"
    root.mkdir(parents=True)
    movies.mkdir(parents=True)
    movie_len = duration_s - 3.0
    movie_of = {t: f"fake-movie-{t}" for t in range(trials_per_subject)}
    movie_info = {m: _movie(rng, movies, root, m, movie_len) for m in movie_of.values()}

    labels = _labels(n_electrodes)
    clean = [x.replace("*", "").replace("#", "") for x in labels]
    corrupted_raw = {1: ["LB2"], 2: ["LB2*"]}  # raw marks in the corrupted list are cleaned too
    info: dict[str, Any] = {"root": root, "movies": movies, "movie_of": movie_of, "movie": movie_info,
                            "labels": {}, "kept": {}, "trigger": {}, "corrupted": {}, "unlocalized": {},
                            "coords": {}, "regions": {}, "plant": PLANT, "fs": FS}
    (root / "corrupted_elec.json").write_text(json.dumps(
        {f"sub_{s}": corrupted_raw.get(s, ["LB2"]) for s in subjects} | {"sub_99": ["X1"]}))
    n = int(duration_s * FS)
    tt = np.arange(n) / FS
    for s in subjects:
        d = root / "electrode_labels" / f"sub_{s}"
        d.mkdir(parents=True)
        (d / "electrode_labels.json").write_text(json.dumps(labels))
        unlocalized = ["RH1"] if s % 2 == 0 else []
        loc_rows, coords, regions = [], {}, {}
        for i, (raw, lab) in enumerate(zip(labels, clean, strict=True)):
            if lab == "DC4" or lab in unlocalized:
                continue
            lip = np.round(rng.uniform(-60, 60, size=3), 2)
            region = "" if lab == "LA3" else ["ctx-lh-superiortemporal", "ctx-lh-fusiform", "Left-Hippocampus"][i % 3]
            coords[lab], regions[lab] = tuple(lip), region
            loc_rows.append({"ID": i, "Electrode": raw, "L": lip[0], "I": lip[1], "P": lip[2],
                             "DesikanKilliany": region or np.nan, "Destrieux": "x"})
        ld = root / "localization" / f"sub_{s}"
        ld.mkdir(parents=True)
        pd.DataFrame(loc_rows).to_csv(ld / "depth-wm.csv", index=False)
        info["labels"][s] = labels
        info["trigger"][s] = ["DC4"]
        info["corrupted"][s] = ["LB2"]
        info["unlocalized"][s] = unlocalized
        info["kept"][s] = [x for x in clean if x not in ("DC4", "LB2", *unlocalized)]
        info["coords"][s], info["regions"][s] = coords, regions

        for t, movie in movie_of.items():
            lag, drift = 1.5 + 0.75 * (s - 1) + 0.1 * t, 2e-5 * s  # recording time of movie time m: m*(1+drift)+lag

            def sample_of(m: np.ndarray | float, lag: float = lag, drift: float = drift) -> np.ndarray:
                return (np.asarray(m) * (1 + drift) + lag) * FS

            k = np.arange(0, int(movie_len) + 1)
            k = k[sample_of(k) < n - 1]
            trig_idx = np.round(sample_of(k)).astype(np.int64)
            sd = root / "subject_timings"
            sd.mkdir(exist_ok=True)
            pd.DataFrame({"type": "trigger", "index": trig_idx, "movie_time": k.astype(float)}).to_csv(
                sd / f"sub_{s}_trial{t:03}_timings.csv", index=False)
            md = root / "subject_metadata"
            md.mkdir(exist_ok=True)
            (md / f"sub_{s}_trial{t:03}_metadata.json").write_text(json.dumps(
                {"title": movie.replace("-", " ").title(), "filename": f"{movie}.mp4", "duration": movie_len}))
            with h5py.File(root / f"sub_{s}_trial{t:03}.h5", "w") as f:
                g = f.create_group("data")
                for i, lab in enumerate(clean):
                    if lab == "DC4":  # the trigger channel: a pulse at every trigger
                        x = np.zeros(n)
                        for j in trig_idx:
                            x[j:j + 20] = 1000.0
                    else:
                        x = (rng.normal(0, NOISE_SD, n) + rng.uniform(-20, 20)
                             + 10 * np.sin(2 * np.pi * 0.3 * tt + rng.uniform(0, 6)))
                        if lab == PLANT["electrode"]:
                            for on in movie_info[movie]["onsets"]:
                                c = sample_of(on + PLANT["latency"]) / FS
                                x += PLANT["amplitude"] * np.exp(-0.5 * ((tt - c) / PLANT["sd"]) ** 2)
                                g0 = sample_of(on + PLANT["gamma_latency"]) / FS
                                m = (tt >= g0) & (tt < g0 + PLANT["gamma_duration"])
                                taper = np.hanning(int(m.sum()))
                                x[m] += PLANT["gamma_amplitude"] * taper * np.sin(
                                    2 * np.pi * PLANT["gamma_freq"] * tt[m])
                    g.create_dataset(f"electrode_{i}", data=x.astype(np.float32))
    return info
