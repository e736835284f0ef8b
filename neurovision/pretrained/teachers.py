"""Teachers for stage-1 alignment: what the fMRI encoder regresses onto, computed once per stimulus.

- :class:`OpenCLIPImageTeacher`: an ``open_clip`` CLIP model (``ViT-L-14`` + a local checkpoint in real runs;
  a tiny model from a custom config JSON for CPU runs and tests). ``encode`` gives the (L2-normalised) image
  embedding after the model's own preprocessing; ``encode_text`` the text embedding (concept words, captions).
- :class:`VAETeacher`: a ``diffusers`` :class:`~diffusers.AutoencoderKL` (the ``vae`` folder of SD-2.1 in real
  runs; a tiny config for CPU runs). ``encode`` gives ``latent_dist.mean * scaling_factor``; ``decode`` the
  inverse, back to uint8 images.
- :class:`TeacherCache`: targets for every stimulus of a store, cached in ``<store stem>.teachers.h5`` next
  to the store, keyed by the teacher's :attr:`id` (model + weights digest + preprocessing) and validated
  against the store's fingerprint.

Devices: construction never touches an accelerator (LightningCLI builds teachers while parsing, before each
DDP rank has its device). A teacher built with ``device=None`` stays on the CPU until it is placed where it is
used: :func:`place` / :func:`placed` / :func:`release`; a Lightning task places its teachers on the rank's own
device (:meth:`neurovision.tasks.base.BaseTask.place_teachers`, at test start for scorers; the stage-1 cache
fill through :class:`TeacherCache`'s ``device``); code outside Lightning uses :func:`default_device`. An explicit
``device`` pins a teacher (applied at first use).

Nothing here downloads: a checkpoint is always a local path, and a missing one is a
:class:`FileNotFoundError` naming the path and the YAML key that sets it. Teachers are plain objects, not
``nn.Module``s, so a LightningModule holding one does not put hundreds of millions of frozen weights into
its checkpoints or its optimiser.

Cache file layout (``CACHE_SCHEMA_VERSION`` 2: entries carry HDF5's Fletcher32 checksum per chunk)::

    /                   attrs: schema="neurovision.teachers", schema_version, store (path when written)
    /entries/<sha256(teacher id|dtype)[:32]>   (S, *output_shape) float16|float32, chunked by rows
                        attrs: teacher_id, store_fingerprint, n_stimuli, image_shape, complete, created

Write protocol: the one of every neurovision entry cache (:class:`neurovision.data.cache.EntryCache`, chosen
over in-place appends because HDF5 is not crash-safe while a file is open for writing): a writer takes an exclusive
``flock`` on ``<cache>.lock``, re-checks the entry (another process may have written it meanwhile), then builds a
*new* file (``.<cache>.*.partial``) holding a copy of every other still-valid entry plus the new one, computed
straight into it batch by batch, and ``os.replace``-s it over the cache. Readers never lock: they see either the old
or the new complete file. An exception or a killed process leaves the old cache untouched (and at most a
``*.partial`` file, removed on exceptions). Adding an entry copies the others (one checksummed read of each: a few MB
for the phantom; ~GB for full NSD VAE latents, and a new teacher is rare). Entries written for another store
fingerprint (the store was regenerated) are stale: recomputed on request and pruned on the next write.

Integrity: HDF5 verifies each chunk's checksum when the entry is read; an entry with a damaged chunk (or a cache of
an older version, without checksums) is stale like the others: a warning naming the file, the teacher and the bad
rows, then it is recomputed (never used). Entries are copied into a new file only when they read back intact.

Under DDP (a ``torch.distributed`` process group of more than one rank, e.g. ``AlignmentTask.setup``) a missing
entry is filled by all ranks at once: each encodes its contiguous shard of the stimuli on its own device, global
rank 0 gathers the shards and writes the entry as above, then every rank reads it (NSD's 37k images through
CLIP ViT-L/14 + the SD VAE: 1/8 of the time on 8 GPUs instead of one rank computing while 7 wait on the lock).
The gather is one ``gather_object`` of every shard: rank 0 holds the whole entry in memory (pickled, then as
arrays) while it writes, ~5.5 GB for NSD's VAE latents in float32.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import h5py
import numpy as np
import torch
import torch.nn.functional as F

from neurovision.data.cache import (
    EntryCache,
    dir_digest,
    dist_context,
    entry_problem,
    file_digest,
    finish_entry,
    format_floats,
    json_digest,
    shard_bounds,
    start_entry,
    store_key,
)
from neurovision.data.store import Store, first_bad_rows

log = logging.getLogger("neurovision.teachers")

CLIP_CHECKPOINT_KEY = "model.init_args.clip_teacher.init_args.checkpoint"
CLIP_CONFIG_KEY = "model.init_args.clip_teacher.init_args.model_config"
VAE_PATH_KEY = "model.init_args.vae_teacher.init_args.path"
VAE_CONFIG_KEY = "model.init_args.vae_teacher.init_args.config"

CACHE_SCHEMA = "neurovision.teachers"
#: 2: entries checksummed (Fletcher32); version-1 caches are rebuilt
CACHE_SCHEMA_VERSION = 2

#: A tiny AutoencoderKL for 64 px CPU runs: 3 blocks (2 downsamplings) -> 4 x 16 x 16 latents at 64 px.
#: (SD's VAE has 4 blocks, /8; two blocks would give only /2, i.e. 32 x 32 latents at 64 px.) Channels
#: (16, 32, 64): a first block of 32 channels at full resolution made training ~4x slower on a CPU. Four
#: GroupNorm groups: with one channel per group (16 groups) GroupNorm is an instance norm that erases each
#: channel's absolute level, and the VAE reached 28.9 dB test PSNR on the phantom instead of 32.6 dB.
TINY_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [16, 32, 64],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 4,
    "sample_size": 64,
}


@runtime_checkable
class Teacher(Protocol):
    """What :class:`TeacherCache` needs: a unique id, the per-stimulus output shape and ``encode``."""

    @property
    def id(self) -> str: ...

    @property
    def output_shape(self) -> tuple[int, ...]: ...

    def encode(self, images: torch.Tensor) -> torch.Tensor: ...


# --------------------------------------------------------------------------------------------- devices
CPU = torch.device("cpu")


def default_device() -> torch.device:
    """The device of teachers used outside Lightning (``prepare``, scripts, ``neurovision localize``):
    ``cuda:<LOCAL_RANK>`` (``cuda:0`` without ``LOCAL_RANK``) when CUDA is available, else the CPU.

    Inside a Lightning run a task puts its teachers on the rank's own device instead
    (``trainer.strategy.root_device``, see :func:`place` and :meth:`neurovision.tasks.base.BaseTask.place_teachers`).
    """
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK") or 0))
    return CPU


def _resolve(device: torch.device) -> torch.device:
    """An index-less ``cuda`` is the current CUDA device *when it is used* (Lightning sets it per rank)."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class _Placement:
    """Device handling shared by the teachers.

    A teacher built with ``device=None`` (the default) is *unpinned*: built on the CPU and moved to where it is
    used by :func:`place` (a task: the rank's own device; :class:`TeacherCache`: its ``device``). A teacher built
    with an explicit ``device`` is *pinned* there (:func:`place` leaves it), but construction still never
    touches an accelerator: the weights move at first use (:meth:`ready`), and an index-less ``cuda`` means
    the current CUDA device at that moment (under DDP, the rank's own).
    """

    pinned: bool
    device: torch.device
    _weights_on: torch.device

    def _net(self) -> torch.nn.Module:  # pragma: no cover - overridden
        raise NotImplementedError

    def _init_device(self, device: str | torch.device | None) -> None:
        self.pinned = device is not None
        self.device = CPU if device is None else torch.device(device)
        self._weights_on = CPU  # built on the CPU; moved at first use or by place()/to()

    @property
    def weights_device(self) -> torch.device:
        """Where the weights are now (``device`` is where they go at the next use)."""
        return self._weights_on

    def _move(self, device: torch.device) -> None:
        self._net().to(device)
        self._weights_on = device

    def to(self, device: str | torch.device) -> Any:
        """Run on ``device`` from now on; the weights move now (an explicit move, also for a pinned teacher)."""
        self.device = _resolve(torch.device(device))
        self._move(self.device)
        return self

    def ready(self) -> Any:
        """Move the weights to :attr:`device` if they are not there yet (called before every use)."""
        dev = _resolve(self.device)
        self.device = dev
        if self._weights_on != dev:
            self._move(dev)
        return self

    def offload(self) -> Any:
        """Weights back to the CPU (frees accelerator memory). An unpinned teacher then runs on the CPU until
        placed again; a pinned one moves back to its device at its next use."""
        if self._weights_on != CPU:
            self._move(CPU)
        if not self.pinned:
            self.device = CPU
        return self


