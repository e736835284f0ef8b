"""Image reconstruction metrics of the MindEye / Brain-Diffuser protocol (NSD shared-1000 evaluation).

=============  ====================================================  =======================  ===========
metric         what is compared                                      score                    better
=============  ====================================================  =======================  ===========
pixcorr        pixels (all channels), both images resized to size    Pearson r, mean          higher
ssim           grayscale (skimage ``rgb2gray``) after the resize     SSIM (Gaussian, σ=1.5)   higher
alexnet2       AlexNet ``features.4`` (ReLU after conv2)             two-way identification   higher
alexnet5       AlexNet ``features.11`` (ReLU after conv5)            two-way identification   higher
inception      InceptionV3 ``avgpool`` (2048-d)                      two-way identification   higher
clip           CLIP image embedding (``encode_image``)               two-way identification   higher
efficientnet   EfficientNet-B1 ``avgpool`` (1280-d)                  correlation distance     lower
swav           ResNet-50 (SwAV weights) ``avgpool`` (2048-d)         correlation distance     lower
=============  ====================================================  =======================  ===========

*Two-way identification* (chance 0.5): for each image ``i``, the fraction of the other images ``j`` for which
``r(pred_i, target_i) > r(pred_i, target_j)`` (Pearson r of flattened features, strict ``>``), averaged over
``i``, exactly as MindEye's and Brain-Diffuser's ``np.corrcoef`` formulation. *Correlation distance*: the mean
over images of ``1 - r(pred_i, target_i)`` (``scipy.spatial.distance.correlation``).

Preprocessing (images are float RGB in [0, 1]; every resize is bilinear with antialiasing, as
``torchvision.transforms.Resize`` on tensors does today; an ``int`` resize sets the shorter side, as
``transforms.Resize(int)``, and center crops round like ``transforms.CenterCrop``):

- pixcorr / ssim: both images resized to ``size x size`` (425 in MindEye, the NSD stimulus size);
- alexnet: resize 256 (MindEye; 256 x 256 for the square NSD images, no crop), ImageNet mean/std;
- inception: resize 342, center crop 299, ImageNet mean/std; built with ``transform_input=True`` as torchvision
  does when it loads its own ImageNet weights (``Inception_V3_Weights``), so use torchvision's weight file;
- efficientnet: resize 255, center crop 240, ImageNet mean/std (torchvision's ``IMAGENET1K_V2`` weights);
- swav: resize 224, ImageNet mean/std, torchvision ResNet-50 with the SwAV checkpoint (``module.`` prefixes
  stripped, the projection head and prototypes ignored, as ``facebookresearch/swav``'s hub entry does);
- clip: resize to the model's size and center crop (a no-op for square images), the model's mean/std
  (OpenAI CLIP's by default, 224, as MindEye for ViT-L/14).

Weights are read from local files only (``torch.load(..., weights_only=True)``); nothing is downloaded. A
metric whose weights are not given, missing or unreadable is ``None`` with the reason in ``unavailable``:
never computed with random weights.

SSIM is a small torch implementation, tested equal to ``skimage.metrics.structural_similarity(gray_a, gray_b,
gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0)``. torchmetrics'
``structural_similarity_index_measure`` is not used: it reflection-pads and averages the SSIM map over the whole
image, where scikit-image averages only the map's interior (the border of half a window is cropped), so the two
differ. Note that MindEye and Brain-Diffuser call scikit-image with ``multichannel=True`` on the 2-D gray
image, which makes scikit-image treat the image's columns as channels: a 1-D SSIM down each column, averaged.
``variant="columns"`` reproduces that call; the default ``"2d"`` is the ordinary 2-D SSIM.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from neurovision.metrics.correlation import pearson_r
from neurovision.metrics.items import ItemMetric

METRIC_NAMES: tuple[str, ...] = (
    "pixcorr", "ssim", "alexnet2", "alexnet5", "inception", "clip", "efficientnet", "swav",
)
#: Which way is better for each metric of :data:`METRIC_NAMES`.
METRIC_DIRECTIONS: dict[str, Literal["higher", "lower"]] = {
    "pixcorr": "higher", "ssim": "higher", "alexnet2": "higher", "alexnet5": "higher",
    "inception": "higher", "clip": "higher", "efficientnet": "lower", "swav": "lower",
}

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
#: scikit-image ``rgb2gray`` (ITU-R BT.709 luma) weights.
GRAY_WEIGHTS: tuple[float, float, float] = (0.2125, 0.7154, 0.0721)

SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5  # scikit-image's: window radius int(3.5 * 1.5 + 0.5) = 5, i.e. 11 x 11
SSIM_K1, SSIM_K2 = 0.01, 0.03

ImagesLike = torch.Tensor | np.ndarray
Size = int | tuple[int, int]


# ------------------------------------------------------------------------------------------------ images
def _as_nchw(images: ImagesLike, name: str) -> torch.Tensor:
    """``images`` as an (N, 3, H, W) tensor view, dtype unchanged (no copy of a large image set)."""
    if isinstance(images, np.ndarray):
        if images.ndim != 4:
            raise ValueError(f"{name}: expected 4 dims (N, H, W, 3) or (N, 3, H, W), got shape {images.shape}")
        t = torch.from_numpy(np.ascontiguousarray(images))
        if images.shape[-1] == 3:  # channel-last wins when both axes have size 3
            t = t.permute(0, 3, 1, 2)
    elif isinstance(images, torch.Tensor):
        t = images.detach()
        if t.ndim != 4:
            raise ValueError(f"{name}: expected a 4-dim (N, 3, H, W) tensor, got shape {tuple(t.shape)}")
    else:
        raise TypeError(f"{name}: expected a torch.Tensor or numpy array, got {type(images).__name__}")
    if t.shape[1] != 3:
        raise ValueError(f"{name}: expected 3 (RGB) channels, got shape {tuple(t.shape)} "
                         "(tensors are (N, 3, H, W); numpy arrays (N, H, W, 3) or (N, 3, H, W))")
    if t.dtype not in (torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"{name}: expected uint8 (0..255) or float (0..1) images, got dtype {t.dtype}")
    if len(t) == 0:
        raise ValueError(f"{name}: no images")
    return t


def _to_float(chunk: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 / 255; float64 stays float64 (pixcorr / SSIM run in float64); other floats -> float32."""
    if chunk.dtype == torch.uint8:
        return chunk.float() / 255.0
    return chunk if chunk.dtype == torch.float64 else chunk.float()


