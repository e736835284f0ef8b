"""Teachers: tiny open_clip / diffusers models from custom configs, the teacher cache, tiny teacher training."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from neurovision.data.store import Store
from neurovision.pretrained.teachers import (
    CLIP_CHECKPOINT_KEY,
    VAE_PATH_KEY,
    OpenCLIPImageTeacher,
    TeacherCache,
    VAETeacher,
    entry_name,
)
from tests.helpers import TINY_CLIP

TINY_VAE = {  # smaller than the built-in "tiny" preset: tests only need the shapes and the plumbing
    "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
    "block_out_channels": [8, 16], "norm_num_groups": 8, "latent_channels": 4, "sample_size": 32,
    "scaling_factor": 0.5,
}


@pytest.fixture(scope="module")
def clip_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("clip") / "tiny_clip.json"
    p.write_text(json.dumps(TINY_CLIP))
    return p


@pytest.fixture(scope="module")
def clip(clip_config: Path) -> OpenCLIPImageTeacher:
    return OpenCLIPImageTeacher("tiny", model_config=str(clip_config), device="cpu")


@pytest.fixture(scope="module")
def vae_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("vae") / "vae.json"
    p.write_text(json.dumps(TINY_VAE))
    return p


@pytest.fixture
def images(tiny_store: Path) -> torch.Tensor:
    return torch.from_numpy(Store(tiny_store).h5["stimuli/images"][:6]).permute(0, 3, 1, 2).contiguous()


@pytest.fixture
def store_copy(tiny_store: Path, tmp_path: Path) -> Path:
    """A private copy of the session's tiny store, so the cache file lands in this test's folder."""
    return Path(shutil.copy(tiny_store, tmp_path / "tiny.h5"))


# --------------------------------------------------------------------------------------------- CLIP
def test_clip_encodes_deterministically(clip: OpenCLIPImageTeacher, clip_config: Path,
                                        images: torch.Tensor) -> None:
    e = clip.encode(images)
    assert e.shape == (6, 32) and e.dtype == torch.float32 and clip.dim == 32
    torch.testing.assert_close(e.norm(dim=1), torch.ones(6))
    assert torch.equal(e, clip.encode(images))
    again = OpenCLIPImageTeacher("tiny", model_config=str(clip_config), device="cpu")  # same seed, same init
    assert torch.equal(e, again.encode(images)) and again.id == clip.id
    other = OpenCLIPImageTeacher("tiny", model_config=str(clip_config), seed=1, device="cpu")
    assert not torch.allclose(e, other.encode(images)) and other.id != clip.id
    assert clip.encode_text(["a red circle", "two shapes on a grey background"]).shape == (2, 32)
    # any input size goes through the model's own resize + centre crop
    big = torch.nn.functional.interpolate(images.float(), size=(48, 40)).to(torch.uint8)
    assert clip.preprocess(big).shape == (6, 3, 32, 32) and clip.encode(big).shape == (6, 32)
    with pytest.raises(ValueError, match="uint8"):
        clip.encode(images.float())


def test_clip_checkpoint_round_trip(clip: OpenCLIPImageTeacher, clip_config: Path, images: torch.Tensor,
                                    tmp_path: Path) -> None:
    ckpt = tmp_path / "tiny_clip.pt"
    torch.save(clip.model.state_dict(), ckpt)
    loaded = OpenCLIPImageTeacher("tiny", checkpoint=str(ckpt), model_config=str(clip_config), seed=7,
                                  device="cpu")  # the seed no longer matters: the weights come from the file
    assert torch.equal(loaded.encode(images), clip.encode(images))
    assert "sha256:" in loaded.id and loaded.id != clip.id


def test_clip_missing_files_name_path_and_key(clip_config: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "open_clip_model.bin"
    with pytest.raises(FileNotFoundError) as e:
        OpenCLIPImageTeacher("tiny", checkpoint=str(missing), model_config=str(clip_config))
    assert str(missing) in str(e.value) and CLIP_CHECKPOINT_KEY in str(e.value)
    with pytest.raises(FileNotFoundError, match="ViT-L-14"):  # a pretrained *tag* is not a file: no download
        OpenCLIPImageTeacher("ViT-L-14", checkpoint="ViT-L-14/openai")
    with pytest.raises(FileNotFoundError, match="model_config"):
        OpenCLIPImageTeacher("tiny", model_config=str(tmp_path / "absent.json"))


# --------------------------------------------------------------------------------------------- VAE
def test_vae_encode_decode(vae_config: Path, images: torch.Tensor) -> None:
    vae = VAETeacher(config=str(vae_config), image_size=32, device="cpu")
    z = vae.encode(images)
    assert z.shape == (6, *vae.latent_shape) == (6, 4, 16, 16)
    with torch.no_grad():
        raw = vae.vae.encode(vae.preprocess(images)).latent_dist.mean
    torch.testing.assert_close(z, raw * 0.5)  # latents are scaled by config.scaling_factor
    x = vae.decode(z)
    assert x.dtype == torch.uint8 and x.shape == (6, 3, 32, 32)
    up = VAETeacher(config=str(vae_config), image_size=64, device="cpu")  # resized before encoding
    assert up.encode(images).shape == (6, 4, 32, 32) and up.id != vae.id
    assert VAETeacher(config="tiny", image_size=64, device="cpu").latent_shape == (4, 16, 16)


def test_vae_from_pretrained_round_trip(vae_config: Path, images: torch.Tensor, tmp_path: Path) -> None:
    vae = VAETeacher(config=str(vae_config), image_size=32, device="cpu")
    vae.vae.save_pretrained(tmp_path / "sd" / "vae")
    for path in (tmp_path / "sd" / "vae", tmp_path / "sd"):  # the vae folder, or a pipeline root holding it
        loaded = VAETeacher(path=str(path), image_size=32, device="cpu")
        assert torch.equal(loaded.encode(images), vae.encode(images))
        assert loaded.scaling_factor == 0.5 and "sha256:" in loaded.id
    missing = tmp_path / "sd-2-1" / "vae"
    with pytest.raises(FileNotFoundError) as e:
        VAETeacher(path=str(missing))
    assert str(missing) in str(e.value) and VAE_PATH_KEY in str(e.value)
    with pytest.raises(ValueError, match="exactly one"):
        VAETeacher()


# --------------------------------------------------------------------------------------------- cache
class CountingTeacher:
    """A cheap teacher (per-image channel means times a factor) that counts its ``encode`` calls."""

    def __init__(self, name: str = "count", factor: float = 1.0, fail_at: int | None = None,
                 shape: tuple[int, ...] = (3,)) -> None:
        self.id = f"counting:{name}:{factor}"
        self.factor = factor
        self.fail_at = fail_at
        self.output_shape = shape
        self.batch_size = 16
        self.calls = 0

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.fail_at is not None and self.calls >= self.fail_at:
            raise RuntimeError("teacher crashed")
        m = images.float().mean((2, 3)) * self.factor
        return m.repeat(1, int(np.prod(self.output_shape)) // 3).reshape(len(images), *self.output_shape)


def test_cache_computes_once_and_reuses(store_copy: Path) -> None:
    t = CountingTeacher()
    a = TeacherCache(progress=False).get(store_copy, t)
    n = len(Store(store_copy).stimulus_ids)
    assert a.shape == (n, 3) and a.dtype == np.float32 and t.calls == -(-n // 16)
    path = store_copy.with_name("tiny.teachers.h5")
    assert path.is_file()
    calls = t.calls
    b = TeacherCache(progress=False).get(str(store_copy), t)  # a fresh cache object reads the file
    assert t.calls == calls and np.array_equal(a, b)
    images = Store(store_copy).h5["stimuli/images"][:]
    np.testing.assert_allclose(a, images.reshape(n, -1, 3).mean(1), rtol=1e-5)
    h = TeacherCache(dtype="float16", progress=False).get(store_copy, t)  # another dtype: another entry
    assert h.dtype == np.float16 and t.calls == 2 * calls
    assert sorted(e["dtype"] for e in TeacherCache().entries(store_copy)) == ["float16", "float32"]


def test_cache_is_reused_by_another_process(store_copy: Path) -> None:
    a = TeacherCache(progress=False).get(store_copy, CountingTeacher())
    script = (
        "import sys, numpy as np\n"
        "from neurovision.pretrained.teachers import TeacherCache\n"
        "class T:\n"
        "    id, output_shape, batch_size = 'counting:count:1.0', (3,), 16\n"
        "    def encode(self, images):\n"
        "        raise SystemExit('recomputed in the second process')\n"
        "np.save(sys.argv[2], TeacherCache(progress=False).get(sys.argv[1], T()))\n"
    )
    out = store_copy.parent / "b.npy"
    subprocess.run([sys.executable, "-c", script, str(store_copy), str(out)], check=True,
                   cwd=Path(__file__).parents[1])
    assert np.array_equal(np.load(out), a)


def test_cache_new_id_recomputes_and_keeps_others(store_copy: Path) -> None:
    cache = TeacherCache(progress=False)
    t1, t2 = CountingTeacher(factor=1.0), CountingTeacher(factor=2.0)
    a1 = cache.get(store_copy, t1)
    a2 = cache.get(store_copy, t2)
    assert t2.calls > 0 and np.allclose(a2, 2 * a1)
    c1 = t1.calls
    assert np.array_equal(cache.get(store_copy, t1), a1) and t1.calls == c1  # survived the rewrite
    assert {e["teacher_id"] for e in cache.entries(store_copy)} == {t1.id, t2.id}
    # a teacher with the same id but another output shape is a stale entry: recomputed
    t3 = CountingTeacher(factor=1.0, shape=(6,))
    assert cache.get(store_copy, t3).shape[1:] == (6,) and t3.calls > 0


def test_cache_stale_store_fingerprint_recomputes(store_copy: Path) -> None:
    cache = TeacherCache(progress=False)
    t, other = CountingTeacher(), CountingTeacher(factor=3.0)
    cache.get(store_copy, t)
    cache.get(store_copy, other)
    with h5py.File(cache.cache_path(Store(store_copy)), "r+") as f:  # as if the store had been regenerated
        for name in (entry_name(t.id), entry_name(other.id)):
            f["entries"][name].attrs["store_fingerprint"] = "an older store"
    calls = t.calls
    cache.get(store_copy, t)
    assert t.calls > calls
    assert {e["teacher_id"] for e in cache.entries(store_copy)} == {t.id}  # the other stale one: pruned


def test_cache_survives_a_crash_mid_compute(store_copy: Path) -> None:
    cache = TeacherCache(progress=False)
    good = CountingTeacher()
    a = cache.get(store_copy, good)
    before = cache.cache_path(Store(store_copy)).read_bytes()
    bad = CountingTeacher(name="bad", fail_at=3)
    with pytest.raises(RuntimeError, match="teacher crashed"):
        cache.get(store_copy, bad)
    assert cache.cache_path(Store(store_copy)).read_bytes() == before  # untouched
    assert not list(store_copy.parent.glob("*.partial"))
    calls = good.calls
    assert np.array_equal(cache.get(store_copy, good), a) and good.calls == calls
    assert {e["teacher_id"] for e in cache.entries(store_copy)} == {good.id}


def test_cache_with_a_real_teacher(clip: OpenCLIPImageTeacher, store_copy: Path) -> None:
    e = TeacherCache(progress=False).get(store_copy, clip)
    imgs = torch.from_numpy(Store(store_copy).h5["stimuli/images"][:5]).permute(0, 3, 1, 2)
    np.testing.assert_allclose(e[:5], clip.encode(imgs.contiguous()).numpy(), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------- training
def test_train_tiny_clip_lowers_loss_and_loads(tiny_store: Path, tmp_path: Path) -> None:
    from neurovision.tiny.teachers import tiny_clip_config, train_tiny_clip

    cfg = tiny_clip_config(image_size=32, tower="resnet", embed_dim=32, width=16, text_width=32, text_layers=1)
    out = train_tiny_clip(tiny_store, tmp_path / "t", epochs=4, batch_size=16, lr=3e-3, config=cfg,
                          progress=False)
    m = json.loads((out / "tiny_clip_metrics.json").read_text())
    assert m["steps"] == 4 * (112 // 16) and m["loss_last_epoch_mean"] < m["loss_first"]
    assert m["loss_last_epoch_mean"] < math.log(16) - 0.1  # better than chance, not only calibrated
    assert {"i2t_top1", "nn_different_scene", "noisy_self_top1"} <= set(m["test"])
    t = OpenCLIPImageTeacher("tiny_clip", model_config=str(out / "tiny_clip.json"),
                             checkpoint=str(out / "tiny_clip.pt"), device="cpu")
    assert t.encode(torch.zeros(2, 3, 32, 32, dtype=torch.uint8)).shape == (2, 32)


def test_train_tiny_vae_saves_a_loadable_vae(tiny_store: Path, vae_config: Path, tmp_path: Path) -> None:
    from neurovision.tiny.teachers import train_tiny_vae

    out = train_tiny_vae(tiny_store, tmp_path / "t", epochs=1, batch_size=16, config=str(vae_config),
                         progress=False)
    m = json.loads((out / "tiny_vae_metrics.json").read_text())
    assert m["steps"] == 112 // 16 and m["test"]["psnr_mean"] > 0
    v = VAETeacher(path=str(out / "tiny_vae"), image_size=32, device="cpu")
    assert v.scaling_factor == pytest.approx(m["scaling_factor"]) and v.latent_shape == (4, 16, 16)
    assert not list(out.glob(".*partial"))


def test_main_skips_existing_outputs(tiny_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from neurovision.tiny.teachers import main

    for f in ("tiny_clip.json", "tiny_clip.pt", "tiny_vae/config.json"):
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text("{}")
    assert main(["--store", str(tiny_store), "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.count("skipping") == 2
