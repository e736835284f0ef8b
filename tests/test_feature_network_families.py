"""The paper's other model families as feature networks, on tiny models built offline: an ALBEF / BLIP-style
cross-attention model (transformers' BlipForImageTextRetrieval) and the SLIP repository's SLIP / SimCLR checkpoints
(a tiny timm ViT and CLIP text tower saved in the released files' layout)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from neurovision.data.events import EventStore, EventStoreWriter, default_bins
from neurovision.encoding.features import extract_features
from neurovision.pretrained.feature_networks import HFCrossAttentionNetwork, SlipNetwork
from neurovision.pretrained.hooks import ForwardHooks

SENTENCES = ["the cat sat on the mat", "a dog runs in the park", "she looks at the sea"]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("events") / "events.h5"
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(4, 20, 24, 3), dtype=np.uint8)
    bins = default_bins(5, -0.1, 0.1)
    with EventStoreWriter(path, source="test", converter_version="0", options={}, fingerprint="fp") as w:
        w.set_bins(bins, window=0.05, sampling_rate=100.0)
        w.set_stimuli(frames, [f"m@{i}" for i in range(4)], SENTENCES)
        w.add_subject("s1", electrodes=["a1"], coords=np.zeros((1, 3)))
        fr, se = [0, 1, 2, 3, 1], [0, 1, 2, 0, 2]
        w.add_events("s1", "language", time=np.arange(5.0), trial=np.zeros(5), movie=["m"] * 5,
                     frame=np.array(fr), sentence=np.array(se), targets=np.zeros((5, 1, len(bins))))
    return path


def _pair_batch(store: Path, frames: list[int], sentences: list[int]) -> dict[str, Any]:
    es = EventStore(store)
    return {"frames": torch.from_numpy(es.frames(frames)), "sentences": [SENTENCES[i] for i in sentences],
            "frame_index": torch.tensor(frames), "sentence_index": torch.tensor(sentences)}


# --------------------------------------------------------------------------------------------- BLIP
@pytest.fixture(scope="module")
def blip_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """A tiny BLIP image-text matching model (ViT image encoder, BERT text encoder with cross-attention) and its
    processor, built from a config and saved to a folder."""
    from transformers import (
        BertTokenizerFast,
        BlipConfig,
        BlipForImageTextRetrieval,
        BlipImageProcessor,
        BlipProcessor,
    )

    out = tmp_path_factory.mktemp("blip") / "tiny_blip"
    words = sorted({w for s in SENTENCES for w in s.split()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})
    ip = BlipImageProcessor(size={"height": 16, "width": 16})
    small = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32}
    # BLIP initialises its vision tower with std 1e-10 (near-constant image tokens): 0.02 makes frames differ
    cfg = BlipConfig(vision_config={**small, "image_size": 16, "patch_size": 8, "initializer_range": 0.02},
                     text_config={**small, "vocab_size": len(tok), "max_position_embeddings": 32,
                                  "encoder_hidden_size": 16},
                     projection_dim=8, image_text_hidden_size=8)
    torch.manual_seed(7)
    model = BlipForImageTextRetrieval(cfg).eval()
    model.save_pretrained(out)
    BlipProcessor(image_processor=ip, tokenizer=tok).save_pretrained(out)
    return out, model


def test_cross_attention_network_blip(store: Path, blip_folder: tuple[Path, Any], tmp_path: Path) -> None:
    folder, model = blip_folder
    net = HFCrossAttentionNetwork(str(folder), layers=["multimodal", "image", "text", "text_encoder.encoder"])
    assert net.modality == "multimodal" and "blip" in net.model_id and "sha256:" in net.model_id
    batch = _pair_batch(store, [0, 2], [0, 1])
    got = net.extract(batch)
    assert {k: tuple(v.shape) for k, v in got.items()} == {k: (2, 16) for k in got}
    # the saved model run by hand: the [CLS] state of the text encoder attending over the image tokens
    enc = net.processor(text=batch["sentences"], images=list(batch["frames"].numpy()), return_tensors="pt",
                        padding=True)
    with torch.no_grad():
        ref = model(input_ids=enc["input_ids"], pixel_values=enc["pixel_values"],
                    attention_mask=enc["attention_mask"], use_itm_head=True, return_dict=True)
    torch.testing.assert_close(got["multimodal"], ref.question_embeds[:, 0])
    torch.testing.assert_close(got["image"], ref.last_hidden_state[:, 0])
    # the fused feature depends on the frame paired with the sentence; the text-only pass does not
    swapped = net.extract({**batch, "frames": batch["frames"].flip(0)})
    assert not torch.allclose(swapped["multimodal"], got["multimodal"])
    torch.testing.assert_close(swapped["text"], got["text"])
    rand = HFCrossAttentionNetwork(str(folder), trained=False)
    again = HFCrossAttentionNetwork(str(folder), trained=False)
    assert "random-seed0" in rand.model_id and rand.model_id != HFCrossAttentionNetwork(str(folder)).model_id
    assert not torch.allclose(rand.extract(batch)["multimodal"], got["multimodal"])
    torch.testing.assert_close(rand.extract(batch)["multimodal"], again.extract(batch)["multimodal"])
    assert "random-seed3" in HFCrossAttentionNetwork(str(folder), trained=False, seed=3).model_id
    table = extract_features(store, HFCrossAttentionNetwork(str(folder), pooling="mean"), tmp_path / "c.h5",
                             batch_size=2, accelerator="cpu", progress=False)
    es = EventStore(store)
    ev = es.events("s1", "language")
    assert table.event_features(ev.frame, ev.sentence).shape == (5, 16)
    with pytest.raises(FileNotFoundError, match="HFCrossAttentionNetwork"):
        HFCrossAttentionNetwork(str(tmp_path / "none"))
    with pytest.raises(ValueError, match="no_such"):
        HFCrossAttentionNetwork(str(folder), layers=["no_such.module"])


def test_cross_attention_network_refuses_other_layouts(tmp_path: Path) -> None:
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=8)).save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match=r"model_type 'bert'.*blip"):
        HFCrossAttentionNetwork(str(tmp_path / "bert"))


# --------------------------------------------------------------------------------------------- SLIP / SimCLR
VISION = {"embed_dim": 24, "depth": 2, "num_heads": 12, "patch_size": 8, "img_size": 16}  # 12 heads as SLIP's B/16


def _vision(seed: int) -> torch.nn.Module:
    import timm

    torch.manual_seed(seed)
    return timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, **VISION).eval()


def _clip_text(seed: int) -> Any:
    """A tiny open_clip CLIP (QuickGELU): its text tower has the parameter names of SLIP's (OpenAI CLIP's)."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(seed)
    return CLIP(embed_dim=8, vision_cfg=CLIPVisionCfg(layers=1, width=16, head_width=8, patch_size=8, image_size=16),
                text_cfg=CLIPTextCfg(context_length=16, vocab_size=49408, width=16, heads=8, layers=2),
                quick_gelu=True).eval()


