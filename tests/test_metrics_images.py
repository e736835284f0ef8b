"""Image reconstruction metrics against independent computations (scikit-image, numpy, scipy, torchvision)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial.distance import correlation as scipy_correlation
from torch import nn

from neurovision.metrics import images as M
from tests.helpers import np_two_way

skimage_metrics = pytest.importorskip("skimage.metrics")
skimage_color = pytest.importorskip("skimage.color")

SK_SSIM = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0)


def _sk_ssim(a: np.ndarray, b: np.ndarray, columns: bool = False) -> float:
    """scikit-image on (H, W, 3) float64 RGB images, as MindEye: rgb2gray, then Gaussian SSIM."""
    ga, gb = skimage_color.rgb2gray(a), skimage_color.rgb2gray(b)
    if columns:  # what multichannel=True did to a 2-D image in the published code
        return float(skimage_metrics.structural_similarity(ga, gb, channel_axis=-1, **SK_SSIM))
    return float(skimage_metrics.structural_similarity(ga, gb, **SK_SSIM))




def _mindeye_two_way(p: np.ndarray, t: np.ndarray) -> float:
    """MindEye's / Brain-Diffuser's vectorised formulation (reals first, then preds)."""
    n = len(t)
    r = np.corrcoef(t, p)[:n, n:]
    success = r < np.diag(r)
    return float(np.mean(success.sum(0)) / (n - 1))


def _structured(n: int, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth colour gradients, a disk and a checkerboard patch: (n, h, w, 3) float64 in [0, 1]."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    out = []
    for k in range(n):
        img = np.stack([xx, yy, 0.5 * (xx + yy)], -1) * (0.5 + 0.1 * k)
        disk = (yy - 0.4 - 0.05 * k) ** 2 + (xx - 0.5) ** 2 < 0.06
        img[disk] = rng.random(3)
        board = ((np.arange(h)[:, None] // 4 + np.arange(w)[None] // 4) % 2).astype(float)
        img[: h // 3, : w // 3] = board[: h // 3, : w // 3, None]
        out.append(img)
    return np.clip(np.stack(out), 0, 1)


# -------------------------------------------------------------------------------------------------- SSIM
def test_ssim_equals_scikit_image_per_image_on_random_images(rng: np.random.Generator) -> None:
    a = rng.random((3, 40, 33, 3))  # non-square: catches swapped axes
    b = np.clip(0.6 * a + 0.4 * rng.random(a.shape), 0, 1)
    for i in range(3):
        assert M.ssim(a[i:i + 1], b[i:i + 1]) == pytest.approx(_sk_ssim(a[i], b[i]), abs=1e-6)
        got = M.ssim(a[i:i + 1], b[i:i + 1], variant="columns")
        assert got == pytest.approx(_sk_ssim(a[i], b[i], columns=True), abs=1e-6)
    assert M.ssim(a, b) == pytest.approx(np.mean([_sk_ssim(a[i], b[i]) for i in range(3)]), abs=1e-6)
    # tensors (N, 3, H, W) give the same number as numpy (N, H, W, 3)
    assert M.ssim(torch.tensor(a).permute(0, 3, 1, 2), torch.tensor(b).permute(0, 3, 1, 2)) == pytest.approx(
        M.ssim(a, b), abs=1e-12)


def test_ssim_structured_pair_with_resize_equals_scikit_image(rng: np.random.Generator) -> None:
    from torchvision.transforms.v2 import functional as TF

    a = _structured(2, 48, 48, rng)
    b = np.roll(a, shift=(2, -3), axis=(1, 2)) * 0.9 + 0.05  # shifted, lower contrast
    ta, tb = (torch.tensor(x).permute(0, 3, 1, 2) for x in (a, b))
    size = 36
    ra = TF.resize(ta, [size, size], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    rb = TF.resize(tb, [size, size], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    ref = [_sk_ssim(ra[i].permute(1, 2, 0).numpy(), rb[i].permute(1, 2, 0).numpy()) for i in range(2)]
    for i in range(2):
        assert M.ssim(ta[i:i + 1], tb[i:i + 1], size=size) == pytest.approx(ref[i], abs=1e-6)
    assert 0.05 < np.mean(ref) < 0.95  # neither trivial nor hopeless
    assert M.ssim(ta, ta) == pytest.approx(1.0, abs=1e-12)
    # the 2-D and the column-wise (published-code) variants really differ on structured images
    assert abs(M.ssim(ta, tb) - M.ssim(ta, tb, variant="columns")) > 1e-3


# ------------------------------------------------------------------------------------------------ pixcorr
def test_pixcorr_equals_numpy_corrcoef(rng: np.random.Generator) -> None:
    a = rng.random((4, 20, 24, 3))
    b = np.clip(a + rng.normal(scale=0.5, size=a.shape), 0, 1)
    ref = np.mean([np.corrcoef(a[i].ravel(), b[i].ravel())[0, 1] for i in range(4)])
    assert M.pixcorr(a, b) == pytest.approx(ref, abs=1e-10)
    assert M.pixcorr(a, b, batch_size=3) == pytest.approx(ref, abs=1e-10)  # batches of 3 + 1
    assert M.pixcorr(a, a) == pytest.approx(1.0, abs=1e-12)
    # uint8 channel-last numpy == float (N, 3, H, W) tensor / 255
    u8a, u8b = (np.round(x * 255).astype(np.uint8) for x in (a, b))
    as_float = [torch.tensor(x).permute(0, 3, 1, 2).float() / 255 for x in (u8a, u8b)]
    assert M.pixcorr(u8a, u8b) == pytest.approx(M.pixcorr(*as_float), abs=1e-6)


def test_pixcorr_resize_matches_torchvision(rng: np.random.Generator) -> None:
    from torchvision.transforms.v2 import functional as TF

    a = torch.tensor(rng.random((3, 3, 30, 30)), dtype=torch.float32)
    b = torch.tensor(rng.random((3, 3, 50, 50)), dtype=torch.float32)  # different sizes: resize makes them fit
    ra, rb = (TF.resize(x, [17, 17], interpolation=TF.InterpolationMode.BILINEAR, antialias=True) for x in (a, b))
    ref = np.mean([np.corrcoef(ra[i].double().ravel(), rb[i].double().ravel())[0, 1] for i in range(3)])
    assert M.pixcorr(a, b, size=17) == pytest.approx(ref, abs=1e-6)


# --------------------------------------------------------------------------------- feature-based scores
def test_two_way_identification_equals_numpy_loop(rng: np.random.Generator) -> None:
    t = rng.normal(size=(12, 30))
    p = t + rng.normal(scale=2.0, size=t.shape)
    got = M.two_way_identification(torch.tensor(p), torch.tensor(t))
    assert got == pytest.approx(np_two_way(p, t), abs=1e-12)
    assert got == pytest.approx(_mindeye_two_way(p, t), abs=1e-12)
    assert 0.55 < got < 1.0
    # multi-dim features are flattened; numpy input accepted
    assert M.two_way_identification(p.reshape(12, 5, 6), t.reshape(12, 6, 5)) == pytest.approx(got, abs=1e-12)


def test_two_way_identification_known_answers(rng: np.random.Generator) -> None:
    t = rng.normal(size=(9, 16))
    assert M.two_way_identification(t, t) == 1.0
    assert M.two_way_identification(-t, t) == 0.0  # r_ii = -1 loses to every other target
    assert M.two_way_identification(t[::-1].copy(), t) == pytest.approx(np_two_way(t[::-1], t), abs=1e-12)
    assert M.two_way_identification(t[:2][::-1].copy(), t[:2]) == 0.0  # two items, swapped: both wrong
    perm = rng.permutation(9)
    p = t + rng.normal(size=t.shape)
    assert M.two_way_identification(p[perm], t[perm]) == pytest.approx(M.two_way_identification(p, t), abs=1e-12)


def test_correlation_distance_equals_scipy(rng: np.random.Generator) -> None:
    t = rng.normal(size=(7, 25))
    p = t + rng.normal(size=t.shape)
    ref = np.mean([scipy_correlation(p[i], t[i]) for i in range(7)])
    assert M.correlation_distance(torch.tensor(p), torch.tensor(t)) == pytest.approx(ref, abs=1e-12)
    assert M.correlation_distance(t, t) == pytest.approx(0.0, abs=1e-12)
    assert M.correlation_distance(-t, t) == pytest.approx(2.0, abs=1e-12)


# ----------------------------------------------------------------------------------------- bad input
def test_bad_input_raises_clear_value_errors(rng: np.random.Generator) -> None:
    a = rng.random((3, 3, 16, 16)).astype(np.float32)
    nan = a.copy()
    nan[1, 0, 2, 2] = np.nan
    with pytest.raises(ValueError, match=r"recon: non-finite .*\[1\]"):
        M.ssim(torch.tensor(nan), torch.tensor(a))
    inf = torch.tensor(a)
    inf[2, 1, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"target: non-finite .*\[2\]"):
        M.evaluate_images(torch.tensor(a), inf, size=None)
    with pytest.raises(ValueError, match="shapes differ"):
        M.pixcorr(torch.tensor(a), torch.tensor(a[:, :, :8]))
    with pytest.raises(ValueError, match="same number of images, got 3 and 2"):
        M.evaluate_images(torch.tensor(a), torch.tensor(a[:2]), size=16)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        M.pixcorr(torch.tensor(a) * 2 - 1, torch.tensor(a))
    with pytest.raises(ValueError, match="3 \\(RGB\\) channels"):
        M.pixcorr(torch.tensor(a[:, :1]), torch.tensor(a[:, :1]))
    with pytest.raises(ValueError, match="constant"):
        M.pixcorr(torch.full((1, 3, 16, 16), 0.5), torch.tensor(a[:1]))
    with pytest.raises(ValueError, match="at least 11 x 11"):
        M.ssim(torch.tensor(a[..., :8, :8]), torch.tensor(a[..., :8, :8]))
    with pytest.raises(ValueError, match="at least 2 paired items"):
        M.two_way_identification(np.ones((1, 4)), np.ones((1, 4)))
    with pytest.raises(ValueError, match="same shape"):
        M.two_way_identification(np.zeros((3, 4)), np.zeros((3, 5)))
    feats = rng.normal(size=(3, 4))
    feats[0, 1] = np.nan
    with pytest.raises(ValueError, match="pred_feats: non-finite"):
        M.correlation_distance(feats, rng.normal(size=(3, 4)))
    with pytest.raises(ValueError, match="unknown weights key"):
        M.evaluate_images(torch.tensor(a), torch.tensor(a), weights={"alexnt": "x.pth"}, size=16)
    with pytest.raises(ValueError, match="at least 2 images"):
        M.evaluate_images(torch.tensor(a[:1]), torch.tensor(a[:1]), weights={"alexnet": "x.pth"}, size=16)


# ------------------------------------------------------------------------------------ networks, weights
@pytest.fixture(scope="module")
def alexnet_features_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    """A seeded random AlexNet; only its ``features`` saved (10 MB instead of 244: the head is optional)."""
    from torchvision.models import alexnet

    torch.manual_seed(0)
    model = alexnet(weights=None).eval()
    path = tmp_path_factory.mktemp("weights") / "alexnet.pth"
    torch.save({k: v for k, v in model.state_dict().items() if k.startswith("features.")}, path)
    return path, model


def _tiny_images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 40, 40, generator=g)


def test_alexnet_from_local_weights(alexnet_features_file: tuple[Path, nn.Module]) -> None:
    from torchvision.transforms.v2 import functional as TF

    path, model = alexnet_features_file
    recons, stimuli = _tiny_images(6, 1), _tiny_images(6, 2)
    stimuli[:3] = (0.7 * recons[:3] + 0.3 * stimuli[:3])  # some recons resemble their stimulus
    out = M.evaluate_images(recons, stimuli, weights={"alexnet": str(path)}, size=32, batch_size=4, device="cpu")
    assert set(M.METRIC_NAMES) <= set(out)
    for name in ("pixcorr", "ssim", "alexnet2", "alexnet5"):
        assert isinstance(out[name], float) and name not in out["unavailable"]
    assert 0.0 <= out["alexnet2"] <= 1.0 and 0.0 <= out["alexnet5"] <= 1.0
    assert out["pixcorr"] == pytest.approx(M.pixcorr(recons, stimuli, size=32), abs=1e-12)

    # independent feature computation: torchvision resize 256 + ImageNet normalisation through the saved net
    def feats(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        x = TF.resize(x, [256], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        x = TF.normalize(x, list(M.IMAGENET_MEAN), list(M.IMAGENET_STD))
        with torch.no_grad():
            f2 = model.features[:5](x)  # conv1 relu pool conv2 relu
            f5 = model.features[5:12](f2)  # pool conv3 relu conv4 relu conv5 relu
        return f2.flatten(1).double().numpy(), f5.flatten(1).double().numpy()

    (r2, r5), (s2, s5) = feats(recons), feats(stimuli)
    assert out["alexnet2"] == pytest.approx(np_two_way(r2, s2), abs=1e-9)
    assert out["alexnet5"] == pytest.approx(np_two_way(r5, s5), abs=1e-9)
    for name in ("inception", "efficientnet", "swav", "clip"):
        assert out[name] is None and name in out["unavailable"]
    assert "no local weights for inception" in out["unavailable"]["inception"]

    same = M.evaluate_images(stimuli[:2], stimuli[:2], weights={"alexnet": path}, size=32, device="cpu")
    assert same["alexnet2"] == 1.0 and same["alexnet5"] == 1.0
    assert same["pixcorr"] == pytest.approx(1.0) and same["ssim"] == pytest.approx(1.0)


def test_missing_or_unusable_weights_are_reported_not_faked(tmp_path: Path) -> None:
    imgs = _tiny_images(3, 0)
    out = M.evaluate_images(imgs, imgs.flip(0), size=None)
    assert {k for k, v in out.items() if v is None} == {"alexnet2", "alexnet5", "inception", "clip",
                                                         "efficientnet", "swav"}
    assert set(out["unavailable"]) == {"alexnet2", "alexnet5", "inception", "clip", "efficientnet", "swav"}
    assert "no local weights for alexnet" in out["unavailable"]["alexnet2"]

    missing = tmp_path / "nowhere" / "alexnet-owt.pth"
    out = M.evaluate_images(imgs, imgs, weights={"alexnet": str(missing), "swav": None}, size=None)
    assert out["alexnet2"] is None and out["alexnet5"] is None
    assert out["unavailable"]["alexnet5"] == f"file not found: {missing}"
    assert "no local weights for swav" in out["unavailable"]["swav"]

    foreign = tmp_path / "foreign.pth"
    torch.save({"conv.weight": torch.zeros(2, 3, 1, 1)}, foreign)
    out = M.evaluate_images(imgs, imgs, weights={"alexnet": foreign}, size=None)
    assert out["alexnet2"] is None
    reason = out["unavailable"]["alexnet2"]
    assert str(foreign) in reason and "missing key" in reason and "unexpected key" in reason


class _FakeClip(nn.Module):
    """Anything with ``encode_image``: a seeded conv + pooling standing in for an open_clip model."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 5, stride=3)
        self.seen: list[tuple[int, int]] = []

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(tuple(x.shape[-2:]))
        return torch.relu(self.conv(x)).mean((2, 3))


