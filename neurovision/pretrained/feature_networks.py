"""Feature networks of the encoding stage: what each network "sees" of the movie events.

Subramaniam et al. (ICML 2024) predict SEEG responses around movie events from the features of unimodal
vision, unimodal language and multimodal networks, each trained or randomly initialised (the control that
separates what the architecture does from what training taught it). Each feature network is a plain
:class:`torch.nn.Module` with a typed ``__init__`` (YAML ``class_path`` / ``init_args``), a ``modality``
("vision", "language" or "multimodal"), ``layers`` and a stable :attr:`~FeatureNetwork.model_id` (class,
architecture, weights digest or ``random-seed{n}``, layers, fusion, preprocessing) that keys the feature cache
(:mod:`neurovision.encoding.features`). ``extract(batch)`` maps a batch of stimulus items
(:class:`data_modules.stimuli.StimulusDataModule`) to one (B, D) float tensor per layer.

- :class:`OpenClipNetwork`: an ``open_clip`` CLIP model; image embedding (vision), text embedding (language)
  or a fused (frame, sentence) pair feature (multimodal).
- :class:`TimmVisionNetwork`: any ``timm`` image model (BEiT, ConvNeXt, ResNet, ...).
- :class:`HFTextNetwork`: a Hugging Face text model from a local ``from_pretrained`` folder.
- :class:`HFFusedNetwork`: a fused image-text model from transformers (FLAVA), the pair's multimodal encoding.
- :class:`HFCrossAttentionNetwork`: an ALBEF / BLIP-style model (image encoder + text encoder cross-attending to
  it; BLIP's ``BlipForImageTextRetrieval``).
- :class:`SlipNetwork`: the SLIP repository's SLIP / CLIP / SimCLR checkpoints (the paper's SLIP-vs-SimCLR pair).
- :class:`PhantomOracle`: the phantom source's planted concepts, the perfect feature space.

Nothing downloads: weights are local files or folders, and a missing one is a :class:`FileNotFoundError`
naming the path and the YAML key that sets it. Hooked layers are captured with
:class:`neurovision.pretrained.hooks.ForwardHooks`.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import torch

from neurovision.data.cache import dir_digest, file_digest, format_floats, json_digest
from neurovision.data.events import EventStore
from neurovision.pretrained.hooks import ForwardHooks, check_module_names
from neurovision.pretrained.slip import SlipModelName
from neurovision.pretrained.teachers import resize_images, resolve_clip_arch

log = logging.getLogger(__name__)

Modality = Literal["vision", "language", "multimodal"]
MODALITIES: tuple[str, ...] = ("vision", "language", "multimodal")


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


def check_modality(modality: str) -> Modality:
    """``modality`` if it is one of :data:`MODALITIES`, else a ``ValueError``."""
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
                 seed: int, model_class: Callable[[Any], Any] | None = None) -> tuple[Path, Any, str]:
        """Shared set-up of the transformers networks: the common options, the local folder's config and model
        (``trained=False``: the same architecture from its config, seeded), frozen in float32 as ``self.model``.
        ``model_class(config)`` picks the transformers class (default ``AutoModel``).
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
        klass = AutoModel if model_class is None else model_class(config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            if self.trained:
                model = klass.from_pretrained(p, local_files_only=True, dtype=torch.float32)
            else:
                model = AutoModel.from_config(config) if klass is AutoModel else cast(Any, klass)._from_config(config)
        self.model = model.float().eval().requires_grad_(False)
        arch = {k: v for k, v in config.to_dict().items() if not k.startswith("_") and k != "transformers_version"}
        weights = f"sha256:{dir_digest(p)[:16]}" if self.trained else f"random-seed{self.seed}"
        return p, config, f"{cls}:{arch.get('model_type', '?')}|arch={json_digest(arch)[:12]}|weights={weights}"

    def extract(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError


def fuse_pair(img: torch.Tensor, txt: torch.Tensor, fusion: str) -> torch.Tensor:
    """The multimodal feature of a (frame, sentence) pair from its image and text embeddings: ``concat``,
    ``product`` (elementwise), or both with the embeddings (``concat_product``, any other value)."""
    if fusion == "concat":
        return torch.cat([img, txt], 1)
    if fusion == "product":
        return img * txt
    return torch.cat([img, txt, img * txt], 1)


def pool_tokens(h: torch.Tensor, mask: torch.Tensor | None, pooling: str) -> torch.Tensor:
    """(B, T, D) token states -> (B, D) float: the first (CLS) token for ``cls``, else the mean over ``mask``."""
    h = h.float()
    return h[:, 0] if pooling == "cls" else _pool(h, len(h), mask)


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
        self.modality = check_modality(modality)
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
        check_module_names(self.model, self._hooked, f"OpenClipNetwork({model_name})")
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
        """The multimodal pair feature of (normalised) image and text embeddings (:func:`fuse_pair`)."""
        return fuse_pair(img, txt, self.fusion)

    @torch.no_grad()
    def extract(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        device = _device_of(self.model)
        img = txt = tokens = None
        n = 0
        with ForwardHooks(self.model, self._hooked) as hooks:
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
        check_module_names(self.model, self._hooked, f"TimmVisionNetwork({model_name})")
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
        with ForwardHooks(self.model, self._hooked) as hooks:
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


class HFPairNetwork(FeatureNetwork):
    """What the transformers image-text networks share: the model id their loader builds and token pooling."""

    _id: str
    pooling: str

    @property
    def model_id(self) -> str:
        return self._id

    def _pooled(self, h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return pool_tokens(h, mask, self.pooling)


class HFFusedNetwork(HFPairNetwork):
    """A fused image-text model from transformers (FLAVA: a multimodal encoder attending over both towers) as a
    multimodal feature space of (frame, sentence) pairs.

    ``AutoProcessor`` + ``AutoModel`` from a local folder (``local_files_only=True``); ``trained=False`` builds the
    same architecture from its config, randomly initialised (seeded). Layers: ``"multimodal"`` (default: the
    fused encoder's output, ``multimodal_embeddings``), ``"image"`` / ``"text"`` (the model's own unimodal
    towers, ``image_embeddings`` / ``text_embeddings``), or module names (forward hooks); each pooled at the
    first token (``cls``) or over the valid tokens (``mean``). Dual encoders (CLIP) are
    :class:`OpenClipNetwork`, a text encoder cross-attending to an image encoder (BLIP, ALBEF-style) is
    :class:`HFCrossAttentionNetwork`; a model whose output has no ``multimodal_embeddings`` is refused.
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
        check_module_names(self.model, hooked, "HFFusedNetwork")
        self._id = f"{head}|layers={','.join(self.layers)}|pooling={self.pooling}|max_length={self.max_length}"

    @torch.no_grad()
    def extract(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        frames = _images(batch, "HFFusedNetwork")  # checks the batch; the processor takes the uint8 frames
        sentences = _sentences(batch, "HFFusedNetwork")
        enc = self.processor(text=sentences, images=list(batch["frames"].cpu().numpy()), return_tensors="pt",
                             padding=True, truncation=True, max_length=self.max_length)
        device = _device_of(self.model)
        enc = {k: v.to(device) for k, v in enc.items()}
        hooked = [n for n in self.layers if n not in self._OUTPUTS]
        with ForwardHooks(self.model, hooked) as hooks:
            res = self.model(**enc, return_dict=True)
        if getattr(res, "multimodal_embeddings", None) is None:
            raise ValueError(f"HFFusedNetwork({self.path}): {type(self.model).__name__} returned no "
                             "multimodal_embeddings (not a fused image-text model such as FLAVA; BLIP-style models: "
                             "HFCrossAttentionNetwork)")
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


def _cross_attention_class(config: Any) -> Any:
    """The transformers class of an image-text model whose text encoder cross-attends to the image encoder."""
    import transformers

    model_type = str(getattr(config, "model_type", "?"))
    if model_type not in HFCrossAttentionNetwork.CLASSES:
        raise ValueError(f"HFCrossAttentionNetwork: model_type {model_type!r} is not an image encoder + cross-"
                         f"attending text encoder layout (supported: {sorted(HFCrossAttentionNetwork.CLASSES)}; "
                         "FLAVA-style fused encoders: HFFusedNetwork)")
    return getattr(transformers, HFCrossAttentionNetwork.CLASSES[model_type])


class HFCrossAttentionNetwork(HFPairNetwork):
    """An ALBEF / BLIP-style image-text model from transformers (an image encoder, and a text encoder whose
    layers cross-attend to the image tokens) as a multimodal feature space of (frame, sentence) pairs.

    The folder's ``model_type`` picks the class (``blip``: ``BlipForImageTextRetrieval``, the image-text matching
    model); ``AutoProcessor`` prepares both inputs; ``local_files_only=True``; ``trained=False`` builds the same
    architecture from its config, randomly initialised (seeded). Layers: ``"multimodal"`` (default: the text
    encoder's output attending over the image, what the matching head reads), ``"image"`` (the image encoder's
    output), ``"text"`` (the same text encoder run without the image: the language-only control of the same
    weights), or module names (forward hooks on the image-text pass); each pooled at the first token (``cls``) or
    over the valid tokens (``mean``).
    """

    modality: Modality = "multimodal"
    CLASSES = {"blip": "BlipForImageTextRetrieval"}
    _OUTPUTS = ("multimodal", "image", "text")

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

        p, config, head = self._load_hf("HFCrossAttentionNetwork", path, trained, layers or ["multimodal"],
                                        pooling, max_length, seed, model_class=_cross_attention_class)
        self.modality = "multimodal"
        self.processor = AutoProcessor.from_pretrained(p, local_files_only=True)
        self._hooked = [n for n in self.layers if n not in self._OUTPUTS]
        check_module_names(self.model, self._hooked, "HFCrossAttentionNetwork")
        self._id = f"{head}|layers={','.join(self.layers)}|pooling={self.pooling}|max_length={self.max_length}"

    @torch.no_grad()
    def extract(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        frames = _images(batch, "HFCrossAttentionNetwork")  # checks the batch; the processor takes uint8 frames
        sentences = _sentences(batch, "HFCrossAttentionNetwork")
        enc = self.processor(text=sentences, images=list(batch["frames"].cpu().numpy()), return_tensors="pt",
                             padding=True, truncation=True, max_length=self.max_length)
        device = _device_of(self.model)
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        pixels = enc["pixel_values"].to(device=device, dtype=torch.float32)
        with ForwardHooks(self.model, self._hooked, owner="HFCrossAttentionNetwork") as hooks:
            res = self.model(input_ids=ids, pixel_values=pixels, attention_mask=mask, use_itm_head=True,
                             return_dict=True)
        fused = getattr(res, "question_embeds", None)
        if not isinstance(fused, torch.Tensor):
            raise ValueError(f"HFCrossAttentionNetwork({self.path}): {type(self.model).__name__} returned no "
                             "cross-attended text states (question_embeds)")
        out: dict[str, torch.Tensor] = {}
        for name in self.layers:
            if name in self._hooked:
                out[name] = _pool(hooks.out[name], len(frames))
            elif name == "multimodal":
                out[name] = self._pooled(fused, mask)
            elif name == "image":
                out[name] = self._pooled(res.last_hidden_state, None)
            else:  # text: the text encoder alone (its cross-attention layers skipped without image states)
                text = self.model.text_encoder(input_ids=ids, attention_mask=mask, return_dict=True)
                out[name] = self._pooled(text.last_hidden_state, mask)
        return out


class SlipNetwork(FeatureNetwork):
    """A model of the SLIP repository (SLIP, CLIP or SimCLR, ViT-S/B/L-16; the paper's controlled pair is SLIP vs
    SimCLR: the same ViT-B/16 trained with and without language) from its released checkpoint file.

    The checkpoint is the repository's own ``.pt`` (see :mod:`neurovision.pretrained.slip`); the architecture's
    sizes come from its weights, the model name from its ``args`` (or ``model``, which must then agree).
    ``trained=False`` is the same architecture randomly initialised (seeded; the checkpoint, when given, only
    supplies the sizes). Frames are resized (shortest side, bilinear) and centre-cropped to the model's image size
    and normalised with the ImageNet mean/std, as the repository evaluates; sentences use CLIP's BPE tokenizer.

    Layers: ``"pooled"`` (the vision trunk's output, the representation SLIP and SimCLR share; default for
    ``vision``), ``"embedding"`` (the L2-normalised projected image or text embedding, CLIP/SLIP; default for
    ``language`` and ``multimodal``, where it is the fused pair feature as in :class:`OpenClipNetwork`),
    ``"ssl"`` (the SimCLR projection head's output, SimCLR/SLIP), or module names (``"visual.blocks.5"``,
    ``"transformer.resblocks.3"``: forward hooks, mean-pooled over tokens).
    """

    MEAN = (0.485, 0.456, 0.406)
    STD = (0.229, 0.224, 0.225)

    def __init__(
        self,
        checkpoint: str | None = None,
        model: SlipModelName | None = None,
        trained: bool = True,
        modality: Literal["vision", "language", "multimodal"] = "vision",
        fusion: Literal["concat", "product", "concat_product"] = "concat_product",
        layers: list[str] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        from neurovision.pretrained.slip import SlipModel, load_slip_checkpoint, slip_arch

        self.checkpoint = None if checkpoint is None else str(checkpoint)
        self.trained, self.seed = bool(trained), int(seed)
        self.modality = check_modality(modality)
        if fusion not in ("concat", "product", "concat_product"):
            raise ValueError(f"fusion must be concat, product or concat_product, got {fusion!r}")
        self.fusion = fusion
        if self.trained:
            _check_checkpoint("SlipNetwork", model or "SLIP", self.checkpoint, "SLIP-repository checkpoint (.pt)")
        elif self.checkpoint is not None and not Path(self.checkpoint).is_file():
            raise FileNotFoundError(f"SLIP-repository checkpoint not found: {self.checkpoint} (set "
                                    f"`{_yaml_key('SlipNetwork', 'checkpoint')}` to a local file, or leave it "
                                    "unset with trained: false and a model name)")
        sd, recorded = load_slip_checkpoint(self.checkpoint) if self.checkpoint is not None else (None, None)
        if model is not None and recorded is not None and model != recorded:
            raise ValueError(f"{self.checkpoint}: the checkpoint is a {recorded}, but "
                             f"`{_yaml_key('SlipNetwork', 'model')}` says {model}")
        name = model or recorded
        if name is None:
            raise ValueError(f"SlipNetwork: set `{_yaml_key('SlipNetwork', 'model')}` (the checkpoint "
                             f"{self.checkpoint or '(none)'} does not record its model)")
        self.model_name = name
        self.arch = slip_arch(name, sd)
        if self.modality != "vision" and not self.arch.has_text:
            raise ValueError(f"SlipNetwork({name}): a {self.arch.family} model has no text tower; modality "
                             f"{self.modality!r} needs SLIP or CLIP")
        default = "pooled" if self.modality == "vision" else "embedding"
        self.layers = list(layers) if layers else [default]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            net = SlipModel(self.arch)
        if self.trained and sd is not None:
            missing, unexpected = net.load_state_dict(sd, strict=False)
            if missing or unexpected:
                raise ValueError(f"{self.checkpoint}: does not fit {name} (missing {missing[:5]}, unexpected "
                                 f"{unexpected[:5]})")
        self.model = net.eval().requires_grad_(False)
        self._hooked = [n for n in self.layers if n not in ("pooled", "embedding", "ssl")]
        check_module_names(self.model, self._hooked, f"SlipNetwork({name})")
        self._tower = {n: ("vision" if n.split(".")[0] in ("visual", "image_mlp") else "language")
                       for n in self._hooked}
        for layer in self.layers:
            tower = self._tower.get(layer, "vision" if layer in ("pooled", "ssl") else None)
            if tower is not None and self.modality != "multimodal" and tower != self.modality:
                raise ValueError(f"SlipNetwork: layer {layer!r} is in the {tower} tower, which modality "
                                 f"{self.modality!r} does not run")
            if layer == "embedding" and not self.arch.has_text:
                raise ValueError(f"SlipNetwork({name}): layer 'embedding' needs a CLIP/SLIP model (SimCLR has "
                                 "no projection to a text space; use 'pooled' or 'ssl')")
            if layer == "ssl" and not self.arch.has_ssl_head:
                raise ValueError(f"SlipNetwork({name}): layer 'ssl' needs a SimCLR/SLIP model")
            if layer in ("pooled", "ssl") and self.modality == "multimodal":
                raise ValueError(f"SlipNetwork: layer {layer!r} is the vision tower's; in multimodal mode use "
                                 "'embedding' or module names")
        if self.arch.has_text:
            from open_clip.tokenizer import SimpleTokenizer

            self.tokenizer = SimpleTokenizer(context_length=self.arch.context_length)
        weights = (f"sha256:{file_digest(self.checkpoint)[:16]}" if self.trained and self.checkpoint
                   else f"random-seed{self.seed}")
        fusion_id = f"|fusion={self.fusion}" if self.modality == "multimodal" else ""
        self._id = (f"SlipNetwork:{name}|arch={json_digest(dataclasses.asdict(self.arch))[:12]}|weights={weights}"
                    f"|modality={self.modality}{fusion_id}|layers={','.join(self.layers)}"
                    f"|pp={self.arch.image_size}px,bilinear,shortest,mean={format_floats(self.MEAN)},"
                    f"std={format_floats(self.STD)}")

    @property
    def model_id(self) -> str:
        return self._id

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) -> the normalised input of the vision tower, on the model's device."""
        x = _images({"frames": frames}, "SlipNetwork").to(_device_of(self.model))
        x = resize_images(x, self.arch.image_size, "bilinear", "shortest").clamp_(0, 1)
        return _normalise(x, self.MEAN, self.STD)

    def fuse(self, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        """The multimodal pair feature of (normalised) image and text embeddings (:func:`fuse_pair`)."""
        return fuse_pair(img, txt, self.fusion)

    @torch.no_grad()
    def extract(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        m = cast(Any, self.model)
        pooled = ssl = img = txt = tokens = None
        n = 0
        with ForwardHooks(self.model, self._hooked) as hooks:
            if self.modality in ("vision", "multimodal"):
                x = self.preprocess(batch.get("frames"))  # type: ignore[arg-type]
                n = x.shape[0]
                pooled = m.visual(x).float()
                if "ssl" in self.layers or any(n.startswith("image_mlp.") for n in self._hooked):
                    ssl = m.image_mlp(pooled).float()
                if self.arch.has_text:
                    img = torch.nn.functional.normalize(pooled @ m.image_projection, dim=-1)
            if self.modality in ("language", "multimodal"):
                sentences = _sentences(batch, "SlipNetwork")
                n = len(sentences)
                tokens = self.tokenizer(sentences).to(_device_of(self.model))
                txt = torch.nn.functional.normalize(m.encode_text(tokens).float(), dim=-1)
        out: dict[str, torch.Tensor] = {}
        for name in self.layers:
            if name == "pooled":
                out[name] = cast(torch.Tensor, pooled)
            elif name == "ssl":
                out[name] = cast(torch.Tensor, ssl)
            elif name == "embedding":
                emb = img if txt is None else txt if img is None else self.fuse(img, txt)
                out[name] = cast(torch.Tensor, emb)
            else:
                if name not in hooks.out:  # pragma: no cover - every tower a layer needs is run above
                    raise RuntimeError(f"SlipNetwork: layer {name!r} was not run")
                mask = (tokens != 0) if (self._tower[name] == "language" and tokens is not None) else None
                out[name] = _pool(hooks.out[name], n, mask)
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
        self.modality = check_modality(modality)
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


__all__ = [
    "FeatureNetwork", "HFCrossAttentionNetwork", "HFFusedNetwork", "HFPairNetwork", "HFTextNetwork", "MODALITIES", "Modality",
    "OpenClipNetwork", "PhantomOracle", "SlipNetwork", "TimmVisionNetwork", "check_modality", "fuse_pair", "pool_tokens",
]
