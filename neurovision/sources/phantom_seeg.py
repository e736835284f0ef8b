"""The SEEG phantom: movies of procedural scenes with narration, and electrodes with planted responses.

Each movie is a run of shots (2-6 s each); every shot shows one scene (:mod:`neurovision.sources.scenes`),
and a narrator speaks a sentence every 1.5-4 s that describes the current shot with probability
``p_congruent`` and another, random scene otherwise. Two event sets are built as for the Brain Treebank:
``language`` (each sentence onset with the frame on screen) and ``vision`` (each scene cut with the closest
preceding sentence).

Every electrode has one planted kind, saved as ground truth (``extras/site_kind_<subject>``, names in the
``names`` attribute):

- ``vision``: its response amplitude is a random linear read-out of what is shown, v = concept presence of the
  frame (colours, shapes, sizes);
- ``language``: a read-out of what is named, l = the concept words of the sentence;
- ``multimodal``: a read-out of the *interaction* (v - E v) * (l - E l), i.e. of shown-and-named agreement,
  which no linear combination of v and l expresses;
- ``null``: noise only.

The amplitude drives a Gaussian bump (latency 0.1-0.6 s, width ``bump_width``) over the time bins around the
event; noise is white at the bin step, averaged over the 200 ms window (like binned voltage), with variance
1/``snr`` of the amplitude variance. ``null_phantom=True`` plants nothing (every site null): the calibration set
for the statistics. Electrodes sit at random points of nilearn's MNI152 brain mask (``space="MNI"``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm.auto import tqdm

from neurovision.data.events import EventStoreWriter, default_bins
from neurovision.data.store import fingerprint
from neurovision.sources import scenes, up_to_date

CONVERTER_VERSION = "phantom-seeg-1"
SITE_KINDS: tuple[str, ...] = ("null", "vision", "language", "multimodal")
_SYNONYMS = {"little": "small", "big": "large"}

PRESETS: dict[str, dict[str, float | int]] = {
    # a few seconds to build: unit tests
    "tiny": {"n_subjects": 2, "n_electrodes": 24, "n_movies": 1, "movie_minutes": 10.0},
    # the demo (`make demo-encoding`)
    "demo": {"n_subjects": 3, "n_electrodes": 64, "n_movies": 2, "movie_minutes": 12.0},
}


def sentence_concepts(text: str) -> np.ndarray:
    """(len(CONCEPTS),) float32: how often each concept word is named in ``text`` (synonyms mapped)."""
    v = np.zeros(len(scenes.CONCEPTS), np.float32)
    for w in re.findall(r"[a-z]+", text.lower()):
        w = _SYNONYMS.get(w, w)
        if w.endswith("s") and w[:-1] in scenes.CONCEPTS:
            w = w[:-1]
        if w in scenes.CONCEPTS:
            v[scenes.CONCEPTS.index(w)] += 1
    return v


def _movie(rng: np.random.Generator, seconds: float, p_congruent: float):
    """Shots (start, scene) and sentences (onset, text, described scene) of one movie."""
    shots, t = [], 0.0
    while t < seconds:
        shots.append((t, scenes.sample_scene(rng)))
        t += float(rng.uniform(2.0, 6.0))
    starts = np.array([s for s, _ in shots])
    sents, t = [], float(rng.uniform(0.5, 2.0))
    while t < seconds:
        shot = shots[int(np.searchsorted(starts, t, side="right")) - 1][1]
        described = shot if rng.random() < p_congruent else scenes.sample_scene(rng)
        caps = scenes.captions(described)
        sents.append((t, caps[int(rng.integers(len(caps)))]))
        t += float(rng.uniform(1.5, 4.0))
    return shots, sents


def _brain_points() -> np.ndarray:
    """World (MNI, mm) coordinates of the voxels of nilearn's bundled MNI152 brain mask (2 mm)."""
    from nilearn.datasets import load_mni152_brain_mask

    img = load_mni152_brain_mask(resolution=2)
    ijk = np.argwhere(np.asarray(img.get_fdata()) > 0)
    return (np.c_[ijk, np.ones(len(ijk))] @ np.asarray(img.affine).T)[:, :3].astype(np.float32)


def _kinds(rng: np.random.Generator, n: int, fractions: tuple[float, float, float], null: bool) -> np.ndarray:
    kinds = np.zeros(n, np.int8)
    if null:
        return kinds
    counts = [int(round(f * n)) for f in fractions]
    labels = np.concatenate([np.full(c, k + 1, np.int8) for k, c in enumerate(counts)] + [np.zeros(n, np.int8)])[:n]
    return rng.permutation(labels)