def test_clip_branch_with_any_encode_image_model() -> None:
    clip = _FakeClip().eval()
    recons, stimuli = _tiny_images(5, 3), _tiny_images(5, 4)
    out = M.evaluate_images(recons, stimuli, clip_model=clip, clip_size=32, size=None, batch_size=2)
    assert set(clip.seen) == {(32, 32)}
    norm = [(torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", antialias=True)
             - torch.tensor(M.CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(M.CLIP_STD).view(1, 3, 1, 1)
            for x in (recons, stimuli)]
    with torch.no_grad():
        ref = np_two_way(*(clip.encode_image(x).double().numpy() for x in norm))
    assert isinstance(out["clip"], float) and out["clip"] == pytest.approx(ref, abs=1e-9)
    assert "clip" not in out["unavailable"]
    assert M.evaluate_images(stimuli, stimuli, clip_model=clip, clip_size=32, size=None)["clip"] == 1.0

    # an open_clip-style preprocessing config on model.visual is used when no explicit values are given
    clip.visual = nn.Module()
    clip.visual.preprocess_cfg = {"size": (24, 24), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    clip.seen.clear()
    got = M.clip_features(clip, stimuli)
    assert set(clip.seen) == {(24, 24)}
    explicit = M.clip_features(clip, stimuli, mean=(0.5,) * 3, std=(0.25,) * 3, size=24)
    assert torch.equal(got, explicit)
    openai = M.clip_features(clip, stimuli, mean=M.CLIP_MEAN, std=M.CLIP_STD, size=24)
    assert not torch.allclose(got, openai)  # so the config's mean/std were really used
    legacy = nn.Module()  # older open_clip: separate image_mean / image_std / image_size attributes
    legacy.image_mean, legacy.image_std, legacy.image_size = (0.5,) * 3, (0.25,) * 3, 24
    clip.visual = legacy
    assert torch.equal(M.clip_features(clip, stimuli), explicit)
    with pytest.raises(TypeError, match="encode_image"):
        M.evaluate_images(stimuli, stimuli, clip_model=nn.Identity(), size=None)


def test_correlation_distance_branch_through_evaluate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The efficientnet / swav plumbing (lower is better), with a tiny stand-in architecture."""

    def tiny() -> nn.Module:
        torch.manual_seed(1)
        return nn.Sequential(nn.Conv2d(3, 6, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                             nn.Linear(24, 3))

    spec = M.FeatureNet(tiny, {"swav": "2"}, resize=24, crop=20, score="correlation_distance",
                        optional_prefixes=("4.",))
    monkeypatch.setitem(M.FEATURE_NETS, "swav", spec)
    net = tiny().eval()
    path = tmp_path / "swav.pth.tar"
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items() if not k.startswith("4.")}},
               path)
    recons, stimuli = _tiny_images(4, 5), _tiny_images(4, 6)
    out = M.evaluate_images(recons, stimuli, weights={"swav": path}, size=None, batch_size=3)

    def feats(x: torch.Tensor) -> np.ndarray:
        x = torch.nn.functional.interpolate(x, size=(24, 24), mode="bilinear", antialias=True)[..., 2:22, 2:22]
        x = (x - torch.tensor(M.IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(M.IMAGENET_STD).view(1, 3, 1, 1)
        with torch.no_grad():
            return net[:3](x).flatten(1).double().numpy()

    fr, fs = feats(recons), feats(stimuli)
    ref = np.mean([scipy_correlation(fr[i], fs[i]) for i in range(4)])
    assert out["swav"] == pytest.approx(ref, abs=1e-6) and out["swav"] > 0.0
    assert M.METRIC_DIRECTIONS["swav"] == "lower" and M.METRIC_DIRECTIONS["alexnet2"] == "higher"
    same = M.evaluate_images(stimuli, stimuli, weights={"swav": path}, size=None)
    assert same["swav"] == pytest.approx(0.0, abs=1e-12)


def test_real_architectures_have_the_protocol_layers_and_load_swav_style_checkpoints() -> None:
    models = {}
    for name, spec in M.FEATURE_NETS.items():
        model = models[name] = spec.build()
        modules = dict(model.named_modules())
        assert all(layer in modules for layer in spec.layers.values()), name
        if name == "inception":
            assert model.transform_input is True  # as torchvision sets for its pretrained Inception

    # SwAV checkpoints: "module." prefixes, an extra projection head and prototypes, no fc
    src = models["swav"]
    ckpt = {f"module.{k}": v for k, v in src.state_dict().items() if not k.startswith("fc.")}
    ckpt["module.projection_head.0.weight"] = torch.zeros(4, 4)
    ckpt["module.prototypes.weight"] = torch.zeros(3, 4)
    dst = M.FEATURE_NETS["swav"].build()
    spec = M.FEATURE_NETS["swav"]
    M.load_weights_into(dst, M._unwrap_state_dict(ckpt), spec.optional_prefixes, spec.ignored_prefixes)
    assert torch.equal(dst.layer4[2].conv3.weight, src.layer4[2].conv3.weight)
    assert torch.equal(dst.bn1.running_var, src.bn1.running_var)
    del ckpt["module.layer4.2.conv3.weight"]  # a backbone key missing: refused, never left random
    with pytest.raises(ValueError, match=r"missing key.*layer4\.2\.conv3\.weight"):
        M.load_weights_into(dst, M._unwrap_state_dict(ckpt), spec.optional_prefixes, spec.ignored_prefixes)
