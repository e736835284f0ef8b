"""Feature spaces of the encoding stage, cached per store: :func:`extract_features` and :class:`FeatureTable`.

Subramaniam et al. (ICML 2024) predict SEEG responses around movie events from the features of unimodal
vision, unimodal language and multimodal networks, each trained or randomly initialised. The pieces live one
idea per module:

- the feature networks (``model_id``, ``modality``, ``layers``, ``extract(batch)``):
  :mod:`neurovision.pretrained.feature_networks`;
- the unique stimulus items of a store (frames, sentences or (frame, sentence) pairs):
  :class:`data_modules.stimuli.StimulusDataModule`;
- the Lightning predict step running a network on them: :class:`neurovision.tasks.features.FeatureExtractor`.

This module ties them together: :func:`extract_features` runs a ``lightning.Trainer`` (any accelerator),
writing each batch's features into the HDF5 cache as it comes (never the whole (items x dims) array of a layer
in memory), and optionally reduces each layer with a seeded sparse Johnson-Lindenstrauss projection (in blocks
of rows). :class:`FeatureTable` gives the features of every item, read from the cache one layer at a time when
asked for, and :meth:`FeatureTable.event_features` maps events (frame and sentence index arrays) to their
item's features.

Cache file layout (``FEATURES_SCHEMA_VERSION`` 2: every array carries HDF5's Fletcher32 checksum per chunk; an
entry failing it, like a cache of an older version, is stale: a warning naming the layer and rows, then recomputed)::

    /                                   attrs: schema="neurovision.features", schema_version
    /entries/<sha256(key)[:32]>         attrs: model_id, modality, layers (JSON), projection (JSON),
                                               store, store_fingerprint, n_items, complete, created
      frame_index      int64 (N,)       item keys: row of /stimuli/frames (-1: not used by the modality)
      sentence_index   int64 (N,)       row of /stimuli/sentences (-1: not used)
      layers/<layer>   float32 (N, D)   attrs: layer, input_dim, projected

The key is (model id, projection parameters, store fingerprint): a re-prepared store (new fingerprint) or
another network invalidates an entry. The raw (unprojected) features are always cached too, so a new
projection of an already extracted network does not run the network again. Writes follow the protocol of every
neurovision entry cache (:class:`neurovision.data.cache.EntryCache`): they copy the other still-valid entries
into a new file (``neurovision.data.atomic.atomic_path``) under an exclusive lock on ``<cache>.lock``;
entries of an earlier version of the *same* store (same path, other fingerprint) are pruned on write. Memory:
one batch of features while extracting, blocks of ~16 MB of rows while validating, projecting or copying, and
one layer (items x D float32, e.g. 30k x 4096 = 0.5 GB) while a caller uses it; the copy makes adding an
entry cost a read and a write of the whole cache file on disk.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, cast

import h5py
import lightning as L
import numpy as np
import torch

from data_modules.stimuli import StimulusDataModule
from neurovision.data.cache import (
    EntryCache,
    checksum_problem,
    entry_problem,
    finish_entry,
    json_digest,
    plain,
    start_entry,
    store_key,
)
from neurovision.data.events import EventStore
from neurovision.data.store import first_bad_rows
from neurovision.pretrained.feature_networks import MODALITIES, FeatureNetwork, check_modality
from neurovision.tasks.features import FeatureExtractor

log = logging.getLogger("neurovision.encoding.features")

FEATURES_SCHEMA = "neurovision.features"
#: 2: arrays checksummed (Fletcher32); version-1 caches are rebuilt
FEATURES_SCHEMA_VERSION = 2


class FeatureTable:
    """Features of the unique stimulus items of a store, for one network (and projection).

    ``features`` maps layer names to (n_items, D) arrays: in memory (a dict), or, as
    :func:`extract_features` returns it, the layers of an HDF5 cache entry that are read from the file when
    asked for (:meth:`__getitem__`, :meth:`event_features`): a table holds no features itself, and a caller
    holds one layer at a time (n_items x D float32).
    """

    def __init__(self, model_id: str, modality: str, frame_index: np.ndarray, sentence_index: np.ndarray,
                 features: Mapping[str, np.ndarray], projection: dict[str, Any] | None = None) -> None:
        self.model_id, self.modality = model_id, check_modality(modality)
        self.frame_index = np.asarray(frame_index, dtype=np.int64)
        self.sentence_index = np.asarray(sentence_index, dtype=np.int64)
        self.features = features if isinstance(features, _H5Layers) else dict(features)
        self.projection = dict(projection or {"kind": "none"})
        n = len(self.frame_index)
        shapes = getattr(features, "shapes", None)
        self._shapes: dict[str, tuple[int, ...]] = dict(shapes) if shapes is not None else \
            {k: tuple(np.shape(v)) for k, v in self.features.items()}
        for name, shape in self._shapes.items():
            if len(shape) != 2 or shape[0] != n:
                raise ValueError(f"layer {name!r}: shape {shape}, expected ({n}, D)")
        key = self._keys(self.frame_index, self.sentence_index)
        self._order = np.argsort(key, kind="stable")
        self._sorted = key[self._order]
        if len(self._sorted) > 1 and (np.diff(self._sorted) == 0).any():
            raise ValueError("FeatureTable: duplicate items")

    @property
    def layers(self) -> list[str]:
        return list(self._shapes)

    @property
    def n_items(self) -> int:
        return len(self.frame_index)

    def dim(self, layer: str | None = None) -> int:
        return int(self._shapes[self._layer(layer)][1])

    def __getitem__(self, layer: str) -> np.ndarray:
        return self.features[self._layer(layer)]

    def __repr__(self) -> str:
        dims = {k: v[1] for k, v in self._shapes.items()}
        return f"FeatureTable({self.model_id}, {self.n_items} {self.modality} items, dims={dims})"

    def _layer(self, layer: str | None) -> str:
        if layer is None:
            if len(self._shapes) != 1:
                raise ValueError(f"{self.model_id}: several layers {self.layers}; name one")
            return next(iter(self._shapes))
        if layer not in self._shapes:
            raise KeyError(f"{self.model_id}: no layer {layer!r} (has {self.layers})")
        return layer

    def _keys(self, frame: np.ndarray, sentence: np.ndarray) -> np.ndarray:
        if self.modality == "vision":
            return frame
        if self.modality == "language":
            return sentence
        return frame * (1 << 32) + sentence

    def rows(self, frame: np.ndarray, sentence: np.ndarray) -> np.ndarray:
        """Row of each event's item (KeyError naming the first item without features)."""
        frame = np.asarray(frame, dtype=np.int64).reshape(-1)
        sentence = np.asarray(sentence, dtype=np.int64).reshape(-1)
        if self.modality == "multimodal" and len(frame) != len(sentence):
            raise ValueError(f"frame ({len(frame)}) and sentence ({len(sentence)}) differ in length")
        key = self._keys(frame, sentence)
        pos = np.clip(np.searchsorted(self._sorted, key), 0, max(len(self._sorted) - 1, 0))
        ok = (self._sorted[pos] == key) if len(self._sorted) else np.zeros(len(key), bool)
        if not ok.all():
            i = int(np.flatnonzero(~ok)[0])
            item = {"vision": f"frame {frame[i]}", "language": f"sentence {sentence[i]}",
                    "multimodal": f"(frame {frame[i]}, sentence {sentence[i]})"}[self.modality]
            raise KeyError(f"{self.model_id}: no features for {item} (event {i}); the table covers "
                           f"{self.n_items} items")
        return self._order[pos]

    def event_features(self, frame: np.ndarray, sentence: np.ndarray, layer: str | None = None) -> np.ndarray:
        """(E, D) features of events given their frame and sentence indices (vision uses the frame, language
        the sentence, multimodal the pair); reads the one layer (n_items x D) when the table is a cache's."""
        rows = self.rows(frame, sentence)
        return self.features[self._layer(layer)][rows]


