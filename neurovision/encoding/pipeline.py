"""``neurovision encode -c experiments/encoding.yaml``: where do vision and language integrate?

For every subject and event set of an events store (:mod:`neurovision.data.events`):

1. features of every configured network (and each of its layers) for the events' frames / sentences / pairs
   (:func:`neurovision.encoding.features.extract_features`, cached in HDF5 by model id);
2. cross-validated ridge from each model's features to every site (electrode x time bin) with a per-target α
   and blocked folds (:mod:`neurovision.encoding.ridge`); banded ridge on [vision, language] for the
   "linearly integrated" baseline; out-of-fold predictions are centred within each test fold (as is Y) and r is
   the pooled within-fold Pearson r; r and α are cached per (model, layer, subject, set), the predictions only
   where the statistics use them (the first layer of each model that ``integration`` or ``pairs`` names, and
   the linear baseline), in float16 by default (``regression.predictions_dtype``; see :func:`encode_predictions`);
3. statistics (:mod:`neurovision.encoding.stats`) with one set of bootstrap indices per (subject, set) shared
   by every comparison: integration sites (multimodal beats vision, language and the linear combination) and
   the pairwise comparisons of the YAML (trained vs random, SLIP vs SimCLR, ...), BH-FDR, minimum bins.

Outputs in ``out``::

    sites.csv          one row per subject x event set x electrode: coordinates, peak r of every model, Δr and
                       significant bins of every comparison, ``integration``, the planted kind (phantom)
    layers.csv         mean / peak r of every model x layer x subject x set (the layer sweep)
    summary.json       counts per event set and comparison; on the phantom, precision/recall/F1 of the calls
    sites_brain.png    electrodes on a glass brain, integration sites highlighted (nilearn)
    r_by_model.png     distribution of each model's peak r; Δr time courses of the integration comparisons
    r_by_layer.png     the layer sweep (when a model lists several layers)
    fits/, bootstrap/  cached fits (r, α; predictions where used) and bootstrap indices (re-running recomputes
                       nothing)

Memory and disk at Brain Treebank size (E ~ 30k events, T = N x B ~ 25.8k targets, float32 E x T = 3.1 GB): Y
and its fold-centred copy (2 x E x T float32) for the (subject, set) at hand; one model-layer's features at a
time (two for the linear baseline; :class:`~neurovision.encoding.features.FeatureTable` reads a layer from the
HDF5 cache when asked); a fit's predictions only while it is fitted and, for the statistics, those of the
compared models (E x T float32 each); on disk, E x T x 2 bytes (float16) per compared model and nothing per
extra layer of a layer sweep (r and α only: T x (1 + n_folds) x 4 bytes).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from neurovision.data.atomic import atomic_path, write_json

log = logging.getLogger("neurovision.encode")
FITS_VERSION = 3  # 2: fold-centred predictions and within-fold r; 3: predictions only where used, float16 + scale


@dataclass
class Regression:
    """Cross-validated ridge settings."""

    alphas: list[float] = field(default_factory=lambda: np.logspace(-1, 5, 7).tolist())
    n_folds: int = 5
    folds_by: Literal["contiguous", "trial"] = "contiguous"  # trial: whole recordings (>= 2, else contiguous)
    inner_folds: int = 5
    backend: Literal["auto", "numpy", "torch", "torch_cuda"] = "auto"
    n_targets_batch: int | None = None
    predictions_dtype: Literal["float16", "float32"] = "float16"  # stored predictions (see encode_predictions)


@dataclass
class Statistics:
    """Bootstrap + FDR settings."""

    n_boot: int = 1000
    p_value: Literal["empirical", "normal"] = "normal"
    block: int = 1
    q: float = 0.05
    min_bins: int = 3
    contiguous: bool = False
    seed: int = 0


@dataclass
class Extraction:
    """Feature extraction settings (Lightning ``predict``)."""

    batch_size: int = 32
    accelerator: str = "auto"
    devices: int = 1
    projection: Literal["none", "sparse_jl"] = "none"
    jl_eps: float = 0.5


@dataclass
class Integration:
    """Names (keys of ``models``) of the three models of the integration test; linear = banded [vision, language]."""

    multimodal: str = "multimodal"
    vision: str = "vision"
    language: str = "language"


@dataclass
class Pair:
    """A pairwise comparison: is model ``a`` better than model ``b`` (e.g. trained vs random init)?"""

    a: str
    b: str
    name: str | None = None

    @property
    def label(self) -> str:
        return self.name or f"{self.a}>{self.b}"


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _save_npz(path: Path, **arrays: Any) -> None:
    with atomic_path(path, suffix=".partial.npz") as tmp:
        np.savez(tmp, **arrays)


def encode_predictions(pred: np.ndarray, dtype: str = "float16") -> dict[str, np.ndarray]:
    """Fold-centred predictions (E, T) as stored in ``fits/``: ``{"predictions": ...}`` in float32, or for
    ``float16`` the predictions divided by each column's max |value| (``"predictions_scale"``, float32 (T,);
    1 for an all-zero column), so every column uses float16's range without overflow or underflow: relative
    rounding error <= 2^-11 (about 5e-4) per value; Pearson r, which the statistics use, does not depend on
    the scale. ``pred`` (float32) is divided in place for float16."""
    if dtype == "float32":
        return {"predictions": np.asarray(pred, dtype=np.float32)}
    if dtype != "float16":
        raise ValueError(f"regression.predictions_dtype must be 'float16' or 'float32', got {dtype!r}")
    pred = np.asarray(pred, dtype=np.float32)
    scale = np.maximum(pred.max(axis=0), -pred.min(axis=0)) if len(pred) else np.ones(pred.shape[1:], np.float32)
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    pred /= scale
    return {"predictions": pred.astype(np.float16), "predictions_scale": scale}


def decode_predictions(stored: Any, out: np.ndarray | None = None) -> np.ndarray:
    """Predictions (E, T) float32 in Y's units from :func:`encode_predictions`'s arrays (a dict or an npz),
    written into ``out`` (float32, same shape) when given."""
    p = np.asarray(stored["predictions"])
    if p.dtype != np.float16:
        return np.asarray(p, dtype=np.float32)
    if out is None:
        out = p.astype(np.float32)
    else:
        out[...] = p
    out *= np.asarray(stored["predictions_scale"], dtype=np.float32)
    return out


def _folds(ev: Any, reg: Regression) -> list[tuple[np.ndarray, np.ndarray]]:
    """Outer folds: contiguous blocks of events, or whole recordings (``folds_by: trial``) when the subject has at
    least two; a subject with one recording falls back to contiguous blocks (logged)."""
    from neurovision.encoding.ridge import blocked_folds

    groups = None
    if reg.folds_by == "trial":
        if len(np.unique(ev.trial)) >= 2:
            groups = np.asarray(ev.trial)
        else:
            log.info("folds_by=trial: one recording only, contiguous folds instead")
    return blocked_folds(len(ev), n_folds=reg.n_folds, groups=groups)


class Encoder:
    """The encoding analysis of one events store (see the module docstring); :meth:`run` does it all."""

    def __init__(self, store: str | os.PathLike[str], out: str | os.PathLike[str], models: dict[str, Any], *,
                 integration: Integration | None = None, pairs: list[Pair] | None = None,
                 event_sets: list[str] | None = None, subjects: list[str] | None = None,
                 cache: str | os.PathLike[str] | None = None, regression: Regression | None = None,
                 statistics: Statistics | None = None, extraction: Extraction | None = None,
                 progress: bool = True) -> None:
        from neurovision.data.events import EventStore

        self.store_path = Path(store)
        self.store = EventStore(store)
        self.out = Path(out)
        self.models = dict(models)
        if not self.models:
            raise ValueError("encode: field 'models' is empty (name at least one feature network)")
        self.integration = integration
        self.pairs = list(pairs or [])
        self.regression = regression or Regression()
        self.statistics = statistics or Statistics()
        self.extraction = extraction or Extraction()
        self.cache = Path(cache) if cache else self.store_path.with_suffix(".features.h5")
        self.progress = progress
        self.subjects = list(subjects) if subjects else list(self.store.subject_names)
        for s in self.subjects:
            if s not in self.store.subject_names:
                raise ValueError(f"encode: field 'subjects': {s!r} is not in {self.store_path} "
                                 f"(has {self.store.subject_names})")
        self.event_sets = list(event_sets) if event_sets else ["language", "vision"]
        names = set(self.models)
        needed = []
        if integration is not None:
            needed += [("integration.multimodal", integration.multimodal), ("integration.vision", integration.vision),
                       ("integration.language", integration.language)]
        needed += [(f"pairs[{i}].{k}", getattr(p, k)) for i, p in enumerate(self.pairs) for k in ("a", "b")]
        for where, name in needed:
            if name not in names:
                raise ValueError(f"encode: field '{where}': model {name!r} is not among models {sorted(names)}")
        self._tables: dict[str, Any] = {}
        self._data_key: tuple[str, str] | None = None
        self._data: Any = None

    # features -----------------------------------------------------------------------------------
    def table(self, name: str) -> Any:
        if name not in self._tables:
            from neurovision.encoding.features import extract_features

            ex = self.extraction
            self._tables[name] = extract_features(
                self.store_path, self.models[name], self.cache, batch_size=ex.batch_size,
                accelerator=ex.accelerator, devices=ex.devices, projection=ex.projection, jl_eps=ex.jl_eps,
                seed=self.statistics.seed, progress=self.progress)
        return self._tables[name]

    def features(self, name: str, subject: str, event_set: str, layer: str | None = None) -> np.ndarray:
        ev = self.store.events(subject, event_set)
        return np.asarray(self.table(name).event_features(ev.frame, ev.sentence, layer), dtype=np.float32)

    def layers(self, name: str) -> list[str]:
        return list(self.table(name).layers)

    # regression ---------------------------------------------------------------------------------
    def _fit_key(self, what: Any, subject: str, event_set: str) -> str:
        """Names a fit (not how its predictions are stored: the file says, and is checked on load)."""
        reg = {k: v for k, v in asdict(self.regression).items() if k != "predictions_dtype"}
        return _digest({"version": FITS_VERSION, "what": what, "store": self.store.attrs.get("fingerprint"),
                        "subject": subject, "set": event_set, "regression": reg})

    def data(self, subject: str, event_set: str) -> tuple[np.ndarray, np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
        """(targets (E, N, B), targets as (E, N*B) centred within each test fold, the outer folds) of one subject
        and event set; the last one asked for is kept (every model of a (subject, set) reuses it)."""
        key = (subject, event_set)
        if self._data_key != key:
            from neurovision.encoding.ridge import center_by_fold

            y = self.store.targets(subject, event_set)
            folds = _folds(self.store.events(subject, event_set), self.regression)
            self._data_key, self._data = key, (y, center_by_fold(y.reshape(len(y), -1), folds), folds)
        return self._data

    def _cached_fit(self, path: Path, subject: str, event_set: str, solve: Any, predictions: bool
                    ) -> dict[str, np.ndarray]:
        """A fit's pooled within-fold r (N, B), α and (when ``predictions``) fold-centred out-of-fold predictions
        (E, N*B) float32, from ``path`` or computed by ``solve(Y (E, N*B), folds, return_predictions)`` and saved
        there atomically. A file of another FITS_VERSION, without the predictions asked for or with them in
        another dtype than ``regression.predictions_dtype`` is recomputed (and replaced), never misread."""
        want = self.regression.predictions_dtype
        if path.is_file():
            why = None
            try:
                with np.load(path) as z:
                    files = set(z.files)
                    version = int(z["version"]) if "version" in files else None
                    if version != FITS_VERSION:
                        why = f"written by fits version {version}, this is {FITS_VERSION}"
                    elif not {"r", "alphas"} <= files:
                        why = "r or alphas missing"
                    elif predictions and "predictions" not in files:
                        why = "no predictions stored (a layer the statistics did not use)"
                    elif predictions and z["predictions"].dtype != np.dtype(want):
                        why = f"predictions stored as {z['predictions'].dtype}, asked for {want}"
                    else:
                        out = {"r": z["r"], "alphas": z["alphas"]}
                        if predictions:
                            out["predictions"] = decode_predictions(z)
                        return out
            except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
                why = f"unreadable ({e})"
            log.info("%s: %s; recomputing", path, why)
        from neurovision.encoding.ridge import center_by_fold

        y, _, folds = self.data(subject, event_set)
        res = solve(y.reshape(len(y), -1), folds, predictions)
        out = {"r": np.asarray(res.r_pooled, np.float32).reshape(y.shape[1:]),
               "alphas": np.asarray(res.alphas_, np.float32)}
        arrays = {"version": np.int64(FITS_VERSION), **out}
        if predictions:
            pred = center_by_fold(res.predictions, folds, copy=False)
            del res
            arrays.update(encode_predictions(pred, want))
            out["predictions"] = decode_predictions(arrays, out=pred)  # what a re-run will read
        _save_npz(path, **arrays)
        return out

    def fit_path(self, name: str, subject: str, event_set: str, layer: str | None = None) -> Path:
        """The ``fits/`` file of one model layer (``name`` ``"linear"``: the banded baseline)."""
        if name == "linear" and name not in self.models:
            assert self.integration is not None
            iv, il = self.integration.vision, self.integration.language
            lv, ll = self.layers(iv)[0], self.layers(il)[0]
            key = self._fit_key(["banded", self.table(iv).model_id, lv, self.table(il).model_id, ll],
                                subject, event_set)
            return self.out / "fits" / "linear" / f"{subject}_{event_set}_{key}.npz"
        layer = layer or self.layers(name)[0]
        key = self._fit_key([self.table(name).model_id, layer], subject, event_set)
        return self.out / "fits" / f"{name}__{_safe(layer)}" / f"{subject}_{event_set}_{key}.npz"

    def fit(self, name: str, subject: str, event_set: str, layer: str | None = None,
            predictions: bool = True) -> dict[str, np.ndarray]:
        """r (N, B), α and (``predictions``) fold-centred out-of-fold predictions (E, N*B) of one model layer
        (cached in ``fits/``; without ``predictions`` the fit holds and stores no (E, N*B) array)."""
        from neurovision.encoding.ridge import cross_validated_ridge

        layer = layer or self.layers(name)[0]
        reg = self.regression
        return self._cached_fit(
            self.fit_path(name, subject, event_set, layer), subject, event_set,
            lambda y, folds, keep: cross_validated_ridge(
                self.features(name, subject, event_set, layer), y, folds=folds, alphas=np.asarray(reg.alphas),
                inner_folds=reg.inner_folds, backend=reg.backend, n_targets_batch=reg.n_targets_batch,
                return_predictions=keep), predictions)

    def fit_linear(self, subject: str, event_set: str) -> dict[str, np.ndarray]:
        """Banded ridge on [vision, language] features: the linearly integrated baseline (cached, with its
        predictions)."""
        from neurovision.encoding.ridge import cross_validated_banded_ridge

        assert self.integration is not None
        iv, il = self.integration.vision, self.integration.language
        lv, ll = self.layers(iv)[0], self.layers(il)[0]
        reg = self.regression
        return self._cached_fit(
            self.fit_path("linear", subject, event_set), subject, event_set,
            lambda y, folds, keep: cross_validated_banded_ridge(
                [self.features(iv, subject, event_set, lv), self.features(il, subject, event_set, ll)], y,
                folds=folds, alphas=np.asarray(reg.alphas), inner_folds=reg.inner_folds, backend=reg.backend,
                n_targets_batch=reg.n_targets_batch, seed=self.statistics.seed, return_predictions=keep), True)

    def bootstrap(self, subject: str, event_set: str) -> np.ndarray:
        from neurovision.encoding.stats import bootstrap_indices

        st = self.statistics
        n = len(self.store.events(subject, event_set))
        return bootstrap_indices(n, n_boot=st.n_boot, seed=st.seed, block=st.block,
                                 cache=self.out / "bootstrap" / f"{subject}_{event_set}.npy")

    # the analysis -------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        import pandas as pd
        from tqdm.auto import tqdm

        from neurovision.encoding import stats

        self.out.mkdir(parents=True, exist_ok=True)
        site_rows: list[pd.DataFrame] = []
        layer_rows: list[dict[str, Any]] = []
        curves: dict[str, list[np.ndarray]] = {}
        jobs = [(s, es) for s in self.subjects for es in self.event_sets if es in self.store.event_sets(s)]
        if not jobs:
            raise ValueError(f"encode: field 'event_sets': none of {self.event_sets} exists in {self.store_path}")
        for subject, event_set in tqdm(jobs, desc="encode", disable=not self.progress):
            y, yf, _ = self.data(subject, event_set)
            n_ev, n_sites, n_bins = y.shape
            fits: dict[str, dict[str, np.ndarray]] = {}
            compared = self.compared_models
            for name in self.models:
                for k, layer in enumerate(self.layers(name)):
                    f = self.fit(name, subject, event_set, layer, predictions=k == 0 and name in compared)
                    layer_rows.append({"model": name, "layer": layer, "subject": subject, "event_set": event_set,
                                       "mean_r": float(np.mean(f["r"])),
                                       "mean_peak_r": float(np.mean(f["r"].max(axis=1)))})
                    if k == 0:
                        fits[name] = f
            if self.integration is not None:
                fits["linear"] = self.fit_linear(subject, event_set)
            idx = self.bootstrap(subject, event_set)
            sites = self.store.sites(subject)
            df = pd.DataFrame({"subject": subject, "event_set": event_set, "electrode": sites.electrode,
                               "x": sites.coords[:, 0], "y": sites.coords[:, 1], "z": sites.coords[:, 2],
                               "space": sites.space, "region": sites.region})
            for name, f in fits.items():
                df[f"peak_r_{name}"] = f["r"].max(axis=1)
            preds = {k: f["predictions"] for k, f in fits.items() if "predictions" in f}
            common = self.stats_kwargs(n_bins)
            if self.integration is not None:
                ig = self.integration
                t = stats.integration_sites(yf, preds, idx, multimodal=ig.multimodal,
                                            baselines=(ig.vision, ig.language, "linear"), **common)
                for b in (ig.vision, ig.language, "linear"):
                    label = f"{ig.multimodal}>{b}"
                    self._columns(df, label, t[f"dr_peak_{label}"], t[f"n_sig_bins_{label}"], t[f"sig_{label}"])
                    curves.setdefault(label, []).append(fits[ig.multimodal]["r"] - fits[b]["r"])
                df["integration"] = t["integration"].to_numpy()
            for p in self.pairs:
                t = stats.pairwise(p.a, p.b, yf, preds, idx, **common)
                self._columns(df, p.label, t["dr_peak"], t["n_sig_bins"], t["significant"])
                curves.setdefault(p.label, []).append(fits[p.a]["r"] - fits[p.b]["r"])
            if f"site_kind_{subject}" in self.store.extras:
                from neurovision.sources.phantom_seeg import site_truth

                df["planted"] = site_truth(self.store, subject)
            site_rows.append(df)
        sites_df = pd.concat(site_rows, ignore_index=True)
        layers_df = pd.DataFrame(layer_rows)
        summary = self.summarise(sites_df)
        self._write_csv(sites_df, "sites.csv")
        self._write_csv(layers_df, "layers.csv")
        write_json(self.out / "summary.json", summary)
        from neurovision.encoding.plots import r_by_layer, r_by_model, sites_brain

        sites_brain(sites_df, self.out / "sites_brain.png")
        r_by_model(sites_df, curves, self.store.bin_centers, self.out / "r_by_model.png")
        if layers_df.groupby("model")["layer"].nunique().max() > 1:
            r_by_layer(layers_df, self.out / "r_by_layer.png")
        return summary

    @staticmethod
    def _columns(df: Any, label: str, dr_peak: Any, n_bins: Any, significant: Any) -> None:
        df[f"dr_{label}"] = np.asarray(dr_peak)
        df[f"bins_{label}"] = np.asarray(n_bins)
        df[f"sig_{label}"] = np.asarray(significant, bool)

    @property
    def compared_models(self) -> set[str]:
        """Models whose (first-layer) predictions the statistics use: those of ``integration`` and ``pairs``."""
        out = {n for p in self.pairs for n in (p.a, p.b)}
        if self.integration is not None:
            ig = self.integration
            out |= {ig.multimodal, ig.vision, ig.language}
        return out

    def stats_kwargs(self, n_bins: int) -> dict[str, Any]:
        """Keyword arguments of :func:`~neurovision.encoding.stats.integration_sites` / ``pairwise`` as
        :meth:`run` passes them."""
        st = self.statistics
        return {"n_bins": n_bins, "q": st.q, "min_bins": st.min_bins, "contiguous": st.contiguous,
                "device": self.stats_device, "p_value": st.p_value}

    @property
    def stats_device(self) -> str | None:
        """torch device of the bootstrap (CUDA when the regression runs there)."""
        import torch

        want = self.regression.backend
        return "cuda" if torch.cuda.is_available() and want in ("auto", "torch_cuda") else None

    def summarise(self, df: Any) -> dict[str, Any]:
        out: dict[str, Any] = {"store": str(self.store_path), "models": {k: self.table(k).model_id for k in self.models},
                               "statistics": asdict(self.statistics), "regression": asdict(self.regression),
                               "event_sets": {}}
        for es, d in df.groupby("event_set"):
            e: dict[str, Any] = {"sites": len(d)}
            for c in d.columns:
                if c.startswith("sig_"):
                    e[f"n_{c}"] = int(d[c].sum())
            for c in d.columns:
                if c.startswith("peak_r_"):
                    e[f"mean_{c}"] = float(d[c].mean())
            if "integration" in d:
                e["n_integration"] = int(d["integration"].sum())
                e["fraction_integration"] = float(d["integration"].mean())
                if "planted" in d:
                    e.update(call_scores(d["integration"].to_numpy(), d["planted"].to_numpy() == "multimodal"))
            out["event_sets"][str(es)] = e
        if "integration" in df:
            e = {"sites": len(df), "n_integration": int(df["integration"].sum()),
                 "fraction_integration": float(df["integration"].mean())}
            if "planted" in df:
                e.update(call_scores(df["integration"].to_numpy(), df["planted"].to_numpy() == "multimodal"))
            out["all"] = e
        return out

    def _write_csv(self, df: Any, name: str) -> None:
        with atomic_path(self.out / name) as tmp:
            df.to_csv(tmp, index=False)


def call_scores(called: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Precision, recall, F1 of site calls against planted truth, and the call rate among non-planted sites."""
    called, truth = np.asarray(called, bool), np.asarray(truth, bool)
    tp = int((called & truth).sum())
    fp = int((called & ~truth).sum())
    fn = int((~called & truth).sum())
    precision = tp / (tp + fp) if tp + fp else float("nan")
    recall = tp / (tp + fn) if tp + fn else float("nan")
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")
    return {"tp": tp, "fp": fp, "fn": fn, "precision": precision, "recall": recall, "f1": f1,
            "false_call_rate": fp / max(int((~truth).sum()), 1)}


