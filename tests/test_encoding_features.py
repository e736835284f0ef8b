"""Feature networks, the predict path and the feature cache of the encoding stage (tiny models, CPU)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch

from data_modules.stimuli import StimulusDataModule, stimulus_items
from neurovision.data.events import EventStore, EventStoreWriter, default_bins
from neurovision.encoding.features import FeatureTable, cache_entries, extract_features
from neurovision.pretrained.feature_networks import (
    FeatureNetwork,
    HFTextNetwork,
    OpenClipNetwork,
    PhantomOracle,
    TimmVisionNetwork,
)

assert os.environ.get("HF_HUB_OFFLINE") == "1"  # set by conftest before anything imports huggingface_hub

SENTENCES = ["the cat sat on the mat", "a dog runs in the park", "she looks at the sea", "why"]
K = 3


def _write_store(path: Path, *, fingerprint: str = "fp-1", annotations: bool = True, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, size=(5, 20, 24, 3), dtype=np.uint8)
    bins = default_bins(5, -0.1, 0.1)
    with EventStoreWriter(path, source="test", converter_version="0", options={}, fingerprint=fingerprint) as w:
        w.set_bins(bins, window=0.05, sampling_rate=100.0)
        w.set_stimuli(frames, [f"m@{i}" for i in range(5)], SENTENCES)
        # frame 4 and sentence 3 are used by no event: they must not be extracted
        plan = {"s1": {"language": ([0, 1, 1, 2], [0, 1, 2, 2]), "vision": ([3, 0], [1, 0])},
                "s2": {"language": ([2, 0], [2, 0])}}
        for name, sets in plan.items():
            w.add_subject(name, electrodes=["a1", "a2"], coords=np.zeros((2, 3)))
            for es, (fr, se) in sets.items():
                n = len(fr)
                w.add_events(name, es, time=np.arange(n, dtype=float), trial=np.zeros(n), movie=["m"] * n,
                             frame=np.array(fr), sentence=np.array(se), targets=np.zeros((n, 2, len(bins))))
        if annotations:
            w.set_annotations("frame_concepts", rng.random((5, K)).round(3).tolist())
            w.set_annotations("sentence_concepts", rng.integers(0, 2, (len(SENTENCES), K)).astype(float).tolist())
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_store(tmp_path_factory.mktemp("events") / "events.h5")


@pytest.fixture(scope="module")
def clip_config(tmp_path_factory: pytest.TempPathFactory) -> str:
    cfg = {"embed_dim": 32,
           "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    p = tmp_path_factory.mktemp("clip") / "micro_clip.json"
    p.write_text(json.dumps(cfg))
    return str(p)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """A tiny BERT with a trained byte-level BPE tokenizer, saved to a folder; returns (folder, model)."""
    from transformers import BertConfig, BertModel

    from neurovision.tiny.llm import train_tokenizer

    tok = train_tokenizer(SENTENCES * 4, vocab_size=300)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64, pad_token_id=tok.pad_token_id)
    torch.manual_seed(123)  # not the networks' default seed 0: trained != random-seed0
    model = BertModel(cfg).eval()
    out = tmp_path_factory.mktemp("hf") / "tiny_bert"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out, model


def _all_events(store: Path) -> tuple[np.ndarray, np.ndarray]:
    es = EventStore(store)
    fr = np.concatenate([es.events(s, e).frame for s in es.subject_names for e in es.event_sets(s)])
    se = np.concatenate([es.events(s, e).sentence for s in es.subject_names for e in es.event_sets(s)])
    return fr.astype(np.int64), se.astype(np.int64)


def _batch(store: Path, frames: list[int] | None = None, sentences: list[int] | None = None) -> dict[str, Any]:
    es = EventStore(store)
    b: dict[str, Any] = {}
    n = len(frames if frames is not None else sentences)  # type: ignore[arg-type]
    b["frame_index"] = torch.tensor(frames if frames is not None else [-1] * n)
    b["sentence_index"] = torch.tensor(sentences if sentences is not None else [-1] * n)
    if frames is not None:
        b["frames"] = torch.from_numpy(es.frames(frames))
    if sentences is not None:
        b["sentences"] = [es.sentences[i] for i in sentences]
    return b


class Counting(PhantomOracle):
    """The oracle, counting its extract calls (to prove the cache is used)."""

    def __init__(self, modality: str, tag: str = "") -> None:
        super().__init__(modality)  # type: ignore[arg-type]
        self.calls = 0
        self.tag = tag

    @property
    def model_id(self) -> str:
        return super().model_id + self.tag

    def extract(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        self.calls += 1
        return super().extract(batch)


class WideFeatures(FeatureNetwork):
    """A fixed random 200-d feature per frame (wide enough for a JL projection to reduce)."""

    def __init__(self) -> None:
        super().__init__()
        self.modality, self.layers, self.calls = "vision", ["x", "narrow"], 0
        self.table = torch.from_numpy(np.random.default_rng(1).normal(size=(5, 200)).astype(np.float32))

    @property
    def model_id(self) -> str:
        return "WideFeatures"

    def extract(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        self.calls += 1
        x = self.table[batch["frame_index"].cpu()]
        return {"x": x, "narrow": x[:, :4]}


# ------------------------------------------------------------------------------------------- items
def test_stimulus_items_are_the_unique_items_of_all_events(store: Path) -> None:
    fr, se = _all_events(store)
    es = EventStore(store)
    f, s = stimulus_items(es, "vision")
    assert f.tolist() == sorted(set(fr.tolist())) == [0, 1, 2, 3] and (s == -1).all()
    f, s = stimulus_items(es, "language")
    assert s.tolist() == sorted(set(se.tolist())) == [0, 1, 2] and (f == -1).all()
    f, s = stimulus_items(es, "multimodal")
    assert list(zip(f.tolist(), s.tolist(), strict=True)) == sorted(set(zip(fr.tolist(), se.tolist(), strict=True)))

    dm = StimulusDataModule(store, "multimodal", batch_size=3)
    assert dm._store is None  # opened lazily
    batches = list(dm.predict_dataloader())
    assert [len(b["frame_index"]) for b in batches] == [3, 2]
    b = batches[0]
    assert b["frames"].dtype == torch.uint8 and tuple(b["frames"].shape) == (3, 20, 24, 3)
    np.testing.assert_array_equal(b["frames"].numpy(), es.frames(b["frame_index"].numpy()))
    assert b["sentences"] == [es.sentences[i] for i in b["sentence_index"].tolist()]
    lang = next(iter(StimulusDataModule(store, "language").predict_dataloader()))
    assert "frames" not in lang and len(lang["sentences"]) == 3
    assert "sentences" not in next(iter(StimulusDataModule(store, "vision").predict_dataloader()))
    with pytest.raises(FileNotFoundError, match="nope.h5"):
        StimulusDataModule(store.parent / "nope.h5", "vision")


# ------------------------------------------------------------------------------------------- oracle + cache
def test_phantom_oracle_exact_through_the_trainer(store: Path, tmp_path: Path) -> None:
    es = EventStore(store)
    v = np.asarray(es.annotations("frame_concepts"), dtype=np.float32)
    lang = np.asarray(es.annotations("sentence_concepts"), dtype=np.float32)
    fr, se = _all_events(store)
    cache = tmp_path / "features.h5"
    expected = {"vision": v[fr], "language": lang[se],
                "multimodal": np.concatenate([v[fr], lang[se], v[fr] * lang[se]], 1)}
    for modality, want in expected.items():
        t = extract_features(store, PhantomOracle(modality), cache, batch_size=2,  # type: ignore[arg-type]
                             accelerator="cpu", progress=False)
        assert t.layers == ["concepts"] and t.modality == modality
        np.testing.assert_array_equal(t.event_features(fr, se), want)
        np.testing.assert_array_equal(t.event_features(fr, se, "concepts"), want)
    assert len(list(cache_entries(cache))) == 3  # one entry per model id, all kept


def test_phantom_oracle_needs_its_annotations(tmp_path: Path) -> None:
    bare = _write_store(tmp_path / "bare.h5", annotations=False)
    with pytest.raises(KeyError, match=r"bare\.h5.*frame_concepts"):
        PhantomOracle("vision").setup_store(EventStore(bare))
    with pytest.raises(KeyError, match="sentence_concepts"):
        PhantomOracle("language").setup_store(EventStore(bare))
    with pytest.raises(RuntimeError, match="setup_store"):
        PhantomOracle("vision").extract(_batch(bare, frames=[0]))


def test_cache_is_reused_and_invalidated(store: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache" / "features.h5"
    kw: dict[str, Any] = dict(batch_size=2, accelerator="cpu", progress=False)
    net = Counting("language")
    a = extract_features(store, net, cache, **kw)
    assert net.calls == 2  # 3 unique sentences in batches of 2
    b = extract_features(store, net, cache, **kw)
    assert net.calls == 2  # second call: read from the cache, the network does not run
    np.testing.assert_array_equal(a["concepts"], b["concepts"])
    assert b.model_id == net.model_id
    # another model id: runs again, and the first entry is kept
    other = Counting("language", tag="|v2")
    extract_features(store, other, cache, **kw)
    assert other.calls == 2
    assert {e["model_id"] for e in cache_entries(cache)} == {net.model_id, other.model_id}
    extract_features(store, net, cache, **kw)
    assert net.calls == 2
    # a corrupted entry is detected on read and recomputed
    with h5py.File(cache, "r+") as f:
        name = next(n for n, g in f["entries"].items() if g.attrs["model_id"] == net.model_id)
        f["entries"][name]["layers"]["concepts"][0, 0] = np.nan
    extract_features(store, net, cache, **kw)
    assert net.calls == 4
    # a re-prepared store (new fingerprint) invalidates it, and the old version's entries are pruned
    import shutil

    moved = tmp_path / "store.h5"
    shutil.copy(store, moved)
    extract_features(moved, net, cache, **kw)
    assert net.calls == 4  # a copy (same fingerprint) shares the entry
    _write_store(moved, fingerprint="fp-2")
    extract_features(moved, net, cache, **kw)
    assert net.calls == 6
    _write_store(moved, fingerprint="fp-3")
    extract_features(moved, net, cache, **kw)
    assert net.calls == 8
    fps = [e["store_fingerprint"] for e in cache_entries(cache) if e["store"] == str(moved.resolve())]
    assert fps == ["fp-3"]
    assert not list(cache.parent.glob("*.partial"))


def test_sparse_jl_projection(store: Path, tmp_path: Path) -> None:
    from sklearn.random_projection import SparseRandomProjection, johnson_lindenstrauss_min_dim

    cache = tmp_path / "f.h5"
    net = WideFeatures()
    raw = extract_features(store, net, cache, accelerator="cpu", progress=False)
    assert net.calls == 1 and raw.dim("x") == 200
    eps = 0.9
    t = extract_features(store, net, cache, accelerator="cpu", progress=False, projection="sparse_jl", jl_eps=eps,
                         seed=3)
    assert net.calls == 1  # projected from the cached raw features
    k = johnson_lindenstrauss_min_dim(raw.n_items, eps=eps)
    assert 4 < k < 200 and t.dim("x") == k
    assert t.dim("narrow") == 4  # already narrower than k: kept as is
    want = SparseRandomProjection(n_components=k, random_state=3, dense_output=True).fit_transform(
        raw["x"].astype(np.float64))
    np.testing.assert_allclose(t["x"], want, rtol=1e-5, atol=1e-6)
    again = extract_features(store, net, cache, accelerator="cpu", progress=False, projection="sparse_jl",
                             jl_eps=eps, seed=3)
    np.testing.assert_array_equal(again["x"], t["x"])
    other = extract_features(store, net, cache, accelerator="cpu", progress=False, projection="sparse_jl",
                             jl_eps=eps, seed=4)
    assert net.calls == 1 and not np.allclose(other["x"], t["x"])
    assert len(list(cache_entries(cache))) == 3
    with pytest.raises(ValueError, match="several layers"):
        t.event_features(np.array([0]), np.array([0]))


def test_event_features_mapping_and_missing_items() -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    t = FeatureTable("m", "multimodal", np.array([0, 2, 2]), np.array([5, 1, 7]), {"a": x})
    np.testing.assert_array_equal(t.event_features(np.array([2, 0, 2, 2]), np.array([7, 5, 1, 7])),
                                  x[[2, 0, 1, 2]])
    with pytest.raises(KeyError, match=r"\(frame 2, sentence 5\)"):
        t.event_features(np.array([0, 2]), np.array([5, 5]))
    v = FeatureTable("m", "vision", np.array([3, 1]), np.array([-1, -1]), {"a": x[:2]})
    np.testing.assert_array_equal(v.event_features(np.array([1, 3, 1]), np.array([9, 9, 9])), x[[1, 0, 1]])
    with pytest.raises(KeyError, match="frame 2"):
        v.event_features(np.array([2]), np.array([0]))
    with pytest.raises(KeyError, match="no layer 'b'"):
        v.event_features(np.array([1]), np.array([0]), "b")
    lang = FeatureTable("m", "language", np.array([-1]), np.array([4]), {"a": x[:1]})
    with pytest.raises(KeyError, match="sentence 0"):
        lang.event_features(np.array([4]), np.array([0]))


def test_features_stream_through_the_cache(store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Extraction writes each batch into the HDF5 entry as it comes, the projection writes blocks of rows, and a
    table reads a layer from the file when asked (it holds no features itself)."""
    import neurovision.encoding.features as features

    writes: list[tuple[str, int]] = []
    setitem = h5py.Dataset.__setitem__

    def spy(self: h5py.Dataset, key: Any, value: Any) -> None:
        if "/layers/" in self.name:
            writes.append((self.name.rsplit("/", 1)[1], len(np.atleast_2d(value))))
        setitem(self, key, value)

    monkeypatch.setattr(h5py.Dataset, "__setitem__", spy)
    cache = tmp_path / "f.h5"
    net = Counting("multimodal")
    t = extract_features(store, net, cache, batch_size=2, accelerator="cpu", progress=False)
    n = t.n_items
    assert n == 5 and net.calls == 3
    assert writes == [("concepts", 2), ("concepts", 2), ("concepts", 1)]  # one write per batch, none whole
    # the JL projection of a cached raw layer: blocks of rows (here 2 rows of 200 float64 per block)
    monkeypatch.setattr(features, "_ROW_BYTES", 2 * 200 * 8)
    writes.clear()
    wide = extract_features(store, WideFeatures(), cache, batch_size=4, accelerator="cpu", progress=False,
                            projection="sparse_jl", jl_eps=0.9)
    # 4 frames: one batch of raw features, then the projection in 2 blocks of 2 rows
    assert [w for w in writes if w[0] == "x"] == [("x", 4), ("x", 2), ("x", 2)]
    assert wide.dim("x") < 200
    # a table reads from the file: a change there shows in the next read
    fr, se = _all_events(store)
    before = t.event_features(fr, se)
    with h5py.File(cache, "r+") as f:
        name = next(k for k, g in f["entries"].items() if g.attrs["model_id"] == net.model_id)
        f["entries"][name]["layers"]["concepts"][:] += 1.0
    np.testing.assert_allclose(t.event_features(fr, se), before + 1.0)
    assert not any(isinstance(v, np.ndarray) and v.ndim == 2 for v in vars(t).values())