def place(teacher: Any, device: str | torch.device, *, lazy: bool = False) -> Any:
    """Put an unpinned teacher (built with ``device=None``) on ``device``; returns it.

    ``lazy``: only set where it runs; the weights move at its first use (:meth:`_Placement.ready`), so a teacher
    that is never called costs no accelerator memory. A teacher pinned by an explicit ``device`` (YAML
    ``init_args.device``) keeps it; ``None`` passes through. Objects without a ``pinned`` attribute (other
    :class:`Teacher` implementations) are moved with their ``to(device)`` when they have one.
    """
    if teacher is None or getattr(teacher, "pinned", False) or not callable(getattr(teacher, "to", None)):
        return teacher
    if lazy and isinstance(teacher, _Placement):
        teacher.device = torch.device(device)
    else:
        teacher.to(device)
    return teacher


def release(teacher: Any) -> Any:
    """Free the accelerator memory of a teacher that is not needed for now (weights back to the CPU)."""
    if teacher is not None and callable(getattr(teacher, "offload", None)):
        teacher.offload()
    return teacher


@contextlib.contextmanager
def placed(teacher: Any, device: str | torch.device) -> Iterator[Any]:
    """:func:`place` ``teacher`` on ``device`` for the block, then put it back as it was (an unpinned teacher
    returns to the CPU, a pinned one's weights leave the accelerator again if they were not on it before)."""
    if teacher is None:
        yield teacher
        return
    restore = _restorer(teacher)
    place(teacher, device)
    try:
        yield teacher
    finally:
        restore()