def _safe(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in s)


# ------------------------------------------------------------------------------------------------ CLI
def instantiate_network(name: str, spec: Any) -> Any:
    """A feature network from ``{class_path, init_args}`` (checked against the class signature)."""
    import torch
    from jsonargparse import ArgumentParser

    if isinstance(spec, torch.nn.Module):  # jsonargparse already built it from class_path/init_args
        return spec
    if hasattr(spec, "as_dict"):  # a jsonargparse Namespace
        spec = spec.as_dict()
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise ValueError(f"encode: field 'models.{name}': expected a mapping with class_path and init_args")
    import importlib

    mod, _, cls_name = str(spec["class_path"]).rpartition(".")
    try:
        cls = getattr(importlib.import_module(mod), cls_name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"encode: field 'models.{name}.class_path': cannot import {spec['class_path']!r}") from e
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):  # a config file is data, not code
        raise ValueError(f"encode: field 'models.{name}.class_path': {spec['class_path']!r} is not a torch.nn.Module "
                         "class (feature networks only)")
    unknown = set(spec) - {"class_path", "init_args"}
    if unknown:
        raise ValueError(f"encode: field 'models.{name}': unknown key(s) {sorted(unknown)}")
    p = ArgumentParser(exit_on_error=False)
    p.add_class_arguments(cls, "init_args")
    try:
        cfg = p.parse_object({"init_args": spec.get("init_args") or {}})
    except Exception as e:  # jsonargparse names the offending key
        raise ValueError(f"encode: field 'models.{name}.init_args': {e}") from e
    return cls(**dict(p.instantiate_classes(cfg)["init_args"]))