# ------------------------------------------------------------------------------------------- open_clip
def test_open_clip_network(store: Path, clip_config: str, tmp_path: Path) -> None:
    def net(**kw: Any) -> OpenClipNetwork:
        return OpenClipNetwork("micro", model_config=clip_config, **{"trained": False, **kw})

    frames, sentences = [0, 1, 3], [2, 0, 1]
    batch = _batch(store, frames, sentences)
    vis = net(modality="vision", layers=["embedding", "visual.transformer.resblocks.1", "visual.conv1"])
    fv = vis.extract(_batch(store, frames=frames))
    assert {k: tuple(v.shape) for k, v in fv.items()} == {
        "embedding": (3, 32), "visual.transformer.resblocks.1": (3, 32), "visual.conv1": (3, 32)}
    torch.testing.assert_close(fv["embedding"].norm(dim=1), torch.ones(3))
    # a hooked layer is the module's output, pooled (mean over tokens / spatial positions)
    x = vis.preprocess(batch["frames"])
    torch.testing.assert_close(fv["visual.conv1"], vis.model.visual.conv1(x).mean((2, 3)))
    txt = net(modality="language", layers=["embedding", "transformer.resblocks.0"])
    ft = txt.extract(_batch(store, sentences=sentences))
    assert tuple(ft["embedding"].shape) == (3, 32) and tuple(ft["transformer.resblocks.0"].shape) == (3, 32)

    mm = {f: net(fusion=f).extract(batch)["embedding"] for f in ("concat", "product", "concat_product")}
    img, te = fv["embedding"], ft["embedding"]
    torch.testing.assert_close(mm["concat"], torch.cat([img, te], 1))
    torch.testing.assert_close(mm["product"].sum(1), torch.nn.functional.cosine_similarity(img, te))
    torch.testing.assert_close(mm["concat_product"], torch.cat([mm["concat"], mm["product"]], 1))
    assert len({net(fusion=f).model_id for f in ("concat", "product")}) == 2

    # trained = the saved weights; random init differs; ids say which
    ckpt = tmp_path / "clip.pt"
    torch.save(vis.model.state_dict(), ckpt)
    loaded = net(modality="vision", trained=True, checkpoint=str(ckpt))
    torch.testing.assert_close(loaded.extract(_batch(store, frames=frames))["embedding"], img)
    other = net(modality="vision", seed=1)
    assert not torch.allclose(other.extract(_batch(store, frames=frames))["embedding"], img)
    control = net(modality="vision", trained=False, checkpoint=str(ckpt), seed=1)  # random even with a checkpoint
    torch.testing.assert_close(control.extract(_batch(store, frames=frames))["embedding"],
                               other.extract(_batch(store, frames=frames))["embedding"])
    assert "random-seed1" in control.model_id and "sha256:" in loaded.model_id
    assert len({vis.model_id, loaded.model_id, other.model_id}) == 3

    with pytest.raises(FileNotFoundError, match=r"missing\.pt.*init_args\.checkpoint"):
        net(trained=True, checkpoint=str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="no module named"):
        net(layers=["visual.nope"])
    with pytest.raises(ValueError, match="vision tower"):
        net(modality="language", layers=["visual.conv1"])