def _check_values(t: torch.Tensor, name: str, batch_size: int = 64) -> None:
    """NaN / Inf / out-of-range values of float images, checked a batch at a time (no full float copy)."""
    if t.dtype == torch.uint8:
        return
    for start in range(0, len(t), batch_size):
        c = t[start:start + batch_size]
        bad = ~torch.isfinite(c).flatten(1).all(1)
        if bad.any():
            idx = (bad.nonzero().flatten() + start).tolist()
            raise ValueError(f"{name}: non-finite values (NaN or Inf) in image(s) {idx[:10]}")
        lo, hi = c.amin().item(), c.amax().item()
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"{name}: float images must lie in [0, 1], found values in [{lo:.4g}, {hi:.4g}] "
                             f"in images {start}..{start + len(c) - 1} (rescale or .clamp(0, 1) them first)")


def to_tensor_images(images: ImagesLike, name: str = "images") -> torch.Tensor:
    """Float (N, 3, H, W) images in [0, 1] from a tensor (N, 3, H, W) or a numpy array (N, H, W, 3).

    uint8 input is divided by 255 (float32); float64 stays float64, other floats become float32; float input must already lie in [0, 1]. A numpy array whose last axis
    has size 3 is read as channel-last. Raises ``ValueError`` on a wrong layout, NaN / Inf or values outside
    [0, 1].
    """
    t = _as_nchw(images, name)
    _check_values(t, name)
    return _to_float(t)