def _ssl_head(seed: int, d: int = 24, mlp: int = 12, emb: int = 6) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for i, (a, b) in enumerate([(d, mlp), (mlp, mlp), (mlp, emb)], start=1):
        sd[f"image_mlp.layer{i}.weight"] = torch.randn(b, a, generator=g) / a ** 0.5
        sd[f"image_mlp.layer{i}.bias"] = torch.randn(b, generator=g) * 0.1
        if i < 3:
            sd[f"image_mlp.bn{i}.weight"] = 1 + 0.1 * torch.randn(b, generator=g)
            sd[f"image_mlp.bn{i}.bias"] = 0.1 * torch.randn(b, generator=g)
            sd[f"image_mlp.bn{i}.running_mean"] = 0.1 * torch.randn(b, generator=g)
            sd[f"image_mlp.bn{i}.running_var"] = 1 + torch.rand(b, generator=g)
            sd[f"image_mlp.bn{i}.num_batches_tracked"] = torch.tensor(100)
    return sd


TEXT_KEYS = {"token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias",
             "text_projection", "logit_scale"} | {
    f"transformer.resblocks.{i}.{k}" for i in range(2)
    for k in ("attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias",
              "ln_1.weight", "ln_1.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias",
              "ln_2.weight", "ln_2.bias")}