def test_open_clip_through_extract_features(store: Path, clip_config: str, tmp_path: Path) -> None:
    net = OpenClipNetwork("micro", model_config=clip_config, trained=False, modality="multimodal",
                          fusion="concat_product")
    t = extract_features(store, net, tmp_path / "f.h5", batch_size=4, accelerator="cpu", progress=True)
    fr, se = _all_events(store)
    direct = net.extract(_batch(store, fr.tolist(), se.tolist()))["embedding"].numpy()
    got = t.event_features(fr, se)
    assert got.shape == (len(fr), 96) and got.dtype == np.float32
    np.testing.assert_allclose(got, direct, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------- timm
def test_timm_vision_network(store: Path, tmp_path: Path) -> None:
    frames = [0, 2, 3]
    b = _batch(store, frames=frames)
    rand = TimmVisionNetwork("test_resnet", trained=False, layers=["pooled", "layer2"], image_size=32)
    f = rand.extract(b)
    x = rand.preprocess(b["frames"])
    assert tuple(x.shape) == (3, 3, 32, 32)
    assert tuple(f["pooled"].shape) == (3, rand.model.num_features)
    m = rand.model
    h = m.layer2(m.layer1(m.maxpool(m.act1(m.bn1(m.conv1(x))))))
    torch.testing.assert_close(f["layer2"], h.mean((2, 3)))
    assert rand.modality == "vision" and "random-seed0" in rand.model_id

    sd = dict(rand.model.state_dict())
    sd["fc.weight"] = torch.zeros(10, rand.model.num_features)  # a classifier head the headless model ignores
    ckpt = tmp_path / "resnet.pth"
    torch.save(sd, ckpt)
    trained = TimmVisionNetwork("test_resnet", checkpoint=str(ckpt), layers=["pooled", "layer2"], image_size=32)
    g = trained.extract(b)
    for k in f:
        torch.testing.assert_close(g[k], f[k])
    from safetensors.torch import save_file

    st = tmp_path / "resnet.safetensors"
    save_file({k: v.contiguous() for k, v in rand.model.state_dict().items()}, str(st))
    torch.testing.assert_close(TimmVisionNetwork("test_resnet", checkpoint=str(st), image_size=32).extract(b)[
        "pooled"], f["pooled"])
    other = TimmVisionNetwork("test_resnet", trained=False, seed=1, image_size=32)
    assert not torch.allclose(other.extract(b)["pooled"], f["pooled"])
    assert TimmVisionNetwork("test_resnet", trained=False, image_size=48).model_id != other.model_id

    with pytest.raises(FileNotFoundError, match=r"nope\.pth.*init_args\.checkpoint"):
        TimmVisionNetwork("test_resnet", checkpoint=str(tmp_path / "nope.pth"))
    with pytest.raises(ValueError, match="trained: false"):
        TimmVisionNetwork("test_resnet")
    with pytest.raises(ValueError, match="no module named"):
        TimmVisionNetwork("test_resnet", trained=False, layers=["layer9"])


# ------------------------------------------------------------------------------------------- Hugging Face
def test_hf_text_network(store: Path, hf_folder: tuple[Path, Any], tmp_path: Path) -> None:
    folder, model = hf_folder
    sentences = [0, 3, 1]
    b = _batch(store, sentences=sentences)
    net = HFTextNetwork(str(folder), layers=["last", "hidden_states.0", "hidden_states.-1"])
    f = net.extract(b)
    assert {k: tuple(v.shape) for k, v in f.items()} == {k: (3, 16) for k in net.layers}
    torch.testing.assert_close(f["last"], f["hidden_states.-1"])
    # equals the in-memory model that was saved, mean-pooled over non-padding tokens
    enc = net.tokenizer(b["sentences"], padding=True, return_tensors="pt")
    assert (enc["attention_mask"] == 0).any()  # padding present, and excluded below
    with torch.no_grad():
        h = model(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    torch.testing.assert_close(f["last"], (h * m).sum(1) / m.sum(1))
    cls = HFTextNetwork(str(folder), pooling="cls").extract(b)["last"]
    torch.testing.assert_close(cls, h[:, 0])
    rand = HFTextNetwork(str(folder), trained=False)
    assert not torch.allclose(rand.extract(b)["last"], f["last"])
    torch.testing.assert_close(rand.extract(b)["last"], HFTextNetwork(str(folder), trained=False).extract(b)["last"])
    assert rand.modality == "language" and "random-seed0" in rand.model_id and "sha256:" in net.model_id
    assert len({net.model_id, rand.model_id, HFTextNetwork(str(folder), pooling="cls").model_id}) == 3

    with pytest.raises(FileNotFoundError, match=r"no_model.*init_args\.path"):
        HFTextNetwork(str(tmp_path / "no_model"))
    with pytest.raises(ValueError, match="hidden_states"):
        HFTextNetwork(str(folder), layers=["hidden_states.7"])


@pytest.fixture(scope="module")
def flava_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """A tiny FLAVA (image, text and fused multimodal encoders) with its processor, saved to a folder."""
    from transformers import BertTokenizerFast, FlavaConfig, FlavaImageProcessor, FlavaModel, FlavaProcessor

    out = tmp_path_factory.mktemp("flava") / "tiny_flava"
    words = sorted({w for s in SENTENCES for w in s.split()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})
    assert tok.unk_token_id not in tok(SENTENCES[0])["input_ids"]
    ip = FlavaImageProcessor(size={"height": 16, "width": 16}, do_center_crop=False)
    small = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32}
    cfg = FlavaConfig(image_config={**small, "image_size": 16, "patch_size": 8},
                      text_config={**small, "vocab_size": len(tok), "max_position_embeddings": 32},
                      multimodal_config=small, projection_dim=8, hidden_size=16)
    torch.manual_seed(7)
    model = FlavaModel(cfg).eval()
    model.save_pretrained(out)
    FlavaProcessor(image_processor=ip, tokenizer=tok).save_pretrained(out)
    return out, model


def test_hf_fused_network(store: Path, flava_folder: tuple[Path, Any], tmp_path: Path) -> None:
    from neurovision.pretrained.feature_networks import HFFusedNetwork

    folder, model = flava_folder
    net = HFFusedNetwork(str(folder), layers=["multimodal", "image", "text", "multimodal_model.encoder"])
    assert net.modality == "multimodal"
    es = EventStore(store)
    frames = torch.from_numpy(es.frames([0, 2]))
    batch = {"frames": frames, "sentences": SENTENCES[:2], "frame_index": torch.tensor([0, 2]),
             "sentence_index": torch.tensor([0, 1])}
    got = net.extract(batch)
    assert {k: tuple(v.shape) for k, v in got.items()} == {k: (2, 16) for k in got}
    # equals the saved model run by hand on the processor's inputs (cls pooling of the fused encoder)
    enc = net.processor(text=SENTENCES[:2], images=list(frames.numpy()), return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = model(**enc, return_dict=True)
    torch.testing.assert_close(got["multimodal"], ref.multimodal_embeddings[:, 0])
    torch.testing.assert_close(got["image"], ref.image_embeddings[:, 0])
    # the fused feature depends on the sentence paired with the frame (the text towers' own does not see it)
    other = net.extract({**batch, "sentences": SENTENCES[1::-1]})
    assert not torch.allclose(other["multimodal"][0], got["multimodal"][0])
    torch.testing.assert_close(other["image"], got["image"])
    rand = HFFusedNetwork(str(folder), trained=False)
    assert "random-seed0" in rand.model_id and rand.model_id != HFFusedNetwork(str(folder)).model_id
    assert not torch.allclose(rand.extract(batch)["multimodal"], got["multimodal"])
    table = extract_features(store, HFFusedNetwork(str(folder), pooling="mean"), tmp_path / "c.h5",
                             batch_size=4, accelerator="cpu", progress=False)
    fr, se = _all_events(store)
    assert table.event_features(fr, se).shape == (len(fr), 16)
    with pytest.raises(FileNotFoundError, match="HFFusedNetwork"):
        HFFusedNetwork(str(tmp_path / "none"))
    with pytest.raises(ValueError, match="no_such"):
        HFFusedNetwork(str(folder), layers=["no_such.module"])