def _pair(recon: ImagesLike, target: ImagesLike, same_size: bool) -> tuple[torch.Tensor, torch.Tensor]:
    r = _as_nchw(recon, "recon")
    t = _as_nchw(target, "target")
    if len(r) != len(t):
        raise ValueError(f"recon and target must hold the same number of images, got {len(r)} and {len(t)}")
    if same_size and r.shape != t.shape:
        raise ValueError(f"recon and target shapes differ: {tuple(r.shape)} vs {tuple(t.shape)} "
                         "(pass size=... to resize both)")
    _check_values(r, "recon")
    _check_values(t, "target")
    return r, t


def _hw(size: Size) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else size
    if h < 1 or w < 1:
        raise ValueError(f"size must be positive, got {size}")
    return int(h), int(w)


def resize_images(x: torch.Tensor, size: Size, antialias: bool = True) -> torch.Tensor:
    """Bilinear resize of float (N, C, H, W) to ``size`` (an int means size x size), torchvision's arithmetic."""
    h, w = _hw(size)
    if x.shape[-2:] == (h, w):
        return x
    return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=antialias)


def _resize_shorter(x: torch.Tensor, short: int, antialias: bool = True) -> torch.Tensor:
    """``transforms.Resize(short)``: the shorter side becomes ``short``, the aspect ratio is kept."""
    h, w = x.shape[-2:]
    if h <= w:
        return resize_images(x, (short, int(short * w / h)), antialias)
    return resize_images(x, (int(short * h / w), short), antialias)


def _center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """``transforms.CenterCrop(size)`` (offsets rounded as torchvision rounds them)."""
    h, w = x.shape[-2:]
    if size > h or size > w:
        raise ValueError(f"cannot center-crop {size} x {size} from {h} x {w}")
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return x[..., top:top + size, left:left + size]


def _chunks(n: int, batch_size: int) -> Iterator[slice]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


# ------------------------------------------------------------------------------------- pixcorr and ssim
def _pixcorr(r: torch.Tensor, t: torch.Tensor, size: Size | None, antialias: bool, batch_size: int) -> float:
    total = 0.0
    for s in _chunks(len(r), batch_size):
        a, b = _to_float(r[s]), _to_float(t[s])
        if size is not None:
            a, b = resize_images(a, size, antialias), resize_images(b, size, antialias)
        total += _rowwise_pearson(a.flatten(1), b.flatten(1), "pixcorr", offset=s.start).sum().item()
    return total / len(r)


def pixcorr(recon: ImagesLike, target: ImagesLike, size: Size | None = None, antialias: bool = True,
            batch_size: int = 64) -> float:
    """Mean over images of the Pearson r between the flattened pixels (all channels) of recon and target.

    With ``size``, both are first resized to ``size x size`` (bilinear); otherwise their shapes must match.
    Computed in float64. An image with constant pixels has no correlation: ``ValueError``.
    """
    r, t = _pair(recon, target, same_size=size is None)
    return _pixcorr(r, t, size, antialias, batch_size)