def _save(path: Path, sd: dict[str, torch.Tensor], model: str | None) -> Path:
    """A checkpoint as the SLIP repository's main.py writes it under DDP."""
    ckpt: dict[str, Any] = {"epoch": 25, "state_dict": {f"module.{k}": v for k, v in sd.items()}, "best_acc1": 0.0}
    if model is not None:
        ckpt["args"] = argparse.Namespace(model=model, ssl_mlp_dim=12, ssl_emb_dim=6, lr=3e-3)
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def slip_pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("slip")
    visual, clip = _vision(1), _clip_text(2)
    text = {k: v for k, v in clip.state_dict().items() if not k.startswith("visual.")}
    assert set(text) == TEXT_KEYS  # the layout of SLIP's text tower
    g = torch.Generator().manual_seed(3)
    image_projection = torch.randn(24, 8, generator=g) / 24 ** 0.5
    slip_sd = {**{f"visual.{k}": v for k, v in visual.state_dict().items()}, **text,
               "image_projection": image_projection, **_ssl_head(4)}
    simclr_visual = _vision(5)
    simclr_sd = {**{f"visual.{k}": v for k, v in simclr_visual.state_dict().items()}, **_ssl_head(6)}
    return {"slip": _save(root / "slip_base_25ep.pt", slip_sd, "SLIP_VITB16"),
            "simclr": _save(root / "simclr_base_25ep.pt", simclr_sd, "SIMCLR_VITB16"),
            "slip_no_args": _save(root / "slip_no_args.pt", slip_sd, None),
            "visual": visual, "simclr_visual": simclr_visual, "clip": clip, "image_projection": image_projection,
            "simclr_sd": simclr_sd, "root": root}


def _by_hand_pixels(net: SlipNetwork, frames: torch.Tensor) -> torch.Tensor:
    from neurovision.pretrained.teachers import resize_images

    x = resize_images(frames.permute(0, 3, 1, 2).float() / 255.0, 16, "bilinear", "shortest").clamp(0, 1)
    mean, std = torch.tensor(net.MEAN).view(1, 3, 1, 1), torch.tensor(net.STD).view(1, 3, 1, 1)
    return (x - mean) / std


def test_slip_network_loads_the_released_layout(store: Path, slip_pair: dict[str, Any]) -> None:
    batch = _pair_batch(store, [0, 2, 3], [0, 1, 2])
    vis = SlipNetwork(str(slip_pair["slip"]),
                      layers=["pooled", "embedding", "ssl", "visual.blocks.1", "image_mlp.relu2"])
    assert vis.model_name == "SLIP_VITB16" and vis.arch.image_size == 16 and vis.arch.vision_depth == 2
    got = vis.extract(batch)
    x = _by_hand_pixels(vis, batch["frames"])
    with torch.no_grad():
        pooled = slip_pair["visual"](x)
    torch.testing.assert_close(got["pooled"], pooled)
    torch.testing.assert_close(got["embedding"],
                               torch.nn.functional.normalize(pooled @ slip_pair["image_projection"], dim=-1))
    assert got["ssl"].shape == (3, 6) and got["visual.blocks.1"].shape == (3, 24)
    assert got["image_mlp.relu2"].shape == (3, 12)
    # language: the text tower equals open_clip's CLIP text tower with the same weights (same tokenizer)
    lang = SlipNetwork(str(slip_pair["slip"]), modality="language")
    clip = slip_pair["clip"]
    with torch.no_grad():
        ref = clip.encode_text(clip_tokens(batch["sentences"]), normalize=True)
    torch.testing.assert_close(lang.extract(batch)["embedding"], ref, rtol=1e-4, atol=1e-5)
    multi = SlipNetwork(str(slip_pair["slip"]), modality="multimodal", fusion="concat_product")
    m = multi.extract(batch)["embedding"]
    assert m.shape == (3, 24)
    torch.testing.assert_close(m[:, 16:], m[:, :8] * m[:, 8:16])
    assert len({vis.model_id, lang.model_id, multi.model_id}) == 3 and "sha256:" in vis.model_id
    # the model name may also be given (it must agree with the checkpoint's args), or come from it alone
    named = SlipNetwork(str(slip_pair["slip_no_args"]), model="SLIP_VITB16")
    torch.testing.assert_close(named.extract(batch)["pooled"], got["pooled"])