def _restorer(teacher: Any) -> Callable[[], None]:
    """What puts ``teacher`` back where it is now (for :func:`placed`)."""
    if isinstance(teacher, _Placement):
        before_device, before_weights = teacher.device, teacher.weights_device

        def restore_placement() -> None:
            if teacher.weights_device != before_weights:
                if before_weights == CPU:
                    teacher.offload()
                else:
                    teacher.to(before_weights)
            teacher.device = before_device

        return restore_placement
    before = getattr(teacher, "device", None)

    def restore_other() -> None:
        if before is not None and callable(getattr(teacher, "to", None)) and not getattr(teacher, "pinned", False):
            teacher.to(before)

    return restore_other


def _check_images(images: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4 \
            or images.shape[1] != 3:
        shape = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
        dtype = getattr(images, "dtype", "?")
        raise ValueError(f"images must be a uint8 tensor (B, 3, H, W), got {dtype} {shape}")
    return images


def resize_images(x: torch.Tensor, size: int | Sequence[int], interpolation: str = "bicubic",
                  resize_mode: str = "shortest", fill: float = 0.0) -> torch.Tensor:
    """Resize float images (B, C, H, W) like open_clip's eval transform, with torchvision's v2 functional ops.

    ``shortest``: shortest side to ``size`` then centre crop (a square ``size``: ``Resize(size)`` +
    ``CenterCrop``, exactly open_clip's); ``longest``: longest side to ``size`` then pad with ``fill``;
    ``squash``: straight to ``size`` (aspect not kept). A no-op when already that size.
    """
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    th, tw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    h, w = x.shape[-2:]
    if (h, w) == (th, tw):
        return x
    mode = {"bilinear": InterpolationMode.BILINEAR, "nearest": InterpolationMode.NEAREST}.get(
        interpolation, InterpolationMode.BICUBIC)
    antialias = mode != InterpolationMode.NEAREST
    if resize_mode == "squash":
        return TF.resize(x, [th, tw], interpolation=mode, antialias=antialias)
    if resize_mode == "longest":
        s = min(th / h, tw / w)
        nh, nw = max(1, round(h * s)), max(1, round(w * s))
        y = TF.resize(x, [nh, nw], interpolation=mode, antialias=antialias)
        top, left = (th - nh) // 2, (tw - nw) // 2
        return F.pad(y, (left, tw - nw - left, top, th - nh - top), value=fill)
    if th == tw:  # the shorter side to th, the longer in proportion (torchvision's rounding), then centre crop
        y = TF.resize(x, [th], interpolation=mode, antialias=antialias)
    else:
        s = max(th / h, tw / w)
        y = TF.resize(x, [max(th, round(h * s)), max(tw, round(w * s))], interpolation=mode, antialias=antialias)
    return TF.center_crop(y, [th, tw])


# --------------------------------------------------------------------------------------------- open_clip
_OC_REGISTRY_DIR: Path | None = None


def read_clip_config(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model config, preprocess overrides) from an open_clip config JSON.

    Accepts both open_clip's ``model_configs/*.json`` form (``embed_dim``, ``vision_cfg``, ``text_cfg``) and
    its ``open_clip_config.json`` form (``{"model_cfg": ..., "preprocess_cfg": ...}``).
    """
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    pp: dict[str, Any] = {}
    if "model_cfg" in cfg:
        pp = dict(cfg.get("preprocess_cfg") or {})
        cfg = cfg["model_cfg"]
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in cfg]
    if missing:
        raise ValueError(f"{path}: not an open_clip model config (missing {missing})")
    return cfg, pp


def register_clip_config(model_name: str, cfg: dict[str, Any]) -> str:
    """Register ``cfg`` with open_clip under a name unique to its content; returns that name.

    ``open_clip.add_model_config`` keys configs by file stem, so two different configs both called
    ``tiny_clip.json`` would overwrite each other; we register a copy named ``<model_name>-<digest>``.
    """
    import open_clip

    name = f"{model_name.replace('/', '-')}-{json_digest(cfg)[:12]}"
    if name in open_clip.list_models():
        return name
    global _OC_REGISTRY_DIR
    if _OC_REGISTRY_DIR is None:
        _OC_REGISTRY_DIR = Path(tempfile.mkdtemp(prefix="neurovision-open_clip-configs-"))
        atexit.register(shutil.rmtree, _OC_REGISTRY_DIR, True)
    f = _OC_REGISTRY_DIR / f"{name}.json"
    f.write_text(json.dumps(cfg, sort_keys=True))
    open_clip.add_model_config(f)
    return name


def resolve_clip_arch(model_name: str, model_config: str | None, key: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(open_clip architecture name, model config, preprocess overrides) of ``model_name``, or of the custom
    config JSON ``model_config`` (registered under a content-unique name); errors name the YAML ``key``."""
    import open_clip

    if model_config is not None:
        if not Path(model_config).is_file():
            raise FileNotFoundError(f"open_clip model config not found: {model_config} (set `{key}`)")
        cfg, pp_override = read_clip_config(model_config)
        return register_clip_config(model_name, cfg), cfg, pp_override
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise ValueError(f"unknown open_clip architecture {model_name!r}: set `{key}` (a config JSON) or use one "
                         "of open_clip.list_models()")
    return model_name, cfg, {}


class OpenCLIPImageTeacher(_Placement):
    """CLIP image (and text) embeddings from an ``open_clip`` model, with the model's own preprocessing.

    Args:
        model_name: an open_clip architecture (``ViT-L-14``; OpenAI weights need ``ViT-L-14-quickgelu``),
            or the name to give the architecture in ``model_config``.
        checkpoint: a local open_clip checkpoint file (state dict, ``.bin``/``.pt``/``.safetensors``). ``None``
            initialises the weights randomly (seeded by ``seed``). Pretrained *tags* are never downloaded.
        model_config: path to an open_clip model config JSON (a custom, e.g. tiny, architecture).
        image_size: override the vision tower's input size (positional embeddings are interpolated).
        normalize: L2-normalise the embeddings (CLIP's convention; the paper's target).
        seed: seed of the random initialisation when there is no checkpoint.
        device: where the model runs. ``None`` (default): built on the CPU and placed on the device of the
            run that uses it (the rank's own under DDP; :class:`TeacherCache` outside Lightning:
            :func:`default_device`). An explicit device pins it there (moved at first use, never at
            construction; an index-less ``cuda`` is the current CUDA device then).
        batch_size: chunk size of :meth:`encode_text` and the default batch of :class:`TeacherCache`.
    """

    def __init__(
        self,
        model_name: str = "ViT-L-14",
        checkpoint: str | None = None,
        model_config: str | None = None,
        image_size: int | None = None,
        normalize: bool = True,
        seed: int = 0,
        device: str | None = None,
        batch_size: int = 64,
    ) -> None:
        import open_clip

        self.model_name = model_name
        self.checkpoint = None if checkpoint is None else str(checkpoint)
        self.model_config = None if model_config is None else str(model_config)
        self.normalize = normalize
        self.seed = seed
        self.batch_size = batch_size
        if self.checkpoint is not None and not Path(self.checkpoint).is_file():
            raise FileNotFoundError(
                f"CLIP teacher checkpoint not found: {self.checkpoint} (set `{CLIP_CHECKPOINT_KEY}` to a local "
                "open_clip checkpoint file; nothing is downloaded)")
        arch, cfg, pp_override = resolve_clip_arch(model_name, self.model_config, CLIP_CONFIG_KEY)
        self._arch = arch
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = open_clip.create_model(
                arch, pretrained=self.checkpoint, force_image_size=image_size,
                force_preprocess_cfg=pp_override or None, device="cpu",
            )
        model.eval().requires_grad_(False)
        self.model = model
        self._init_device(device)
        self.preprocess_cfg: dict[str, Any] = dict(open_clip.get_model_preprocess_cfg(model))
        self.tokenizer = open_clip.get_tokenizer(arch)
        self._cfg = cfg
        self._dim = int(cfg["embed_dim"])
        weights = f"sha256:{file_digest(self.checkpoint)[:16]}" if self.checkpoint else f"random(seed={seed})"
        pp = self.preprocess_cfg
        size = pp["size"] if isinstance(pp["size"], int) else "x".join(str(s) for s in pp["size"])
        self._id = (
            f"open_clip:{model_name}|arch={json_digest(cfg)[:12]}|weights={weights}"
            f"|pp={size}px,{pp.get('interpolation')},{pp.get('resize_mode')},"
            f"mean={format_floats(pp['mean'])},std={format_floats(pp['std'])}|l2norm={int(normalize)}"
        )

    # identity -------------------------------------------------------------------------------------
    @property
    def id(self) -> str:
        """Unique to architecture, weights content and preprocessing (the cache key)."""
        return self._id

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def output_shape(self) -> tuple[int, ...]:
        return (self._dim,)

    @property
    def image_size(self) -> tuple[int, int]:
        s = self.preprocess_cfg["size"]
        return (s, s) if isinstance(s, int) else (int(s[0]), int(s[1]))

    def _net(self) -> torch.nn.Module:
        return self.model

    def __repr__(self) -> str:
        return f"OpenCLIPImageTeacher({self._id})"

    # encoding -------------------------------------------------------------------------------------
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> the float, resized, normalised input of the vision tower (on its device)."""
        self.ready()
        x = _check_images(images).to(self.device, torch.float32) / 255.0
        pp = self.preprocess_cfg
        fill = float(pp.get("fill_color", 0)) / 255.0
        x = resize_images(x, self.image_size, pp.get("interpolation", "bicubic"),
                          pp.get("resize_mode", "shortest"), fill).clamp_(0, 1)
        mean = torch.as_tensor(pp["mean"], dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.as_tensor(pp["std"], dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (B, 3, H, W) -> float32 image embeddings (B, D) on the CPU."""
        feats = self.model.encode_image(self.preprocess(images), normalize=self.normalize)
        return feats.float().cpu()

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Strings -> float32 text embeddings (B, D) on the CPU (normalised like the images)."""
        if isinstance(texts, str):
            raise TypeError("encode_text takes a list of strings, not a single string")
        self.ready()
        out = []
        for i in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(list(texts[i:i + self.batch_size])).to(self.device)
            out.append(self.model.encode_text(tokens, normalize=self.normalize).float().cpu())
        return torch.cat(out) if out else torch.empty(0, self._dim)


# --------------------------------------------------------------------------------------------- diffusers
class VAETeacher(_Placement):
    """SD-VAE latents of the stimuli from a ``diffusers`` :class:`~diffusers.AutoencoderKL`.

    Args:
        path: a local ``from_pretrained`` folder: SD-2.1's ``vae`` folder (or the pipeline root holding it).
        config: instead of ``path``, build a randomly initialised VAE from a config: a JSON file path or the
            built-in ``"tiny"`` preset (:data:`TINY_VAE_CONFIG`).
        image_size: images are resized (bicubic, square) to this before encoding (SD-2.1: 512 or 768).
        sample: encode with ``latent_dist.sample()`` (seeded) instead of its mean.
        seed: seed of the random initialisation (``config``) and of the sampling.
        device: where the model runs, as for :class:`OpenCLIPImageTeacher` (``None``: placed by the user).
        batch_size: the default batch of :class:`TeacherCache`.
    """

    def __init__(
        self,
        path: str | None = None,
        config: str | None = None,
        image_size: int = 512,
        sample: bool = False,
        seed: int = 0,
        device: str | None = None,
        batch_size: int = 16,
    ) -> None:
        from diffusers import AutoencoderKL

        if path is not None and not Path(path).exists():  # before the one-of check: a preset may set `config`
            raise FileNotFoundError(
                f"VAE teacher folder not found: {path} (set `{VAE_PATH_KEY}` to a local AutoencoderKL folder, e.g. "
                "stable-diffusion-2-1/vae; nothing is downloaded)")
        if (path is None) == (config is None):
            raise ValueError(f"VAETeacher needs exactly one of `path` ({VAE_PATH_KEY}) and `config` "
                             f"({VAE_CONFIG_KEY}), got path={path!r}, config={config!r}")
        self.path = None if path is None else str(path)
        self.config = None if config is None else str(config)
        self.image_size = int(image_size)
        self.sample = sample
        self.seed = seed
        self.batch_size = batch_size
        if self.path is not None:
            p = Path(self.path)
            if (p / "vae" / "config.json").is_file():  # the root of a diffusers pipeline
                p = p / "vae"
            if not (p / "config.json").is_file():
                raise FileNotFoundError(
                    f"VAE teacher folder not found (no config.json): {self.path} (set `{VAE_PATH_KEY}` to a "
                    "local AutoencoderKL folder, e.g. stable-diffusion-2-1/vae; nothing is downloaded)")
            vae = AutoencoderKL.from_pretrained(p, local_files_only=True)
            weights = f"sha256:{dir_digest(p)[:16]}"
        else:
            if self.config == "tiny":
                cfg = dict(TINY_VAE_CONFIG)
            else:
                if not Path(self.config).is_file():  # type: ignore[arg-type]
                    raise FileNotFoundError(f"VAE config not found: {self.config} (set `{VAE_CONFIG_KEY}` to "
                                            "a config JSON or 'tiny')")
                cfg = json.loads(Path(self.config).read_text())  # type: ignore[arg-type]
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                vae = AutoencoderKL.from_config(cfg)
            weights = f"random(seed={seed})"
        vae.eval().requires_grad_(False)
        self.vae = vae
        self._init_device(device)
        c = vae.config
        self.scaling_factor = float(c.scaling_factor)
        self.shift_factor = None if c.shift_factor is None else float(c.shift_factor)
        self.downsample = 2 ** (len(c.block_out_channels) - 1)
        if self.image_size % self.downsample:
            raise ValueError(f"image_size {self.image_size} is not a multiple of the VAE's downsampling "
                             f"factor {self.downsample}")
        arch = {k: v for k, v in dict(c).items() if not k.startswith("_")}
        self._id = (
            f"diffusers:AutoencoderKL|arch={json_digest(arch)[:12]}|weights={weights}"
            f"|pp={self.image_size}px,bicubic,squash,[-1,1]|z={f'sample(seed={seed})' if sample else 'mean'}"
            f"*{self.scaling_factor:.6g}" + (f"-{self.shift_factor:.6g}" if self.shift_factor is not None else "")
        )

    @property
    def id(self) -> str:
        """Unique to architecture, weights content, image size, scaling and mean/sample."""
        return self._id

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        s = self.image_size // self.downsample
        return (int(self.vae.config.latent_channels), s, s)

    @property
    def output_shape(self) -> tuple[int, ...]:
        return self.latent_shape

    def _net(self) -> torch.nn.Module:
        return self.vae

    def __repr__(self) -> str:
        return f"VAETeacher({self._id})"

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> float in [-1, 1] at ``image_size`` (on the VAE's device)."""
        self.ready()
        x = _check_images(images).to(self.device, torch.float32) / 255.0
        x = resize_images(x, self.image_size, "bicubic", "squash").clamp_(0, 1)
        return x * 2 - 1

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (B, 3, H, W) -> scaled latents (B, C, h, w), float32 on the CPU."""
        dist = self.vae.encode(self.preprocess(images)).latent_dist
        if self.sample:
            g = torch.Generator(device=self.device).manual_seed(self.seed)
            z = dist.sample(generator=g)
        else:
            z = dist.mean
        if self.shift_factor is not None:
            z = z - self.shift_factor
        return (z * self.scaling_factor).float().cpu()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, C, h, w) -> uint8 images (B, 3, image_size, image_size) on the CPU."""
        self.ready()
        z = latents.to(self.device, torch.float32) / self.scaling_factor
        if self.shift_factor is not None:
            z = z + self.shift_factor
        x = self.vae.decode(z).sample
        return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


# --------------------------------------------------------------------------------------------- cache
def entry_name(teacher_id: str, dtype: str = "float32") -> str:
    """The HDF5 name of the entry for a teacher id stored as ``dtype``."""
    return hashlib.sha256(f"{teacher_id}|{np.dtype(dtype).name}".encode()).hexdigest()[:32]


def cache_file(path: str | os.PathLike[str]) -> EntryCache:
    """The teacher cache at ``path`` as an :class:`~neurovision.data.cache.EntryCache` (schema, version, messages)."""
    return EntryCache(path, CACHE_SCHEMA, CACHE_SCHEMA_VERSION, kind="teacher cache", id_attr="teacher_id",
                      logger=log)


class TeacherCache:
    """Teacher targets for every stimulus of a store, computed once and kept in ``<store stem>.teachers.h5``.

    Args:
        path: the cache file; default: ``<store stem>.teachers.h5`` next to each store passed to :meth:`get`.
        dtype: storage (and returned) dtype, ``float32`` or ``float16`` (half the disk; ~1e-3 relative error).
        batch_size: images per ``encode`` call (default: the teacher's ``batch_size`` attribute, else 64).
        progress: show a tqdm bar while computing.
        device: where an unpinned teacher computes a missing entry (:func:`placed`: moved there for the fill and
            back to the CPU afterwards, so no teacher stays on an accelerator once its targets are cached).
            Default :func:`default_device` (``cuda:<LOCAL_RANK>`` when CUDA is available); a Lightning task
            passes its rank's own device. Reading a complete entry never moves a teacher.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        dtype: Literal["float32", "float16"] = "float32",
        batch_size: int | None = None,
        progress: bool = True,
        device: str | torch.device | None = None,
    ) -> None:
        if dtype not in ("float32", "float16"):
            raise ValueError(f"dtype must be 'float32' or 'float16', got {dtype!r}")
        self.device = None if device is None else torch.device(device)
        self.path = None if path is None else Path(path)
        self.dtype = np.dtype(dtype)
        self.batch_size = batch_size
        self.progress = progress

    @staticmethod
    def default_path(store_path: str | os.PathLike[str]) -> Path:
        p = Path(store_path)
        return p.with_name(f"{p.stem}.teachers.h5")

    def cache_path(self, store: Store) -> Path:
        return self.path if self.path is not None else self.default_path(store.path)

    # public ---------------------------------------------------------------------------------------
    def get(self, store: Store | str | os.PathLike[str], teacher: Teacher, *, force: bool = False,
            distributed: bool | None = None) -> np.ndarray:
        """(S, *teacher.output_shape) targets for all S stimuli of ``store``: read, or computed and cached.

        Under DDP (``distributed=None``: a ``torch.distributed`` process group of more than one rank exists; every
        rank must then call ``get``, as ``AlignmentTask.setup`` does) a missing entry is filled by all ranks: each
        encodes its contiguous shard of the stimuli (:func:`shard_bounds`) on ``device``, global rank 0 gathers
        the shards and writes the entry, and every rank reads it. ``distributed=False``: one process fills the
        whole entry (other processes wait on the file lock), as without a process group.
        """
        store = store if isinstance(store, Store) else Store(store)
        path = self.cache_path(store)
        ctx = dist_context() if distributed is None or distributed else None
        if distributed and ctx is None:
            raise RuntimeError("TeacherCache.get(distributed=True) needs an initialised torch.distributed "
                               "process group of more than one rank")
        data = None if force else self._read(path, store, teacher, quiet=ctx is not None and ctx[0] != 0)
        if ctx is not None:
            import torch.distributed as dist

            have = [False] * ctx[1]
            dist.all_gather_object(have, data is not None)  # one decision for all ranks (no rank fills alone)
            if all(have) and data is not None:  # every rank read it, this one too
                return data
            self._fill_sharded(path, store, teacher, *ctx, force=force)
        else:
            if data is not None:
                return data
            with cache_file(path).locked():
                if not force:  # another process may have computed it while we waited for the lock
                    data = self._read(path, store, teacher, quiet=True)
                    if data is not None:
                        return data
                with placed(teacher, self._fill_device()):
                    self._compute_and_write(path, store, teacher)
        data = self._read(path, store, teacher)
        if data is None:  # pragma: no cover - we just wrote it
            raise RuntimeError(f"{path}: entry for {teacher.id} unreadable right after writing it")
        return data

    def entries(self, store: Store | str | os.PathLike[str]) -> list[dict[str, Any]]:
        """Attributes (``teacher_id``, ``store_fingerprint``, ..., ``shape``, ``dtype``) of every entry in the
        cache of ``store`` (empty when there is no cache)."""
        store = store if isinstance(store, Store) else Store(store)
        return cache_file(self.cache_path(store)).entries(
            lambda ds: {"shape": tuple(ds.shape), "dtype": str(ds.dtype)})

    # internals ------------------------------------------------------------------------------------
    def _invalid(self, ds: h5py.Dataset, store: Store, teacher: Teacher) -> str | None:
        """Why an entry cannot be used for (store, teacher), or None when it can."""
        why = entry_problem(ds, id_attr="teacher_id", id_value=teacher.id, fingerprint=store_key(store))
        if why is not None:
            return why
        n = len(store.stimulus_ids)
        if ds.shape[0] != n or int(ds.attrs.get("n_stimuli", -1)) != n:
            return f"{ds.shape[0]} rows for {n} stimuli"
        expected = tuple(getattr(teacher, "output_shape", ds.shape[1:]))
        if tuple(ds.shape[1:]) != expected:
            return f"row shape {tuple(ds.shape[1:])} != teacher output {expected}"
        if ds.dtype != self.dtype:
            return f"dtype {ds.dtype} != {self.dtype}"
        if not ds.fletcher32:
            return "no per-chunk checksum"
        return None

    def _read(self, path: Path, store: Store, teacher: Teacher, quiet: bool = False) -> np.ndarray | None:
        def use(ds: Any) -> np.ndarray | None:
            why = self._invalid(ds, store, teacher)
            if why is not None:
                if not quiet:
                    log.warning("%s: entry for %s is stale (%s); recomputing", path, teacher.id, why)
                return None
            try:
                data = ds[()]
            except OSError as e:  # a chunk failing its checksum: name the rows, recompute the entry
                if not quiet:
                    log.warning("%s: entry for %s is damaged (%s: %s); recomputing", path, teacher.id,
                                first_bad_rows(ds), e)
                return None
            if not np.isfinite(data).all():
                log.warning("%s: entry for %s holds NaN/inf; recomputing", path, teacher.id)
                return None
            return data

        return cache_file(path).read(entry_name(teacher.id, self.dtype.name), use, quiet=quiet)

    def _fill_device(self) -> torch.device:
        return self.device if self.device is not None else default_device()

    def _compute_and_write(self, path: Path, store: Store, teacher: Teacher) -> None:
        """One process: encode every stimulus and write the entry (batch by batch, straight into the file)."""
        n = int(store.h5["stimuli/images"].shape[0])
        self._write_entry(path, store, teacher, self._encode_rows(store, teacher, 0, n, self.progress))

    def _encode_rows(self, store: Store, teacher: Teacher, lo: int, hi: int,
                     progress: bool) -> Iterator[tuple[int, int, np.ndarray]]:
        """``(i0, i1, rows)`` for stimuli ``lo..hi-1`` in batches: the teacher's outputs, checked, in the cache
        dtype."""
        from tqdm.auto import tqdm

        bs = self._batch_size(teacher)
        bar = tqdm(total=hi - lo, desc=f"teacher {teacher.id[:48]}", unit="img", disable=not progress)
        try:
            for i0 in range(lo, hi, bs):
                i1 = min(i0 + bs, hi)
                x = torch.from_numpy(store.images(slice(i0, i1))).permute(0, 3, 1, 2).contiguous()
                out = teacher.encode(x)
                y = out.detach().cpu().numpy() if isinstance(out, torch.Tensor) else np.asarray(out)
                if y.shape[0] != i1 - i0:
                    raise ValueError(f"teacher {teacher.id} returned {y.shape[0]} rows for {i1 - i0} images")
                if not np.isfinite(y).all():
                    raise ValueError(f"teacher {teacher.id} returned NaN/inf for stimuli {i0}..{i1 - 1}")
                yield i0, i1, y.astype(self.dtype)
                bar.update(i1 - i0)
        finally:
            bar.close()

    def _write_entry(self, path: Path, store: Store, teacher: Teacher,
                     rows: Iterable[tuple[int, int, np.ndarray]]) -> None:
        """Write the entry of ``teacher`` from ``(i0, i1, rows)`` blocks covering every stimulus: a new cache file
        (the other valid entries of this store copied; those of another store fingerprint pruned) replaces the old
        one atomically. The caller holds the lock."""
        key = store_key(store)
        name = entry_name(teacher.id, self.dtype.name)

        def prune(a: Any) -> str | None:
            return None if a.get("store_fingerprint") == key else "another store fingerprint"

        with cache_file(path).rewrite(replace={name}, prune=prune, attrs={"store": str(store.path)}) as entries:
            images = store.h5["stimuli/images"]
            n = images.shape[0]
            ds = None
            covered = 0
            for i0, i1, y in rows:
                if ds is None:
                    row = y.shape[1:]
                    row_bytes = max(1, int(np.prod(row)) * self.dtype.itemsize)
                    chunk_rows = int(min(n, max(1, (1 << 20) // row_bytes)))
                    ds = start_entry(entries.create_dataset(name, shape=(n, *row), dtype=self.dtype,
                                                            chunks=(chunk_rows, *row), fletcher32=True))
                ds[i0:i1] = y.astype(self.dtype, copy=False)
                covered += i1 - i0
            if ds is None:
                raise ValueError(f"{store.path}: the store has no stimuli")
            if covered != n:  # pragma: no cover - the shards cover every stimulus once
                raise RuntimeError(f"{path}: {covered} rows written for {n} stimuli")
            finish_entry(ds, teacher_id=teacher.id, store_fingerprint=key, n_stimuli=n,
                         image_shape=np.asarray(images.shape[1:], dtype=np.int64))

    def _batch_size(self, teacher: Teacher) -> int:
        if self.batch_size:
            return int(self.batch_size)
        return int(getattr(teacher, "batch_size", 64))

    def _fill_sharded(self, path: Path, store: Store, teacher: Teacher, rank: int, world: int,
                      force: bool = False) -> None:
        """Every rank encodes its shard on ``device``; global rank 0 gathers the shards (CPU arrays in the cache
        dtype) and writes the entry under the lock; a broadcast of rank 0's outcome ends the fill on every rank.
        An error on any rank is raised on every rank (its own exception where it happened), never a deadlock.

        Memory: the gather pickles every shard to rank 0, which holds the whole entry (all S rows) at once before
        writing it (NSD's VAE latents: ~5.5 GB on rank 0's host) -- see the module docstring."""
        import torch.distributed as dist

        n = int(store.h5["stimuli/images"].shape[0])
        lo, hi = shard_bounds(n, world, rank, align=self._batch_size(teacher))
        mine: BaseException | None = None
        try:
            with placed(teacher, self._fill_device()):
                blocks = list(self._encode_rows(store, teacher, lo, hi, self.progress and rank == 0))
            payload: tuple[str, Any] = ("ok", blocks)
        except Exception as e:
            mine, blocks = e, []
            payload = ("error", f"rank {rank}: {type(e).__name__}: {e}")
        gathered: list[Any] | None = [None] * world if rank == 0 else None
        dist.gather_object(payload, gathered, dst=0)
        del payload, blocks
        status: str | None = None
        if rank == 0:
            assert gathered is not None
            errors = [msg for kind, msg in gathered if kind == "error"]
            if errors:
                status = "; ".join(errors)
            else:
                try:
                    with cache_file(path).locked():
                        if force or self._read(path, store, teacher, quiet=True) is None:
                            self._write_entry(path, store, teacher, (b for _, bl in gathered for b in bl))
                except Exception as e:
                    mine = e
                    status = f"rank 0 writing {path}: {type(e).__name__}: {e}"
            gathered = None
        box = [status]
        dist.broadcast_object_list(box, src=0)  # also the barrier: no rank reads before rank 0 has written
        if mine is not None:
            raise mine
        if box[0] is not None:
            raise RuntimeError(f"{path}: sharded fill of the teacher cache for {teacher.id} failed: {box[0]}")