def _gaussian_1d(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    radius = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    g = torch.exp(-0.5 * (x / SSIM_SIGMA) ** 2)
    return g / g.sum()


def _to_gray(x: torch.Tensor) -> torch.Tensor:
    w = torch.tensor(GRAY_WEIGHTS, dtype=x.dtype, device=x.device)
    return (x * w.view(1, 3, 1, 1)).sum(1, keepdim=True)


def _ssim_gray(a: torch.Tensor, b: torch.Tensor, variant: Literal["2d", "columns"]) -> torch.Tensor:
    """Per-image mean SSIM of gray (N, 1, H, W) float64 images, scikit-image's definition.

    'Valid' filtering only: scikit-image filters with reflection and then crops half a window from every
    border before averaging, and the kept values never touch the padding, so the two are the same.
    """
    g = _gaussian_1d(a.dtype, a.device)
    k = len(g)
    h, w = a.shape[-2:]
    if h < k or (variant == "2d" and w < k):
        raise ValueError(f"SSIM needs images of at least {k} x {k} pixels (after any resize), got {h} x {w}")

    def filt(z: torch.Tensor) -> torch.Tensor:
        z = F.conv2d(z, g.view(1, 1, k, 1))
        return F.conv2d(z, g.view(1, 1, 1, k)) if variant == "2d" else z

    n = len(a)
    m = filt(torch.cat([a, b, a * a, b * b, a * b]))
    ux, uy, uxx, uyy, uxy = m[:n], m[n:2 * n], m[2 * n:3 * n], m[3 * n:4 * n], m[4 * n:]
    vx, vy, vxy = uxx - ux * ux, uyy - uy * uy, uxy - ux * uy  # population covariance (cov_norm = 1)
    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2  # data_range = 1
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


def _ssim(r: torch.Tensor, t: torch.Tensor, size: Size | None, antialias: bool, batch_size: int,
          variant: Literal["2d", "columns"]) -> float:
    if variant not in ("2d", "columns"):
        raise ValueError(f"variant must be '2d' or 'columns', got {variant!r}")
    total = 0.0
    for s in _chunks(len(r), batch_size):
        a, b = _to_float(r[s]), _to_float(t[s])
        if size is not None:
            a, b = resize_images(a, size, antialias), resize_images(b, size, antialias)
        total += _ssim_gray(_to_gray(a.double()), _to_gray(b.double()), variant).sum().item()
    return total / len(r)


def ssim(recon: ImagesLike, target: ImagesLike, size: Size | None = None, antialias: bool = True,
         batch_size: int = 32, variant: Literal["2d", "columns"] = "2d") -> float:
    """Mean SSIM over images, MindEye protocol: resize, ``rgb2gray``, Gaussian SSIM (σ=1.5, 11 x 11 window).

    Per image equal to ``skimage.metrics.structural_similarity(gray_recon, gray_target, gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False, data_range=1.0)`` (float64). ``variant="columns"`` gives what the
    published MindEye / Brain-Diffuser code computes (the same call with ``multichannel=True``, i.e.
    ``channel_axis=-1`` on the 2-D gray image: a 1-D SSIM down each column, averaged over columns).
    """
    r, t = _pair(recon, target, same_size=size is None)
    return _ssim(r, t, size, antialias, batch_size, variant)


# ------------------------------------------------------------------------------------ feature scoring
def _features_2d(x: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    t = torch.as_tensor(x).detach().cpu()
    if t.ndim < 2:
        raise ValueError(f"{name}: expected (N, ...) features with one row per image, got shape {tuple(t.shape)}")
    t = t.double().flatten(1)
    bad = ~torch.isfinite(t).all(1)
    if bad.any():
        raise ValueError(f"{name}: non-finite values (NaN or Inf) in item(s) {bad.nonzero().flatten()[:10].tolist()}")
    return t


def _feature_pair(pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray,
                  min_items: int) -> tuple[torch.Tensor, torch.Tensor]:
    p, t = _features_2d(pred, "pred_feats"), _features_2d(target, "target_feats")
    if p.shape != t.shape:
        raise ValueError(f"pred_feats and target_feats must have the same shape, got {tuple(torch.as_tensor(pred).shape)} "
                         f"and {tuple(torch.as_tensor(target).shape)}")
    if len(p) < min_items:
        raise ValueError(f"need at least {min_items} paired items, got {len(p)}")
    if p.shape[1] < 2:
        raise ValueError(f"Pearson r needs feature vectors of length >= 2, got {p.shape[1]}")
    return p, t


def _rowwise_pearson(a: torch.Tensor, b: torch.Tensor, name: str, offset: int = 0) -> torch.Tensor:
    """Per-row Pearson r in float64; a constant row is a ``ValueError`` naming it."""
    return pearson_r(a.double(), b.double(), dim=1, constant="raise", names=(f"{name} (recon)", f"{name} (target)"),
                     offset=offset)


def two_way_identification(pred_feats: torch.Tensor | np.ndarray, target_feats: torch.Tensor | np.ndarray) -> float:
    """Two-way identification (MindEye / Brain-Diffuser), chance 0.5.

    For each item ``i``, the fraction of the other items ``j`` with ``r(pred_i, target_i) > r(pred_i, target_j)``
    (Pearson r of the flattened features, float64), averaged over ``i``. Needs >= 2 items.
    """
    p, t = _feature_pair(pred_feats, target_feats, min_items=2)
    r = pearson_r(p, t, constant="raise", pairwise=True, names=("pred_feats", "target_feats"))  # r[i, j] = r(pred_i, target_j)
    wins = (r.diagonal()[:, None] > r).sum(1).double()  # the diagonal never beats itself
    return (wins / (len(r) - 1)).mean().item()


def correlation_distance(pred_feats: torch.Tensor | np.ndarray, target_feats: torch.Tensor | np.ndarray) -> float:
    """Mean over items of ``1 - r(pred_i, target_i)`` (``scipy.spatial.distance.correlation``); lower is better."""
    p, t = _feature_pair(pred_feats, target_feats, min_items=1)
    return (1.0 - _rowwise_pearson(p, t, "features")).mean().item()


# ------------------------------------------------------------------------------------ feature networks
@dataclass(frozen=True)
class FeatureNet:
    """How one feature network of the protocol is built, fed and scored.

    ``layers`` maps metric name -> module name whose output is the feature. ``resize`` sets the shorter side,
    ``crop`` (if any) a center crop. Weight-file keys under ``optional_prefixes`` may be absent (heads that
    the metric never uses); keys under ``ignored_prefixes`` are dropped (e.g. SwAV's projection head).
    """

    build: Callable[[], nn.Module]
    layers: Mapping[str, str]
    resize: int
    crop: int | None
    score: Literal["two_way", "correlation_distance"]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    optional_prefixes: tuple[str, ...] = ()
    ignored_prefixes: tuple[str, ...] = ()


def _alexnet() -> nn.Module:
    from torchvision.models import alexnet

    return alexnet(weights=None)


def _inception() -> nn.Module:
    from torchvision.models import inception_v3

    # transform_input=True: what torchvision sets when it loads its own ImageNet weights for this model
    return inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=True)


def _efficientnet() -> nn.Module:
    from torchvision.models import efficientnet_b1

    return efficientnet_b1(weights=None)


def _resnet50() -> nn.Module:
    from torchvision.models import resnet50

    return resnet50(weights=None)


#: The protocol's feature networks, keyed as in ``evaluate_images(weights=...)``.
FEATURE_NETS: dict[str, FeatureNet] = {
    "alexnet": FeatureNet(_alexnet, {"alexnet2": "features.4", "alexnet5": "features.11"}, resize=256, crop=None,
                          score="two_way", optional_prefixes=("classifier.",)),
    "inception": FeatureNet(_inception, {"inception": "avgpool"}, resize=342, crop=299, score="two_way",
                            optional_prefixes=("AuxLogits.", "fc.")),
    "efficientnet": FeatureNet(_efficientnet, {"efficientnet": "avgpool"}, resize=255, crop=240,
                               score="correlation_distance", optional_prefixes=("classifier.",)),
    "swav": FeatureNet(_resnet50, {"swav": "avgpool"}, resize=224, crop=None, score="correlation_distance",
                       optional_prefixes=("fc.",), ignored_prefixes=("projection_head.", "prototypes.")),
}


def _unwrap_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` from a checkpoint: unwraps ``state_dict`` / ``model``, strips ``module.``."""
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError("the file holds no state dict")
    out: dict[str, torch.Tensor] = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"entry {k!r} is a {type(v).__name__}, not a tensor")
        out[k.removeprefix("module.")] = v
    return out


def load_weights_into(model: nn.Module, state_dict: Mapping[str, torch.Tensor], optional_prefixes: Sequence[str] = (),
                      ignored_prefixes: Sequence[str] = ()) -> None:
    """Strict load, except that keys under ``optional_prefixes`` may be missing and ``ignored_prefixes`` are dropped.

    Raises ``ValueError`` naming missing, unexpected or mis-shaped keys, so that a network is never left with
    randomly initialised layers that its metric uses.
    """
    sd = {k.removeprefix("module."): v for k, v in state_dict.items() if not k.startswith(tuple(ignored_prefixes))}
    own = model.state_dict()
    missing = [k for k in own if k not in sd and not k.startswith(tuple(optional_prefixes))]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} != {tuple(v.shape)}" for k, v in own.items() if k in sd and sd[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s), e.g. {missing[:3]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:3]}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es), e.g. {shapes[:3]}")
    if problems:
        raise ValueError("weights do not fit the architecture: " + "; ".join(problems))
    model.load_state_dict(sd, strict=False)


def load_feature_net(name: str, path: str | Path) -> nn.Module:
    """The :data:`FEATURE_NETS` architecture ``name`` with the weights of the local file ``path`` (eval mode).

    Raises ``FileNotFoundError`` if there is no such file, ``ValueError`` if its keys do not fit.
    """
    if name not in FEATURE_NETS:
        raise ValueError(f"unknown feature network {name!r}; known: {sorted(FEATURE_NETS)}")
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    spec = FEATURE_NETS[name]
    model = spec.build()
    sd = _unwrap_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    load_weights_into(model, sd, spec.optional_prefixes, spec.ignored_prefixes)
    return model.eval().requires_grad_(False)


def _preprocess(x: torch.Tensor, resize: int, crop: int | None, mean: Sequence[float], std: Sequence[float],
                antialias: bool) -> torch.Tensor:
    x = _resize_shorter(x, resize, antialias)
    if crop is not None:
        x = _center_crop(x, crop)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


@torch.no_grad()
def extract_features(model: nn.Module, images: ImagesLike, layers: Sequence[str], resize: int, crop: int | None,
                     mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                     batch_size: int = 32, device: str | torch.device = "cpu",
                     antialias: bool = True) -> dict[str, torch.Tensor]:
    """Outputs of ``model``'s modules ``layers`` (torchvision ``create_feature_extractor``), flattened to (N, D)
    float32 on the CPU.

    Each batch is resized (shorter side to ``resize``), center-cropped to ``crop`` if given, normalised by
    ``mean``/``std`` and run through ``model`` on ``device``.
    """
    imgs = _as_nchw(images, "images")
    _check_values(imgs, "images")
    from torchvision.models.feature_extraction import create_feature_extractor

    modules = dict(model.named_modules())
    unknown = [n for n in layers if n not in modules]
    if unknown:
        raise ValueError(f"model has no module(s) {unknown}")
    # traced once per call (no gradient is needed): runs the model only up to the last requested layer
    extractor = create_feature_extractor(model, return_nodes={n: n for n in layers})  # in the model's mode
    got: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    for s in _chunks(len(imgs), batch_size):
        x = _preprocess(_to_float(imgs[s]).float().to(device), resize, crop, mean, std, antialias)
        out = extractor(x)
        for n in layers:
            got[n].append(out[n].detach().flatten(1).float().cpu().clone())
    return {n: torch.cat(v) for n, v in got.items()}


def _model_device(model: nn.Module, default: str | torch.device) -> tuple[torch.device, torch.dtype]:
    p = next(iter(model.parameters()), None) if isinstance(model, nn.Module) else None
    if p is None:
        return torch.device(default), torch.float32
    return p.device, p.dtype if p.dtype.is_floating_point else torch.float32


def _clip_preprocess_cfg(clip_model: Any) -> dict[str, Any]:
    """open_clip's preprocessing config stored on the model (``visual.preprocess_cfg`` or legacy attributes)."""
    visual = getattr(clip_model, "visual", clip_model)
    cfg = dict(getattr(visual, "preprocess_cfg", None) or {})
    for key, attr in (("mean", "image_mean"), ("std", "image_std"), ("size", "image_size")):
        if key not in cfg and getattr(visual, attr, None) is not None:
            cfg[key] = getattr(visual, attr)
    return cfg


@torch.no_grad()
def clip_features(clip_model: Any, images: ImagesLike, mean: Sequence[float] | None = None,
                  std: Sequence[float] | None = None, size: int | None = None, batch_size: int = 32,
                  device: str | torch.device = "cpu", antialias: bool = True) -> torch.Tensor:
    """``clip_model.encode_image`` of the images, (N, D) float32 on the CPU.

    ``mean``/``std``/``size`` default to the model's open_clip preprocessing config when it has one, else to
    OpenAI CLIP's (224). Images are resized (shorter side) to ``size`` and center-cropped; the model runs on
    its own device and dtype (``device`` only for a parameter-less model).
    """
    if not callable(getattr(clip_model, "encode_image", None)):
        raise TypeError(f"clip_model must have an encode_image method, got {type(clip_model).__name__}")
    cfg = _clip_preprocess_cfg(clip_model)
    mean = tuple(mean if mean is not None else cfg.get("mean", CLIP_MEAN))
    std = tuple(std if std is not None else cfg.get("std", CLIP_STD))
    if size is None:
        cfg_size = cfg.get("size", 224)
        size = int(cfg_size[0] if isinstance(cfg_size, Sequence) else cfg_size)
    imgs = _as_nchw(images, "images")
    _check_values(imgs, "images")
    dev, dtype = _model_device(clip_model, device)
    out = []
    for s in _chunks(len(imgs), batch_size):
        x = _preprocess(_to_float(imgs[s]).float().to(dev), size, size, mean, std, antialias)
        out.append(clip_model.encode_image(x.to(dtype)).detach().flatten(1).float().cpu())
    return torch.cat(out)


# ----------------------------------------------------------------------------------------- entry point
def evaluate_images(
    recons: ImagesLike,
    stimuli: ImagesLike,
    weights: Mapping[str, str | Path | None] | None = None,
    clip_model: Any = None,
    size: int | None = 425,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    clip_mean: Sequence[float] | None = None,
    clip_std: Sequence[float] | None = None,
    clip_size: int | None = None,
    ssim_variant: Literal["2d", "columns"] = "2d",
    antialias: bool = True,
) -> dict[str, Any]:
    """All metrics of :data:`METRIC_NAMES` for reconstructions vs the seen stimuli (paired by index).

    ``weights`` maps ``alexnet`` / ``inception`` / ``efficientnet`` / ``swav`` to local weight files;
    ``clip_model`` is any object with ``encode_image`` (e.g. an open_clip model), preprocessed with
    ``clip_mean``/``clip_std``/``clip_size`` (default: the model's own config, else OpenAI CLIP's).
    ``size`` is the pixcorr / SSIM resolution (``None``: no resize, shapes must match).

    Returns ``{metric: float | None}`` for every metric plus ``"unavailable": {metric: reason}`` for each
    ``None``. Raises ``ValueError`` on bad input (counts, layouts, NaN / Inf, values outside [0, 1], < 2 images).
    """
    weights = dict(weights or {})
    unknown = sorted(set(weights) - set(FEATURE_NETS))
    if unknown:
        raise ValueError(f"unknown weights key(s) {unknown}; expected some of {sorted(FEATURE_NETS)}")
    r, t = _pair(recons, stimuli, same_size=size is None)
    if len(r) < 2 and (any(v not in (None, "") for v in weights.values()) or clip_model is not None):
        raise ValueError(f"two-way identification needs at least 2 images, got {len(r)}")
    if device is None:  # the CLIP model's device (a rank's own GPU under DDP), else the current CUDA device
        if clip_model is not None and next(iter(clip_model.parameters()), None) is not None:
            device = next(iter(clip_model.parameters())).device
        else:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"

    out: dict[str, Any] = dict.fromkeys(METRIC_NAMES)
    unavailable: dict[str, str] = {}
    out["pixcorr"] = _pixcorr(r, t, size, antialias, batch_size)
    out["ssim"] = _ssim(r, t, size, antialias, batch_size, ssim_variant)

    for name, spec in FEATURE_NETS.items():
        path = weights.get(name)
        if path is None or str(path) == "":
            for metric in spec.layers:
                unavailable[metric] = f"no local weights for {name} (weights[{name!r}] is unset)"
            continue
        reason: str | None
        try:
            model = load_feature_net(name, path)
        except FileNotFoundError as e:
            reason = str(e)
        except Exception as e:  # unreadable / foreign file: report it, never fall back to random weights
            reason = f"could not load {name} weights from {Path(path).expanduser()}: {e}"
        else:
            reason = None
        if reason is not None:
            for metric in spec.layers:
                unavailable[metric] = reason
            continue
        model.to(device)
        feats = functools.partial(extract_features, model, layers=list(spec.layers.values()), resize=spec.resize,
                                  crop=spec.crop, mean=spec.mean, std=spec.std, batch_size=batch_size,
                                  device=device, antialias=antialias)
        pred, real = feats(r), feats(t)
        score = two_way_identification if spec.score == "two_way" else correlation_distance
        for metric, layer in spec.layers.items():
            out[metric] = score(pred[layer], real[layer])
        del model

    if clip_model is None:
        unavailable["clip"] = "no clip_model given"
    else:
        embed = functools.partial(clip_features, clip_model, mean=clip_mean, std=clip_std, size=clip_size,
                                  batch_size=batch_size, device=device, antialias=antialias)
        out["clip"] = two_way_identification(embed(r), embed(t))

    out["unavailable"] = unavailable
    return out


class ImageMetrics(ItemMetric):
    """:func:`evaluate_images` as a torchmetrics ``Metric``: ``update(recon, target, subject, stimulus)`` with
    batches of reconstructions and their stimuli (uint8 or float images, kept as given: pass CPU tensors for
    large sets, with a gloo ``process_group`` under NCCL); ``compute()`` scores the de-padded items of every
    rank with ``evaluate_kwargs`` (the keyword arguments of :func:`evaluate_images`). A task that also writes
    the images calls :meth:`gather` and :meth:`score` (whose keyword arguments override ``evaluate_kwargs``)."""

    fields = ("recon", "target")

    def __init__(self, evaluate_kwargs: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.evaluate_kwargs = dict(evaluate_kwargs or {})

    def update(self, recon: torch.Tensor, target: torch.Tensor, subject: torch.Tensor | None = None,
               stimulus: torch.Tensor | None = None, **extra: torch.Tensor) -> None:
        self._append(subject, stimulus, recon=recon, target=target, **extra)

    def score(self, items: dict[str, torch.Tensor], **kwargs: Any) -> dict[str, Any]:
        return evaluate_images(items["recon"], items["target"], **{**self.evaluate_kwargs, **kwargs})


__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "FEATURE_NETS",
    "GRAY_WEIGHTS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "METRIC_DIRECTIONS",
    "METRIC_NAMES",
    "FeatureNet",
    "ImageMetrics",
    "clip_features",
    "correlation_distance",
    "evaluate_images",
    "extract_features",
    "load_feature_net",
    "load_weights_into",
    "pixcorr",
    "resize_images",
    "ssim",
    "to_tensor_images",
    "two_way_identification",
]