def clip_tokens(sentences: list[str]) -> torch.Tensor:
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=16)(sentences)


def test_simclr_network_and_the_pair(store: Path, slip_pair: dict[str, Any], tmp_path: Path) -> None:
    simclr = SlipNetwork(str(slip_pair["simclr"]), layers=["pooled", "ssl"])
    batch = _pair_batch(store, [1, 3], [0, 0])
    got = simclr.extract(batch)
    with torch.no_grad():
        pooled = slip_pair["simclr_visual"](_by_hand_pixels(simclr, batch["frames"]))
        sd = slip_pair["simclr_sd"]
        h = pooled
        for i in (1, 2):
            h = h @ sd[f"image_mlp.layer{i}.weight"].T + sd[f"image_mlp.layer{i}.bias"]
            h = (h - sd[f"image_mlp.bn{i}.running_mean"]) / torch.sqrt(sd[f"image_mlp.bn{i}.running_var"] + 1e-5)
            h = torch.relu(h * sd[f"image_mlp.bn{i}.weight"] + sd[f"image_mlp.bn{i}.bias"])
        ssl = h @ sd["image_mlp.layer3.weight"].T + sd["image_mlp.layer3.bias"]
    torch.testing.assert_close(got["pooled"], pooled)
    torch.testing.assert_close(got["ssl"], ssl, rtol=1e-4, atol=1e-5)
    # the controlled pair: the same architecture, so the same feature space shape, from other training
    slip = SlipNetwork(str(slip_pair["slip"]))
    tables = {name: extract_features(store, net, tmp_path / "pair.h5", batch_size=2, accelerator="cpu",
                                     progress=False) for name, net in (("slip", slip), ("simclr", simclr))}
    assert tables["slip"].dim("pooled") == tables["simclr"].dim("pooled") == 24
    assert tables["slip"].model_id != tables["simclr"].model_id
    assert not np.allclose(tables["slip"]["pooled"], tables["simclr"]["pooled"])