# --------------------------------------------------------------------------------------------- cache
def _entry_name(model_id: str, projection: dict[str, Any], fingerprint: str) -> str:
    return json_digest({"model_id": model_id, "projection": projection, "store": fingerprint})[:32]


def cache_file(path: str | Path) -> EntryCache:
    """The feature cache at ``path`` as an :class:`~neurovision.data.cache.EntryCache` (schema, version, messages)."""
    return EntryCache(path, FEATURES_SCHEMA, FEATURES_SCHEMA_VERSION, kind="feature cache", id_attr="model_id",
                      logger=log)


_ROW_BYTES = 16 << 20  # bytes per block of rows when streaming features through the cache


def _row_block(d: int, itemsize: int = 8) -> int:
    return int(max(1, _ROW_BYTES // max(1, d * itemsize)))


class _H5Layers(Mapping):
    """The layers of a cache entry, each read from the HDF5 file when asked for (never held by this object)."""

    def __init__(self, path: Path, entry: str, shapes: dict[str, tuple[int, ...]], created: str, model_id: str
                 ) -> None:
        self.path, self.entry, self.shapes, self.created, self.model_id = path, entry, shapes, created, model_id

    def __getitem__(self, layer: str) -> np.ndarray:
        if layer not in self.shapes:
            raise KeyError(layer)
        with h5py.File(self.path, "r") as f:
            g = f.get(f"entries/{self.entry}")
            if g is None or plain(g.attrs.get("created")) != self.created:
                raise RuntimeError(f"{self.path}: the cached features of {self.model_id} were replaced or removed "
                                   "since they were opened; call extract_features again")
            ds = g["layers"][layer]
            try:
                return ds[()]
            except OSError as e:  # damaged after it was validated: one line, and the next extraction recomputes
                raise RuntimeError(f"{self.path}: layer {layer!r} of the cached features of {self.model_id}: "
                                   f"{first_bad_rows(ds) or e}; the file is damaged: call extract_features again "
                                   "(it recomputes the entry)") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def _all_finite(ds: h5py.Dataset) -> bool:
    """Every value of a (n, d) dataset is finite, read in blocks of rows."""
    n, d = ds.shape
    step = _row_block(d, ds.dtype.itemsize)
    return all(np.isfinite(ds[r0:r0 + step]).all() for r0 in range(0, n, step))


def _read_entry(path: Path, name: str, *, model_id: str, projection: dict[str, Any], fingerprint: str,
                items: tuple[np.ndarray, np.ndarray], layers: Sequence[str], quiet: bool = False
                ) -> _H5Layers | None:
    """The layers of a valid cache entry (read lazily; validated here block by block, bounded memory), or None
    (with a warning saying why, unless ``quiet``)."""

    def stale(why: str) -> None:
        if not quiet:
            log.warning("%s: cached features of %s are unusable (%s); recomputing", path, model_id, why)

    def use(g: Any) -> _H5Layers | None:
        why = entry_problem(g, id_attr="model_id", id_value=model_id, fingerprint=fingerprint)
        if why is not None:
            stale(why)
            return None
        a = g.attrs
        if json.loads(plain(a.get("projection", "{}"))) != projection:
            stale("another projection")
            return None
        fi, si = g["frame_index"][:], g["sentence_index"][:]
        if not (np.array_equal(fi, items[0]) and np.array_equal(si, items[1])):
            stale(f"its {len(fi)} items differ from the store's {len(items[0])}")
            return None
        shapes: dict[str, tuple[int, ...]] = {}
        for layer in layers:
            key = f"layers/{layer}"
            if key not in g:
                stale(f"layer {layer!r} missing")
                return None
            ds = g[key]
            if (why := checksum_problem(ds)) is not None:
                stale(f"layer {layer!r} has {why}")
                return None
            try:
                finite = _all_finite(ds)
            except OSError:
                stale(f"layer {layer!r}: {first_bad_rows(ds) or 'unreadable'} (the file is damaged)")
                return None
            if ds.ndim != 2 or ds.shape[0] != len(fi) or not finite:
                stale(f"layer {layer!r} has shape {ds.shape} or non-finite values")
                return None
            shapes[layer] = tuple(ds.shape)
        return _H5Layers(path, name, shapes, str(plain(a.get("created"))), model_id)

    return cache_file(path).read(name, use, quiet=quiet)


def _rewrite(path: Path, store: EventStore, fingerprint: str, replace: set[str]
             ) -> contextlib.AbstractContextManager[h5py.Group]:
    """A new cache file (written atomically over ``path`` when the block succeeds) holding the other valid
    entries of the old one (all but ``replace``, incomplete ones and those of an earlier version of the same
    store); yields its ``/entries`` group for the block to add entries to."""
    store_path = str(store.path.resolve())

    def prune(a: Any) -> str | None:
        if a.get("store") == store_path and a.get("store_fingerprint") != fingerprint:
            return f"features of an earlier version of {store_path}"
        return None

    return cache_file(path).rewrite(replace=replace, prune=prune)


def _new_entry(entries: h5py.Group, name: str, *, model_id: str, modality: str, items: tuple[np.ndarray, np.ndarray],
               projection: dict[str, Any], store: EventStore, fingerprint: str) -> h5py.Group:
    """An empty entry (``complete`` false until :func:`_finish_entry`)."""
    g = start_entry(entries.create_group(name))
    for key, values in (("frame_index", items[0]), ("sentence_index", items[1])):
        g.create_dataset(key, data=values.astype(np.int64), fletcher32=bool(len(values)))
    g.create_group("layers")
    g.attrs["model_id"] = model_id
    g.attrs["modality"] = modality
    g.attrs["projection"] = json.dumps(projection, sort_keys=True)
    g.attrs["store"] = str(store.path.resolve())
    g.attrs["store_fingerprint"] = fingerprint
    g.attrs["n_items"] = len(items[0])
    return g


def _new_layer(g: h5py.Group, layer: str, n: int, d: int, input_dim: int) -> h5py.Dataset:
    if "/" in layer:
        raise ValueError(f"layer name {layer!r} contains '/'")
    rows = int(max(1, min(n, (1 << 20) // max(1, d * 4))))
    ds = g["layers"].create_dataset(layer, shape=(n, d), dtype=np.float32, chunks=(rows, d) if n else None,
                                    fletcher32=bool(n and d))
    ds.attrs["layer"] = layer
    ds.attrs["input_dim"] = int(input_dim)
    ds.attrs["projected"] = bool(input_dim != d)
    return ds


def _finish_entry(g: h5py.Group, layers: Sequence[str]) -> None:
    finish_entry(g, layers=json.dumps(list(layers)))


class _EntryWriter(L.Callback):
    """Writes each predict batch's features into the entry's layer datasets as it comes (row blocks in item
    order), so no more than one batch of features is held in memory."""

    def __init__(self, group: h5py.Group, items: tuple[np.ndarray, np.ndarray], layers: Sequence[str],
                 owner: str) -> None:
        self.group, self.items, self.layers, self.owner = group, items, list(layers), owner
        self.offset = 0
        self.datasets: dict[str, h5py.Dataset] = {}

    def on_predict_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        fi, si = outputs["frame_index"].numpy(), outputs["sentence_index"].numpy()
        sl = slice(self.offset, self.offset + len(fi))
        if not (np.array_equal(fi, self.items[0][sl]) and np.array_equal(si, self.items[1][sl])):
            raise RuntimeError("feature extraction returned the items out of order")
        n_items = len(self.items[0])
        for layer in self.layers:
            x = outputs["features"][layer].numpy()
            if not np.isfinite(x).all():
                raise ValueError(f"{self.owner}: layer {layer!r} has NaN/inf features")
            ds = self.datasets.get(layer)
            if ds is None:
                ds = self.datasets[layer] = _new_layer(self.group, layer, n_items, x.shape[1], x.shape[1])
            elif x.shape[1] != ds.shape[1]:
                raise RuntimeError(f"{self.owner}: layer {layer!r} has {x.shape[1]} features in batch "
                                   f"{batch_idx}, {ds.shape[1]} before")
            ds[sl] = x
        self.offset = sl.stop
        outputs["features"].clear()  # written: nothing keeps the batch's features


def _run_network(dm: StimulusDataModule, network: FeatureNetwork, group: h5py.Group, accelerator: str,
                 devices: Any, progress: bool) -> None:
    """Run ``network`` over the datamodule's items, streaming each batch's layers into the entry ``group``."""
    owner = str(getattr(network, "model_id", network))
    trainer = L.Trainer(logger=False, enable_checkpointing=False, accelerator=accelerator, devices=devices,
                        enable_progress_bar=progress, enable_model_summary=False, num_nodes=1,
                        callbacks=[writer := _EntryWriter(group, dm.items, network.layers, owner)])
    if trainer.world_size != 1:
        raise ValueError(f"extract_features runs on one device (got devices={devices!r}, world size "
                         f"{trainer.world_size})")
    store = dm.store if isinstance(dm.store, EventStore) else None
    trainer.predict(FeatureExtractor(network, store), datamodule=dm, return_predictions=False)
    if writer.offset != len(dm.items[0]):
        raise RuntimeError(f"{owner}: feature extraction returned {writer.offset} of {len(dm.items[0])} items")


def _project_entry(src: h5py.Group, dst: h5py.Group, n_items: int, eps: float, seed: int) -> None:
    """Seeded sparse JL projection of each layer of ``src`` whose dim exceeds ``johnson_lindenstrauss_min_dim``
    into ``dst`` (others copied), in blocks of rows: the projection matrix depends on (k, dim, seed) only."""
    from sklearn.random_projection import SparseRandomProjection, johnson_lindenstrauss_min_dim

    k = int(johnson_lindenstrauss_min_dim(max(n_items, 1), eps=eps))
    for layer, ds in src["layers"].items():
        n, d = ds.shape
        if not (k < d and n > 0):
            dst["layers"].copy(ds, dst["layers"], name=layer)  # already narrow enough: kept as is
            continue
        rp = SparseRandomProjection(n_components=k, random_state=seed, dense_output=True)
        rp.fit(np.zeros((1, d)))
        out = _new_layer(dst, layer, n, k, d)
        step = _row_block(max(d, k))
        for r0 in range(0, n, step):
            out[r0:r0 + step] = np.asarray(rp.transform(ds[r0:r0 + step].astype(np.float64)), dtype=np.float32)


def extract_features(
    store: str | Path,
    network: torch.nn.Module,
    cache: str | Path,
    *,
    batch_size: int = 32,
    accelerator: str = "auto",
    devices: int | str | list[int] = 1,
    projection: Literal["none", "sparse_jl"] = "none",
    jl_eps: float = 0.5,
    seed: int = 0,
    progress: bool = True,
    num_workers: int = 0,
) -> FeatureTable:
    """Features of every item the events of ``store`` need, from ``network``, cached in ``cache`` (HDF5).

    Runs ``lightning.Trainer.predict`` (on ``accelerator``/``devices``, one device) over a
    :class:`StimulusDataModule` unless the cache holds a valid entry for (network id, projection, store
    fingerprint). ``projection="sparse_jl"`` maps each layer with a seeded
    :class:`~sklearn.random_projection.SparseRandomProjection` to ``johnson_lindenstrauss_min_dim(n_items,
    eps=jl_eps)`` dims when that is fewer than the layer's (the raw features are cached too, so another
    projection does not re-run the network).
    """
    if projection not in ("none", "sparse_jl"):
        raise ValueError(f"projection must be 'none' or 'sparse_jl', got {projection!r}")
    if projection == "sparse_jl" and not 0 < jl_eps < 1:
        raise ValueError(f"jl_eps must be in (0, 1), got {jl_eps}")
    model_id = getattr(network, "model_id", None)
    modality = getattr(network, "modality", None)
    layers = list(getattr(network, "layers", []) or [])
    if not isinstance(model_id, str) or modality not in MODALITIES or not layers:
        raise TypeError(f"{type(network).__name__} is not a feature network (needs model_id, modality, layers)")
    net = cast(FeatureNetwork, network)  # a FeatureNetwork or a module with its attributes (checked above)
    dm = StimulusDataModule(store, modality, batch_size=batch_size, num_workers=num_workers)
    es = dm.store
    fingerprint = store_key(es)  # the store's fingerprint, else the file's size and mtime
    items = dm.items
    path = Path(cache)
    raw_p: dict[str, Any] = {"kind": "none"}
    proj_p: dict[str, Any] = raw_p if projection == "none" else {"kind": "sparse_jl", "eps": float(jl_eps),
                                                                 "seed": int(seed)}
    raw_name = _entry_name(model_id, raw_p, fingerprint)
    name = _entry_name(model_id, proj_p, fingerprint)

    def read(entry: str, proj: dict[str, Any], quiet: bool = False) -> _H5Layers | None:
        return _read_entry(path, entry, projection=proj, model_id=model_id, fingerprint=fingerprint, items=items,
                           layers=layers, quiet=quiet)

    def new_entry(entries: h5py.Group, entry: str, proj: dict[str, Any]) -> h5py.Group:
        return _new_entry(entries, entry, projection=proj, model_id=model_id, modality=modality, items=items,
                          store=es, fingerprint=fingerprint)

    def table(feats: _H5Layers) -> FeatureTable:
        return FeatureTable(model_id, modality, items[0], items[1], feats, proj_p)

    hit = read(name, proj_p)
    if hit is not None:
        return table(hit)
    with cache_file(path).locked():
        hit = read(name, proj_p, quiet=True)
        if hit is not None:  # another process wrote it while we waited
            return table(hit)
        raw = read(raw_name, raw_p, quiet=True)
        if len(items[0]) == 0:
            raise ValueError(f"{dm.store_path}: no {modality} items to extract (no events?)")
        with _rewrite(path, es, fingerprint, replace={name} | ({raw_name} if raw is None else set())) as entries:
            if raw is None:
                g = new_entry(entries, raw_name, raw_p)
                _run_network(dm, net, g, accelerator, devices, progress)
                _finish_entry(g, layers)
            if projection == "sparse_jl":
                g = new_entry(entries, name, proj_p)
                _project_entry(entries[raw_name], g, len(items[0]), jl_eps, seed)
                _finish_entry(g, layers)
    hit = read(name, proj_p)
    if hit is None:
        raise RuntimeError(f"{path}: the features of {model_id} just written are unreadable")
    return table(hit)


def cache_entries(cache: str | Path) -> Iterator[dict[str, Any]]:
    """Attributes of every entry of a feature cache (``model_id``, ``projection``, ``store``, ...)."""
    yield from cache_file(cache).entries(
        lambda g: {"dims": {k: tuple(v.shape) for k, v in g["layers"].items()} if "layers" in g else {}})


__all__ = [
    "FEATURES_SCHEMA", "FEATURES_SCHEMA_VERSION", "FeatureTable", "cache_entries", "cache_file", "extract_features",
]