def prepare(
    out: Path,
    preset: Literal["tiny", "demo"] = "demo",
    n_subjects: int | None = None,
    n_electrodes: int | None = None,
    n_movies: int | None = None,
    movie_minutes: float | None = None,
    vision_fraction: float = 0.15,
    language_fraction: float = 0.15,
    multimodal_fraction: float = 0.15,
    null_phantom: bool = False,
    snr: float = 0.4,
    p_congruent: float = 0.5,
    bump_width: float = 0.15,
    n_bins: int = 161,
    start: float = -2.0,
    stop: float = 2.0,
    window: float = 0.2,
    frame_size: int = 64,
    seed: int = 0,
    force: bool = False,
) -> Path:
    """Build the SEEG phantom (planted vision, language, multimodal and null electrodes) as an events store.

    Args:
        out: the events store file to write.
        preset: sizes: ``tiny`` (2 subjects x 24 electrodes, one 10-min movie) or ``demo`` (3 x 64, two 12-min
            movies per subject); the four size options below override it.
        n_subjects: number of subjects.
        n_electrodes: electrodes per subject.
        n_movies: movies (recordings) per subject; subjects share movies where they can.
        movie_minutes: length of each movie.
        vision_fraction: fraction of electrodes planted as vision sites.
        language_fraction: fraction planted as language sites.
        multimodal_fraction: fraction planted as multimodal (interaction) sites.
        null_phantom: plant nothing (every electrode null) to check the statistics' false-positive rate.
        snr: variance of the planted amplitude over the noise variance at the response peak.
        p_congruent: probability that a sentence describes the shot on screen.
        bump_width: sd (s) of the response bump in time.
        n_bins: time bins per event (161 = 25 ms steps over -2..2 s).
        start: first bin centre (s, relative to the event).
        stop: last bin centre (s).
        window: length (s) of the window each bin averages.
        frame_size: edge of the stored square frames.
        seed: seed of everything.
        force: rebuild even when an up-to-date store exists at ``out``.
    """
    size = dict(PRESETS[preset])
    for k, v in (("n_subjects", n_subjects), ("n_electrodes", n_electrodes), ("n_movies", n_movies),
                 ("movie_minutes", movie_minutes)):
        if v is not None:
            size[k] = v
    fractions = (vision_fraction, language_fraction, multimodal_fraction)
    if min(fractions) < 0 or sum(fractions) > 1:
        raise ValueError(f"phantom_seeg: vision/language/multimodal fractions {fractions} must be >= 0 and sum to <= 1")
    if snr <= 0:
        raise ValueError(f"phantom_seeg: snr must be > 0, got {snr}")
    options = dict(size, fractions=fractions, null_phantom=null_phantom, snr=snr, p_congruent=p_congruent,
                   bump_width=bump_width, n_bins=n_bins, start=start, stop=stop, window=window,
                   frame_size=frame_size, seed=seed)
    fp = fingerprint({"converter": CONVERTER_VERSION, **options})
    if up_to_date(out, fp, force):
        return Path(out)

    rng = np.random.default_rng(seed)
    n_subj, n_el, n_mov = int(size["n_subjects"]), int(size["n_electrodes"]), int(size["n_movies"])
    seconds = 60.0 * float(size["movie_minutes"])
    movies = {f"movie{m}": _movie(rng, seconds, p_congruent) for m in range(max(n_mov, 1) + 1)}
    names = list(movies)

    # stimuli: one frame per shot, one row per unique sentence
    frame_keys: list[str] = []
    frame_scenes: list[Any] = []
    sent_index: dict[str, int] = {}
    sentences: list[str] = []
    shot_frame: dict[str, np.ndarray] = {}
    for mv, (shots, sents) in movies.items():
        rows = []
        for t, sc in shots:
            rows.append(len(frame_keys))
            frame_keys.append(f"{mv}@{t:.3f}")
            frame_scenes.append(sc)
        shot_frame[mv] = np.array(rows)
        for _, text in sents:
            if text not in sent_index:
                sent_index[text] = len(sentences)
                sentences.append(text)
    frames = np.stack([scenes.render(sc, frame_size) for sc in frame_scenes])
    v_all = np.stack([scenes.presence(sc) for sc in frame_scenes])
    l_all = np.stack([sentence_concepts(s) for s in sentences])

    brain = _brain_points()
    bins = default_bins(n_bins, start, stop)
    step = float(bins[1] - bins[0]) if n_bins > 1 else window
    box = max(1, int(round(window / step)))
    with EventStoreWriter(out, source="phantom_seeg", converter_version=CONVERTER_VERSION, options=options,
                          fingerprint=fp) as w:
        w.set_bins(bins, window, 2048.0)
        w.set_stimuli(frames, frame_keys, sentences)
        w.set_annotations("frame_concepts", v_all.tolist())
        w.set_annotations("sentence_concepts", l_all.tolist())
        w.set_annotations("frame_scene", [sc.to_json() for sc in frame_scenes])
        for s in tqdm(range(n_subj), desc="phantom_seeg subjects", leave=False):
            subject = f"sub_{s + 1}"
            watched = [names[(s + m) % len(names)] for m in range(n_mov)]
            kinds = _kinds(rng, n_el, fractions, null_phantom)
            coords = brain[rng.choice(len(brain), size=n_el, replace=False)]
            w.add_subject(subject, electrodes=[f"E{i + 1}" for i in range(n_el)], coords=coords,
                          regions=[""] * n_el, space="MNI")
            weights = rng.standard_normal((n_el, len(scenes.CONCEPTS))).astype(np.float32)
            latency = rng.uniform(0.1, 0.6, n_el)
            bump = np.exp(-0.5 * ((bins[None, :] - latency[:, None]) / bump_width) ** 2)  # (N, B)
            events: dict[str, list[tuple[Any, ...]]] = {}
            for trial, mv in enumerate(watched):
                shots, sents = movies[mv]
                starts = np.array([t for t, _ in shots])
                onsets = np.array([t for t, _ in sents])
                # language: each sentence onset with the shot on screen
                for t, text in sents:
                    events.setdefault("language", []).append(
                        (t, trial, mv, shot_frame[mv][np.searchsorted(starts, t, side="right") - 1], sent_index[text]))
                # vision: each scene cut with the closest preceding sentence
                for shot, t in enumerate(starts[1:], start=1):
                    j = int(np.searchsorted(onsets, t, side="right")) - 1
                    if j >= 0:
                        events.setdefault("vision", []).append(
                            (float(t), trial, mv, shot_frame[mv][shot], sent_index[sents[j][1]]))
            # amplitudes from the subject's events (both sets), standardised over them
            both = [e for es in ("language", "vision") for e in events.get(es, [])]
            fr = np.array([e[3] for e in both])
            se = np.array([e[4] for e in both])
            v, lang = v_all[fr], l_all[se]
            feats = {1: v - v.mean(0), 2: lang - lang.mean(0), 3: (v - v.mean(0)) * (lang - lang.mean(0))}
            amp = np.zeros((len(both), n_el), np.float32)
            for kind, f in feats.items():
                sel = np.flatnonzero(kinds == kind)
                if len(sel):
                    a = f @ weights[sel].T
                    amp[:, sel] = (a - a.mean(0)) / (a.std(0) + 1e-8)
            offset = 0
            for es in ("language", "vision"):
                event_rows = events.get(es, [])
                n = len(event_rows)
                signal = amp[offset:offset + n, :, None] * bump[None]
                offset += n
                noise = rng.standard_normal((n, n_el, n_bins + box - 1)).astype(np.float32)
                c = np.concatenate([np.zeros((n, n_el, 1), np.float32), np.cumsum(noise, axis=2)], axis=2)
                noise = (c[:, :, box:] - c[:, :, :-box]) / box  # each bin averages `window` s of white noise
                noise /= noise.std() + 1e-8
                targets = signal + noise / np.sqrt(snr)
                w.add_events(subject, es, time=np.array([r[0] for r in event_rows]),
                             trial=np.array([r[1] for r in event_rows]), movie=[r[2] for r in event_rows],
                             frame=np.array([r[3] for r in event_rows]),
                             sentence=np.array([r[4] for r in event_rows]), targets=targets)
            w.set_extra(f"site_kind_{subject}", kinds, names=list(SITE_KINDS))
            w.set_extra(f"site_latency_{subject}", latency.astype(np.float32))
    return Path(out)


def site_truth(store: object, subject: str) -> np.ndarray:
    """Planted kind names (N,) of ``subject``'s electrodes, from an events store (path or EventStore)."""
    from neurovision.data.events import EventStore

    st = store if isinstance(store, EventStore) else EventStore(store)  # type: ignore[arg-type]
    kinds = st.extra(f"site_kind_{subject}")
    return np.array(SITE_KINDS)[kinds.astype(int)]