def test_slip_random_control_and_errors(store: Path, slip_pair: dict[str, Any], tmp_path: Path) -> None:
    batch = _pair_batch(store, [0, 1], [0, 1])
    trained = SlipNetwork(str(slip_pair["slip"]), modality="multimodal")
    rand = SlipNetwork(str(slip_pair["slip"]), modality="multimodal", trained=False)
    again = SlipNetwork(str(slip_pair["slip"]), modality="multimodal", trained=False)
    assert "random-seed0" in rand.model_id and rand.arch == trained.arch
    assert rand.model_id.replace("random-seed0", "") != trained.model_id
    torch.testing.assert_close(rand.extract(batch)["embedding"], again.extract(batch)["embedding"])
    assert not torch.allclose(rand.extract(batch)["embedding"], trained.extract(batch)["embedding"])
    other = SlipNetwork(str(slip_pair["slip"]), modality="multimodal", trained=False, seed=1)
    assert "random-seed1" in other.model_id
    assert not torch.allclose(other.extract(batch)["embedding"], rand.extract(batch)["embedding"])

    with pytest.raises(FileNotFoundError, match=r"init_args\.checkpoint"):
        SlipNetwork(str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match=r"init_args\.checkpoint"):
        SlipNetwork(model="SLIP_VITB16")
    with pytest.raises(ValueError, match=r"SIMCLR_VITB16.*init_args\.model.*SLIP_VITB16"):
        SlipNetwork(str(slip_pair["simclr"]), model="SLIP_VITB16")
    with pytest.raises(ValueError, match="no text tower"):
        SlipNetwork(str(slip_pair["simclr"]), modality="language")
    with pytest.raises(ValueError, match="'embedding' needs a CLIP/SLIP"):
        SlipNetwork(str(slip_pair["simclr"]), layers=["embedding"])
    with pytest.raises(ValueError, match=r"init_args\.model"):
        SlipNetwork(str(slip_pair["slip_no_args"]), trained=False)
    broken = dict(slip_pair["simclr_sd"])
    del broken["visual.blocks.1.mlp.fc2.weight"]
    with pytest.raises(ValueError, match=r"does not fit SIMCLR_VITB16.*blocks\.1\.mlp\.fc2"):
        SlipNetwork(str(_save(tmp_path / "broken.pt", broken, "SIMCLR_VITB16")))


# --------------------------------------------------------------------------------------------- hooks
def test_forward_hooks_capture_and_remove() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2)).requires_grad_(False)
    x = torch.randn(5, 4)
    with ForwardHooks(net, ["0", "2"]) as out_hooks:
        y = net(x)
    torch.testing.assert_close(out_hooks.out["2"], y)
    torch.testing.assert_close(out_hooks.out["0"], net[0](x))
    assert not net[0]._forward_hooks and not net[2]._forward_hooks  # removed with the block
    # the input of a block, differentiable although the parameters are frozen (what GradCAM needs)
    with ForwardHooks(net, ["2"], capture="input", differentiable=True) as in_hooks:
        y = net(x)
    h = in_hooks.out["2"]
    (g,) = torch.autograd.grad(y.sum(), h)
    torch.testing.assert_close(g, net[2].weight.sum(0).expand_as(h))
    assert not net[2]._forward_pre_hooks
    with pytest.raises(ValueError, match=r"owner: no module named \['9'\]"):
        ForwardHooks(net, ["9"], owner="owner")


# --------------------------------------------------------------------------------------------- the paper's set
def test_encoding_yaml_lists_buildable_models() -> None:
    """Every model of experiments/encoding.yaml names an importable feature network and only arguments its
    ``__init__`` takes (the weights are the user's downloads, so nothing is built); pairs name listed models."""
    import importlib
    import inspect

    import yaml

    cfg = yaml.safe_load(Path("experiments/encoding.yaml").read_text())
    families = set()
    for name, spec in cfg["models"].items():
        module, _, cls = spec["class_path"].rpartition(".")
        klass = getattr(importlib.import_module(module), cls)
        params = inspect.signature(klass.__init__).parameters
        unknown = set(spec.get("init_args", {})) - set(params)
        assert not unknown, f"models.{name}: {unknown} not arguments of {cls}"
        families.add(cls)
    assert {"TimmVisionNetwork", "HFTextNetwork", "OpenClipNetwork", "HFFusedNetwork", "HFCrossAttentionNetwork",
            "SlipNetwork"} <= families
    pairs = {(p["a"], p["b"]) for p in cfg["pairs"]}
    assert ("slip_vision", "simclr") in pairs
    assert all(a in cfg["models"] and b in cfg["models"] for a, b in pairs)
    slip, simclr = cfg["models"]["slip_vision"]["init_args"], cfg["models"]["simclr"]["init_args"]
    assert slip["modality"] == simclr["modality"] and slip["layers"] == simclr["layers"]  # the controlled pair
