"""Feature spaces of the encoding stage: what each network "sees" of the movie events, cached per store.

Subramaniam et al. (ICML 2024) predict SEEG responses around movie events from the features of unimodal
vision, unimodal language and multimodal networks, each trained or randomly initialised (the control that
separates what the architecture does from what training taught it). This module gives:

- *Feature networks*: plain :class:`torch.nn.Module` s with typed ``__init__`` (YAML ``class_path`` /
  ``init_args``), a ``modality`` ("vision", "language" or "multimodal"), ``layers`` and a stable
  :attr:`model_id` (class, architecture, weights digest or ``random-seed{n}``, layers, fusion, preprocessing)
  that keys the cache. ``extract(batch)`` maps a batch of stimulus items to one (B, D) float tensor per layer.

  - :class:`OpenClipNetwork`: an ``open_clip`` CLIP model; image embedding (vision), text embedding (language)
    or a fused (frame, sentence) pair feature (multimodal).
  - :class:`TimmVisionNetwork`: any ``timm`` image model (BEiT, ConvNeXt, ResNet, ...).
  - :class:`HFTextNetwork`: a Hugging Face text model from a local ``from_pretrained`` folder.
  - :class:`HFFusedNetwork`: a fused image-text model from transformers (FLAVA), the pair's multimodal encoding.
  - :class:`PhantomOracle`: the phantom source's planted concepts, the perfect feature space.

  Nothing downloads: weights are local files or folders, and a missing one is a :class:`FileNotFoundError`
  naming the path and the YAML key that sets it.

- A Lightning predict path: :class:`StimulusDataModule` iterates the *unique* items needed by the events of
  a store (frames, sentences or (frame, sentence) pairs), :class:`FeatureExtractor` runs a network on them,
  and :func:`extract_features` ties both to a ``lightning.Trainer`` (any accelerator), writing each batch's
  features into the HDF5 cache as it comes (never the whole (items x dims) array of a layer in memory),
  optionally reduces each layer with a seeded sparse Johnson-Lindenstrauss projection (in blocks of rows).
- :class:`FeatureTable`: the features of every item, read from the cache one layer at a time when asked for,
  and :meth:`FeatureTable.event_features` mapping events (frame and sentence index arrays) to their item's
  features.

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
import inspect
import json
import logging
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, cast

import h5py
import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from neurovision.data.cache import (
    EntryCache,
    checksum_problem,
    dir_digest,
    entry_problem,
    file_digest,
    finish_entry,
    format_floats,
    json_digest,
    plain,
    start_entry,
    store_key,
)
from neurovision.data.events import EventStore
from neurovision.data.store import first_bad_rows
from neurovision.pretrained.teachers import resize_images, resolve_clip_arch

log = logging.getLogger("neurovision.encoding.features")

Modality = Literal["vision", "language", "multimodal"]
MODALITIES: tuple[str, ...] = ("vision", "language", "multimodal")

FEATURES_SCHEMA = "neurovision.features"
#: 2: arrays checksummed (Fletcher32); version-1 caches are rebuilt
FEATURES_SCHEMA_VERSION = 2


def _yaml_key(cls: str, field: str) -> str:
    return f"init_args.{field} of the {cls} network"


def _check_checkpoint(cls: str, model_name: str, checkpoint: str | None, what: str) -> str:
    """A trained network needs an existing local ``checkpoint`` (errors name the YAML key; nothing is
    downloaded; ``trained: false`` is the randomly initialised control and needs none); returns it."""
    if checkpoint is None:
        raise ValueError(f"{cls}({model_name}): trained=True needs a local {what} (set "
                         f"`{_yaml_key(cls, 'checkpoint')}`), or set trained: false for the randomly initialised "
                         "control")
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"{what} not found: {checkpoint} (set `{_yaml_key(cls, 'checkpoint')}` to a local "
                                "file; nothing is downloaded)")
    return checkpoint


def _check_modality(modality: str) -> Modality:
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    return cast(Modality, modality)  # one of MODALITIES, checked


def _pool(t: Any, batch: int, mask: torch.Tensor | None = None, channels_last: bool = False
          ) -> torch.Tensor:
    """A hooked activation -> (B, D): mean over spatial dims (NCHW, or NHWC when ``channels_last``) or over
    tokens (NLD; only where ``mask`` is true when given); (B, D) passes through."""
    if getattr(t, "last_hidden_state", None) is not None:  # a transformers ModelOutput
        t = t.last_hidden_state
    elif hasattr(t, "to_tuple"):
        t = t.to_tuple()[0]
    if isinstance(t, (tuple, list)):
        t = t[0]
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"hooked module returned {type(t).__name__}, not a tensor")
    t = t.float()
    if t.ndim == 2:
        return t
    if t.ndim == 3:
        if t.shape[0] != batch and t.shape[1] == batch:  # sequence-first (L, B, D)
            t = t.transpose(0, 1)
        if mask is not None and mask.shape == t.shape[:2]:
            m = mask.to(t.dtype).unsqueeze(-1)
            return (t * m).sum(1) / m.sum(1).clamp_min(1.0)
        return t.mean(1)
    if t.ndim == 4:
        return t.mean((1, 2)) if channels_last else t.mean((2, 3))
    return t.reshape(t.shape[0], t.shape[1], -1).mean(-1)


class _Hooks:
    """Forward hooks on named modules for the duration of a ``with`` block; outputs land in ``.out``."""

    def __init__(self, model: torch.nn.Module, names: Sequence[str]) -> None:
        modules = dict(model.named_modules())
        self.out: dict[str, Any] = {}
        self._handles = []
        for name in names:
            self._handles.append(modules[name].register_forward_hook(self._hook(name)))

    def _hook(self, name: str) -> Any:
        def fn(module: torch.nn.Module, args: Any, output: Any) -> None:
            self.out[name] = output
        return fn

    def __enter__(self) -> _Hooks:
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()


def _check_module_names(model: torch.nn.Module, names: Sequence[str], owner: str) -> None:
    known = {n for n, _ in model.named_modules() if n}
    missing = [n for n in names if n not in known]
    if missing:
        sample = sorted(known, key=lambda s: (s.count("."), s))[:20]
        raise ValueError(f"{owner}: no module named {missing} in the model (module names look like "
                         f"{sample} ...)")


def _images(batch: dict[str, Any], owner: str) -> torch.Tensor:
    """uint8 frames (B, H, W, 3) of a batch -> float (B, 3, H, W) in [0, 1]."""
    frames = batch.get("frames")
    if not isinstance(frames, torch.Tensor) or frames.dtype != torch.uint8 or frames.ndim != 4 \
            or frames.shape[-1] != 3:
        got = f"{frames.dtype} {tuple(frames.shape)}" if isinstance(frames, torch.Tensor) else type(frames).__name__
        raise ValueError(f"{owner}: batch['frames'] must be a uint8 tensor (B, H, W, 3), got {got}")
    return frames.permute(0, 3, 1, 2).float() / 255.0


def _sentences(batch: dict[str, Any], owner: str) -> list[str]:
    s = batch.get("sentences")
    if s is None or isinstance(s, str):
        raise ValueError(f"{owner}: batch['sentences'] must be a list of strings, got {type(s).__name__}")
    return [str(x) for x in s]


def _normalise(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def _device_of(module: torch.nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------- networks
class FeatureNetwork(torch.nn.Module):
    """Common interface of the feature networks (see the module docstring)."""

    modality: Modality
    layers: list[str]

    @property
    def model_id(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def setup_store(self, store: EventStore) -> None:
        """Called once with the events store before extraction (default: nothing to do)."""

    def _load_hf(self, cls: str, path: str, trained: bool, layers: list[str], pooling: str, max_length: int,
                 seed: int) -> tuple[Path, Any, str]:
        """Shared set-up of the transformers networks: the common options, the local folder's config and model
        (``trained=False``: the same architecture from its config, seeded), frozen in float32 as ``self.model``.
        Returns (folder, config, the model-id head ``<cls>:<type>|arch=..|weights=..``)."""
        from transformers import AutoConfig, AutoModel

        self.path, self.trained, self.layers = str(path), bool(trained), list(layers)
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        self.pooling, self.max_length, self.seed = pooling, int(max_length), int(seed)
        p = Path(self.path)
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"Hugging Face model folder not found (no config.json): {self.path} (set "
                                    f"`{_yaml_key(cls, 'path')}` to a local from_pretrained folder; "
                                    "nothing is downloaded)")
        config = AutoConfig.from_pretrained(p, local_files_only=True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = (AutoModel.from_pretrained(p, local_files_only=True, dtype=torch.float32) if self.trained
                     else AutoModel.from_config(config))
        self.model = model.float().eval().requires_grad_(False)
        arch = {k: v for k, v in config.to_dict().items() if not k.startswith("_") and k != "transformers_version"}
        weights = f"sha256:{dir_digest(p)[:16]}" if self.trained else f"random-seed{self.seed}"
        return p, config, f"{cls}:{arch.get('model_type', '?')}|arch={json_digest(arch)[:12]}|weights={weights}"

    def extract(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError


class OpenClipNetwork(FeatureNetwork):
    """An ``open_clip`` CLIP model as a vision, language or multimodal feature space.

    Layer ``"embedding"`` is the L2-normalised image embedding (vision), text embedding (language) or, for
    ``multimodal``, a fused feature of the event's (frame, sentence) pair: ``concat`` [img, txt], ``product``
    img * txt (its sum is the CLIP cosine similarity, the image-text agreement a linear readout can then
    weigh), or ``concat_product`` [img, txt, img * txt]. Other ``layers`` are module names (e.g.
    ``"visual.transformer.resblocks.3"``, ``"transformer.resblocks.1"``) whose outputs are captured by forward
    hooks and mean-pooled over tokens (text: over non-padding tokens) or spatial positions; in ``multimodal``
    mode a hooked layer is that of its own tower (the vision tower sees the frame, the text tower the
    sentence), unfused.

    Args:
        model_name: an open_clip architecture (``ViT-B-16``, ...), or the name to give ``model_config``.
        checkpoint: a local open_clip checkpoint (state dict file); needed when ``trained``.
        model_config: an open_clip model config JSON (a custom, e.g. tiny, architecture).
        trained: ``False``: the same architecture randomly initialised (seeded by ``seed``), whatever the
            checkpoint (the random-initialisation control).
        modality: which feature space (see above).
        fusion: how ``multimodal`` combines the image and text embeddings.
        layers: feature layers (default ``["embedding"]``).
        seed: seed of the random initialisation.
    """

    def __init__(
        self,
        model_name: str = "ViT-B-16",
        checkpoint: str | None = None,
        model_config: str | None = None,
        trained: bool = True,
        modality: Literal["vision", "language", "multimodal"] = "multimodal",
        fusion: Literal["concat", "product", "concat_product"] = "concat_product",
        layers: list[str] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        import open_clip

        self.model_name = model_name
        self.checkpoint = None if checkpoint is None else str(checkpoint)
        self.model_config = None if model_config is None else str(model_config)
        self.trained = bool(trained)
        self.modality = _check_modality(modality)
        if fusion not in ("concat", "product", "concat_product"):
            raise ValueError(f"fusion must be concat, product or concat_product, got {fusion!r}")
        self.fusion = fusion
        self.layers = list(layers) if layers else ["embedding"]
        self.seed = int(seed)
        ckpt = _check_checkpoint("OpenClipNetwork", model_name, self.checkpoint, "open_clip checkpoint") \
            if self.trained else None
        arch, cfg, pp_override = resolve_clip_arch(model_name, self.model_config,
                                                   _yaml_key("OpenClipNetwork", "model_config"))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = open_clip.create_model(arch, pretrained=ckpt,
                                           force_preprocess_cfg=pp_override or None, device="cpu")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.pad_id = int(getattr(self.tokenizer, "pad_token_id", None) or 0)
        self.preprocess_cfg: dict[str, Any] = dict(open_clip.get_model_preprocess_cfg(model))
        self._hooked = [name for name in self.layers if name != "embedding"]
        _check_module_names(self.model, self._hooked, f"OpenClipNetwork({model_name})")
        self._tower = {n: ("vision" if n.split(".")[0] == "visual" else "language") for n in self._hooked}
        for n, tower in self._tower.items():
            if self.modality != "multimodal" and tower != self.modality:
                raise ValueError(f"OpenClipNetwork: layer {n!r} is in the {tower} tower, which modality "
                                 f"{self.modality!r} does not run")
        weights = f"sha256:{file_digest(ckpt)[:16]}" if ckpt is not None else f"random-seed{self.seed}"
        pp = self.preprocess_cfg
        size = pp["size"] if isinstance(pp["size"], int) else "x".join(str(s) for s in pp["size"])
        fusion_id = f"|fusion={self.fusion}" if self.modality == "multimodal" else ""
        self._id = (f"OpenClipNetwork:{model_name}|arch={json_digest(cfg)[:12]}|weights={weights}"
                    f"|modality={self.modality}{fusion_id}|layers={','.join(self.layers)}"
                    f"|pp={size}px,{pp.get('interpolation')},{pp.get('resize_mode')},"
                    f"mean={format_floats(pp['mean'])},std={format_floats(pp['std'])}")

    @property
    def model_id(self) -> str:
        return self._id

    @property
    def image_size(self) -> tuple[int, int]:
        s = self.preprocess_cfg["size"]
        return (s, s) if isinstance(s, int) else (int(s[0]), int(s[1]))

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) -> the normalised input of the vision tower, on the model's device."""
        x = _images({"frames": frames}, "OpenClipNetwork").to(_device_of(self.model))
        pp = self.preprocess_cfg
        x = resize_images(x, self.image_size, pp.get("interpolation", "bicubic"), pp.get("resize_mode", "shortest"),
                          float(pp.get("fill_color", 0)) / 255.0).clamp_(0, 1)
        return _normalise(x, pp["mean"], pp["std"])

    def fuse(self, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        """The multimodal pair feature of (normalised) image and text embeddings."""
        if self.fusion == "concat":
            return torch.cat([img, txt], 1)
        if self.fusion == "product":
            return img * txt
        return torch.cat([img, txt, img * txt], 1)

    @torch.no_grad()
    def extract(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        device = _device_of(self.model)
        img = txt = tokens = None
        n = 0
        with _Hooks(self.model, self._hooked) as hooks:
            if self.modality in ("vision", "multimodal"):
                x = self.preprocess(batch["frames"] if "frames" in batch else None)  # type: ignore[arg-type]
                n = x.shape[0]
                img = self.model.encode_image(x, normalize=True).float()
            if self.modality in ("language", "multimodal"):
                sentences = _sentences(batch, "OpenClipNetwork")
                n = len(sentences)
                tokens = self.tokenizer(sentences).to(device)
                txt = self.model.encode_text(tokens, normalize=True).float()
        out: dict[str, torch.Tensor] = {}
        for name in self.layers:
            if name == "embedding":
                emb = img if txt is None else txt if img is None else self.fuse(img, txt)
                if emb is None:  # pragma: no cover - every modality runs a tower
                    raise RuntimeError(f"OpenClipNetwork: modality {self.modality!r} ran no tower")
                out[name] = emb
                continue
            if name not in hooks.out:
                raise RuntimeError(f"OpenClipNetwork: layer {name!r} was not run by encode_image/encode_text")
            mask = (tokens != self.pad_id) if (self._tower[name] == "language" and tokens is not None) else None
            out[name] = _pool(hooks.out[name], n, mask)
        return out


def _load_state_dict(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd: Any = load_file(path, device="cpu")
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: not a state dict (found {type(sd).__name__})")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


class TimmVisionNetwork(FeatureNetwork):
    """A ``timm`` image model (BEiT, ConvNeXt, ResNet, ...) as a vision feature space.

    ``timm.create_model(model_name, pretrained=False, num_classes=0)``, weights from a local state-dict file
    (``.pth``/``.bin``/``.safetensors``; classifier keys the headless model lacks are ignored, any missing
    key is an error) when ``trained``, else seeded random initialisation. Frames are resized (shortest side
    to ``image_size``, centre crop) with the model's interpolation and normalised with its mean/std.

    Layer ``"pooled"`` (default) is the model's pooled output (pre-logits); other layers are module names
    (e.g. ``"layer3"``, ``"stages.2"``, ``"blocks.5"``) captured by forward hooks and mean-pooled over
    spatial positions (NCHW, or NHWC for models whose ``output_fmt`` is NHWC) or tokens (NLD).
    """

    modality: Modality = "vision"

    def __init__(
        self,
        model_name: str,
        checkpoint: str | None = None,
        trained: bool = True,
        layers: list[str] | None = None,
        image_size: int = 224,
        seed: int = 0,
    ) -> None:
        super().__init__()
        import timm

        self.model_name = model_name
        self.checkpoint = None if checkpoint is None else str(checkpoint)
        self.trained = bool(trained)
        self.layers = list(layers) if layers else ["pooled"]
        self.image_size = int(image_size)
        self.seed = int(seed)
        self.modality = "vision"
        ckpt = _check_checkpoint("TimmVisionNetwork", model_name, self.checkpoint, "timm state-dict file") \
            if self.trained else None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = timm.create_model(model_name, pretrained=False, num_classes=0)
        if ckpt is not None:  # trained
            sd = _load_state_dict(ckpt)
            own = model.state_dict()
            missing = [k for k in own if k not in sd]
            if missing:
                raise ValueError(f"{self.checkpoint}: state dict lacks {len(missing)} weights of timm model "
                                 f"{model_name} (e.g. {missing[:5]}); wrong architecture?")
            extra = [k for k in sd if k not in own]
            if extra:
                log.info("%s: ignoring %d weights the headless %s lacks (e.g. %s)", self.checkpoint, len(extra),
                         model_name, extra[:3])
            model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=True)
        self.model = model.eval().requires_grad_(False)
        self._hooked = [n for n in self.layers if n != "pooled"]
        _check_module_names(self.model, self._hooked, f"TimmVisionNetwork({model_name})")
        self._channels_last = str(getattr(model, "output_fmt", "NCHW")) == "NHWC"
        cfg = timm.data.resolve_model_data_config(model)
        self.mean = tuple(float(v) for v in cfg["mean"])
        self.std = tuple(float(v) for v in cfg["std"])
        self.interpolation = str(cfg.get("interpolation", "bicubic"))
        weights = f"sha256:{file_digest(ckpt)[:16]}" if ckpt is not None else f"random-seed{self.seed}"
        self._id = (f"TimmVisionNetwork:{model_name}|weights={weights}|layers={','.join(self.layers)}"
                    f"|pp={self.image_size}px,{self.interpolation},shortest,mean={format_floats(self.mean)},"
                    f"std={format_floats(self.std)}")

    @property
    def model_id(self) -> str:
        return self._id

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        x = _images({"frames": frames}, "TimmVisionNetwork").to(_device_of(self.model))
        x = resize_images(x, self.image_size, self.interpolation, "shortest").clamp_(0, 1)
        return _normalise(x, self.mean, self.std)

    @torch.no_grad()
    def extract(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        x = self.preprocess(batch.get("frames"))  # type: ignore[arg-type]
        with _Hooks(self.model, self._hooked) as hooks:
            pooled = self.model(x)
        out: dict[str, torch.Tensor] = {}
        for name in self.layers:
            out[name] = pooled.float() if name == "pooled" else _pool(hooks.out[name], x.shape[0],
                                                                      channels_last=self._channels_last)
        return out


_HIDDEN = re.compile(r"^hidden_states\.(-?\d+)$")


class HFTextNetwork(FeatureNetwork):
    """A Hugging Face text model (BERT, GPT-2, Llama, ...) from a local folder as a language feature space.

    ``AutoTokenizer`` + ``AutoModel`` with ``local_files_only=True``; ``trained=False`` builds the same
    architecture from its config, randomly initialised (seeded). Layers: ``"last"`` (the last hidden state,
    default) or ``"hidden_states.{k}"`` (the k-th hidden state; 0 = the embeddings), pooled over the
    non-padding tokens (``mean``) or taken at the first token (``cls``). Sentences are truncated to
    ``max_length`` tokens and right-padded.
    """

    modality: Modality = "language"

    def __init__(
        self,
        path: str,
        trained: bool = True,
        layers: list[str] | None = None,
        pooling: Literal["mean", "cls"] = "mean",
        max_length: int = 64,
        seed: int = 0,
    ) -> None:
        super().__init__()
        from transformers import AutoTokenizer

        p, config, head = self._load_hf("HFTextNetwork", path, trained, layers or ["last"], pooling, max_length,
                                        seed)
        self.modality = "language"
        self.tokenizer = AutoTokenizer.from_pretrained(p, local_files_only=True)
        self.tokenizer.padding_side = "right"
        if self.tokenizer.pad_token is None:
            if self.tokenizer.eos_token is None:
                raise ValueError(f"{self.path}: the tokenizer has neither a pad nor an eos token")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        n_hidden = int(getattr(config, "num_hidden_layers", 0)) + 1
        for name in self.layers:
            m = _HIDDEN.match(name)
            if name != "last" and (m is None or not -n_hidden <= int(m.group(1)) < n_hidden):
                raise ValueError(f"HFTextNetwork({self.path}): layer {name!r} is not 'last' or "
                                 f"'hidden_states.k' with -{n_hidden} <= k < {n_hidden}")
        self._inputs = set(inspect.signature(self.model.forward).parameters)
        tok = json_digest({f.name: file_digest(f) for f in sorted(p.iterdir())
                            if f.is_file() and ("tok" in f.name or f.name in ("vocab.txt", "merges.txt", "vocab.json"))})[:12]
        self._id = (f"{head}|tokenizer={tok}|layers={','.join(self.layers)}|pooling={self.pooling}"
                    f"|max_length={self.max_length}")

    @property
    def model_id(self) -> str:
        return self._id

    @torch.no_grad()
    def extract(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        sentences = _sentences(batch, "HFTextNetwork")
        enc = self.tokenizer(sentences, padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        device = _device_of(self.model)
        inputs = {k: v.to(device) for k, v in enc.items() if k in self._inputs}
        res = self.model(**inputs, output_hidden_states=True, return_dict=True)
        mask = enc["attention_mask"].to(device)
        out: dict[str, torch.Tensor] = {}
        for name in self.layers:
            h = res.last_hidden_state if name == "last" else res.hidden_states[int(name.split(".")[1])]
            h = h.float()
            if self.pooling == "cls":
                out[name] = h[:, 0]
            else:
                m = mask.to(h.dtype).unsqueeze(-1)
                out[name] = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
        return out


class HFFusedNetwork(FeatureNetwork):
    """A fused image-text model from transformers (FLAVA: a multimodal encoder attending over both towers) as a
    multimodal feature space of (frame, sentence) pairs.

    ``AutoProcessor`` + ``AutoModel`` from a local folder (``local_files_only=True``); ``trained=False`` builds the
    same architecture from its config, randomly initialised (seeded). Layers: ``"multimodal"`` (default: the
    fused encoder's output, ``multimodal_embeddings``), ``"image"`` / ``"text"`` (the model's own unimodal
    towers, ``image_embeddings`` / ``text_embeddings``), or module names (forward hooks); each pooled at the
    first token (``cls``) or over the valid tokens (``mean``). Dual encoders (CLIP) are
    :class:`OpenClipNetwork`; a model whose output has no ``multimodal_embeddings`` is refused.
    """

    modality: Modality = "multimodal"
    _OUTPUTS = {"multimodal": "multimodal_embeddings", "image": "image_embeddings", "text": "text_embeddings"}

    def __init__(
        self,
        path: str,
        trained: bool = True,
        layers: list[str] | None = None,
        pooling: Literal["mean", "cls"] = "cls",
        max_length: int = 64,
        seed: int = 0,
    ) -> None:
        super().__init__()
        from transformers import AutoProcessor

        p, config, head = self._load_hf("HFFusedNetwork", path, trained, layers or ["multimodal"], pooling,
                                        max_length, seed)
        self.modality = "multimodal"
        self.processor = AutoProcessor.from_pretrained(p, local_files_only=True)
        hooked = [n for n in self.layers if n not in self._OUTPUTS]
        _check_module_names(self.model, hooked, "HFFusedNetwork")
        self._id = f"{head}|layers={','.join(self.layers)}|pooling={self.pooling}|max_length={self.max_length}"

    @property
    def model_id(self) -> str:
        return self._id

    def _pooled(self, h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        h = h.float()
        if self.pooling == "cls":
            return h[:, 0]
        return _pool(h, len(h), mask)

    @torch.no_grad()
    def extract(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        frames = _images(batch, "HFFusedNetwork")  # checks the batch; the processor takes the uint8 frames
        sentences = _sentences(batch, "HFFusedNetwork")
        enc = self.processor(text=sentences, images=list(batch["frames"].cpu().numpy()), return_tensors="pt",
                             padding=True, truncation=True, max_length=self.max_length)
        device = _device_of(self.model)
        enc = {k: v.to(device) for k, v in enc.items()}
        hooked = [n for n in self.layers if n not in self._OUTPUTS]
        with _Hooks(self.model, hooked) as hooks:
            res = self.model(**enc, return_dict=True)
        if getattr(res, "multimodal_embeddings", None) is None:
            raise ValueError(f"HFFusedNetwork({self.path}): {type(self.model).__name__} returned no "
                             "multimodal_embeddings (not a fused image-text model such as FLAVA)")
        text_mask = enc.get("attention_mask")
        out: dict[str, torch.Tensor] = {}
        for name in self.layers:
            if name in hooked:
                out[name] = _pool(hooks.out[name], len(frames))
                continue
            h = getattr(res, self._OUTPUTS[name])
            mask = None
            if name == "text":
                mask = text_mask
            elif name == "multimodal" and text_mask is not None and h.shape[1] > text_mask.shape[1]:
                # [CLS_mm, image tokens..., text tokens...]: image tokens are all valid
                ones = torch.ones(len(h), h.shape[1] - text_mask.shape[1], dtype=text_mask.dtype, device=h.device)
                mask = torch.cat([ones, text_mask], dim=1)
            out[name] = self._pooled(h, mask)
        return out


class PhantomOracle(FeatureNetwork):
    """The perfect feature space of the phantom SEEG source, to validate the statistics pipeline.

    The phantom plants its site responses on concepts it stores as annotations: ``frame_concepts`` (per
    frame, the presence of each of K concepts in what is shown) and ``sentence_concepts`` (per sentence, the
    concepts it names). This "network" returns them exactly: ``vision`` -> the frame's concepts (K),
    ``language`` -> the sentence's concepts (K), ``multimodal`` -> [v, l, v * l] (3K; the product is the
    agreement of what is shown and what is said). An encoding pipeline fed these features must recover the
    planted sites; one that cannot has a bug. Single layer ``"concepts"``.
    """

    def __init__(self, modality: Literal["vision", "language", "multimodal"]) -> None:
        super().__init__()
        self.modality = _check_modality(modality)
        self.layers = ["concepts"]
        self._frame: torch.Tensor | None = None
        self._sentence: torch.Tensor | None = None

    @property
    def model_id(self) -> str:
        return f"PhantomOracle|modality={self.modality}|layers=concepts"

    def setup_store(self, store: EventStore) -> None:
        def load(kind: str, n: int) -> torch.Tensor:
            if kind not in store.annotation_kinds:
                raise KeyError(f"{store.path}: PhantomOracle needs annotations {kind!r}, which this events store "
                               f"lacks (has {store.annotation_kinds}); it works on phantom SEEG stores only")
            rows = store.annotations(kind)
            if len(rows) != n:
                raise ValueError(f"{store.path}: annotations {kind!r} have {len(rows)} rows for {n} items")
            try:
                return torch.as_tensor(np.asarray(rows, dtype=np.float32).reshape(n, -1))
            except ValueError as e:
                raise ValueError(f"{store.path}: annotations {kind!r} are not equal-length lists of numbers") from e

        self._frame = load("frame_concepts", len(store.frame_keys)) if self.modality != "language" else None
        self._sentence = load("sentence_concepts", len(store.sentences)) if self.modality != "vision" else None
        if self._frame is not None and self._sentence is not None and self._frame.shape[1] != self._sentence.shape[1]:
            raise ValueError(f"{store.path}: frame_concepts have {self._frame.shape[1]} concepts, sentence_concepts "
                             f"{self._sentence.shape[1]}")

    def extract(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        if (self.modality != "language" and self._frame is None) or (self.modality != "vision"
                                                                       and self._sentence is None):
            raise RuntimeError("PhantomOracle: call setup_store(store) before extract")
        parts = []
        if self._frame is not None:
            fi = batch["frame_index"]
            parts.append(self._frame[fi.cpu().long()].to(fi.device))
        if self._sentence is not None:
            si = batch["sentence_index"]
            parts.append(self._sentence[si.cpu().long()].to(si.device))
        if len(parts) == 2:
            parts.append(parts[0] * parts[1])
        return {"concepts": torch.cat(parts, 1)}


# --------------------------------------------------------------------------------------------- items
def stimulus_items(store: EventStore, modality: str) -> tuple[np.ndarray, np.ndarray]:
    """The unique items the events of every subject and event set of ``store`` need, as (frame_index,
    sentence_index) int64 arrays (-1 where the modality does not use it), sorted (pairs lexicographically)."""
    _check_modality(modality)
    frames, sentences = [], []
    for subject in store.subject_names:
        for es in store.event_sets(subject):
            ev = store.events(subject, es)
            frames.append(np.asarray(ev.frame, dtype=np.int64))
            sentences.append(np.asarray(ev.sentence, dtype=np.int64))
    f = np.concatenate(frames) if frames else np.zeros(0, np.int64)
    s = np.concatenate(sentences) if sentences else np.zeros(0, np.int64)
    if modality == "vision":
        u = np.unique(f)
        return u, np.full_like(u, -1)
    if modality == "language":
        u = np.unique(s)
        return np.full_like(u, -1), u
    pairs = np.unique(np.stack([f, s], 1), axis=0) if len(f) else np.zeros((0, 2), np.int64)
    return pairs[:, 0].copy(), pairs[:, 1].copy()


class _ItemDataset(Dataset):
    def __init__(self, store: EventStore, modality: str, frame_index: np.ndarray, sentence_index: np.ndarray):
        self.store, self.modality = store, modality
        self.frame_index, self.sentence_index = frame_index, sentence_index

    def __len__(self) -> int:
        return len(self.frame_index)

    def __getitem__(self, i: int) -> dict[str, Any]:
        f, s = int(self.frame_index[i]), int(self.sentence_index[i])
        item: dict[str, Any] = {"frame_index": torch.tensor(f), "sentence_index": torch.tensor(s)}
        if self.modality != "language":
            item["frames"] = torch.from_numpy(np.ascontiguousarray(self.store.h5["stimuli/frames"][f]))
        if self.modality != "vision":
            item["sentences"] = self.store.sentences[s]
        return item


class StimulusDataModule(L.LightningDataModule):
    """The unique stimulus items of an events store, for ``Trainer.predict``.

    Its predict dataloader yields batches ``{"frames": uint8 (B, H, W, 3)`` (not for language),
    ``"sentences": list[str]`` (not for vision), ``"frame_index"``, ``"sentence_index"`` (long (B,), -1 when
    unused)``}`` over the unique frames (vision), sentences (language) or (frame, sentence) pairs
    (multimodal) that the events of all subjects and event sets use, in sorted order. The store is opened on
    first use, not in ``__init__``.
    """

    def __init__(self, store: str | os.PathLike[str], modality: Literal["vision", "language", "multimodal"],
                 batch_size: int = 32, num_workers: int = 0) -> None:
        super().__init__()
        self.store_path = Path(store)
        if not self.store_path.is_file():
            raise FileNotFoundError(f"{self.store_path}: events store does not exist (run `neurovision prepare`)")
        self.modality = _check_modality(modality)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self._store: EventStore | None = None
        self._items: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def store(self) -> EventStore:
        if self._store is None:
            self._store = EventStore(self.store_path)
        return self._store

    @property
    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """(frame_index, sentence_index) of the items, in the order the dataloader yields them."""
        if self._items is None:
            self._items = stimulus_items(self.store, self.modality)
        return self._items

    def setup(self, stage: str | None = None) -> None:
        self.items  # noqa: B018  (opens the store and lists the items)

    def predict_dataloader(self) -> DataLoader:
        f, s = self.items
        return DataLoader(_ItemDataset(self.store, self.modality, f, s), batch_size=self.batch_size,
                          shuffle=False, num_workers=self.num_workers,
                          persistent_workers=False, pin_memory=False)


class FeatureExtractor(L.LightningModule):
    """Runs a feature network in ``Trainer.predict``; each step returns ``{"frame_index", "sentence_index",
    "features": {layer: float32 (B, D) on the CPU}}``. The network gets ``setup_store`` with the datamodule's
    store (when it has one) at setup."""

    def __init__(self, network: FeatureNetwork) -> None:
        super().__init__()
        self.network = network

    def setup(self, stage: str) -> None:
        trainer = self._trainer
        dm = getattr(trainer, "datamodule", None) if trainer is not None else None
        store = getattr(dm, "store", None)
        if isinstance(store, EventStore) and hasattr(self.network, "setup_store"):
            self.network.setup_store(store)

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        feats = self.network.extract(batch)
        n = len(batch["frame_index"])
        out: dict[str, torch.Tensor] = {}
        for name in self.network.layers:
            if name not in feats:
                raise RuntimeError(f"{type(self.network).__name__}.extract returned no layer {name!r}")
            v = feats[name]
            if v.ndim != 2 or v.shape[0] != n:
                raise RuntimeError(f"{type(self.network).__name__}: layer {name!r} has shape {tuple(v.shape)}, "
                                   f"expected ({n}, D)")
            out[name] = v.detach().float().cpu()
        return {"frame_index": batch["frame_index"].detach().cpu(),
                "sentence_index": batch["sentence_index"].detach().cpu(), "features": out}


# --------------------------------------------------------------------------------------------- table
class FeatureTable:
    """Features of the unique stimulus items of a store, for one network (and projection).

    ``features`` maps layer names to (n_items, D) arrays: in memory (a dict), or, as
    :func:`extract_features` returns it, the layers of an HDF5 cache entry that are read from the file when
    asked for (:meth:`__getitem__`, :meth:`event_features`): a table holds no features itself, and a caller
    holds one layer at a time (n_items x D float32).
    """

    def __init__(self, model_id: str, modality: str, frame_index: np.ndarray, sentence_index: np.ndarray,
                 features: Mapping[str, np.ndarray], projection: dict[str, Any] | None = None) -> None:
        self.model_id, self.modality = model_id, _check_modality(modality)
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
    trainer.predict(FeatureExtractor(network), datamodule=dm, return_predictions=False)
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
    "FEATURES_SCHEMA", "FEATURES_SCHEMA_VERSION", "FeatureExtractor", "FeatureNetwork",
    "FeatureTable", "HFTextNetwork", "MODALITIES", "OpenClipNetwork", "PhantomOracle", "StimulusDataModule",
    "TimmVisionNetwork", "cache_entries", "extract_features", "stimulus_items",
]
