"""Stage 3: the unCLIP img2img reconstructor (β semantics, seeding, loading) and `neurovision test` end to end."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import last_version, run_cli, run_dirs

S1 = ["-c", "experiments/stage1_vit3d.yaml", "-c", "experiments/presets/stage1_vit3d_tiny.yaml"]
S3 = ["-c", "experiments/stage3_reconstruct.yaml", "-c", "experiments/presets/stage3_reconstruct_tiny.yaml"]
CLIP_DIM = 128  # experiments/teachers/tiny_clip.json


_root = run_dirs
_version = last_version


def _tiny_vae():
    from neurovision.pretrained.teachers import VAETeacher

    return VAETeacher(config="tiny", image_size=64, device="cpu")  # the tiny stage-1 preset's VAE (seed 0)


@pytest.fixture(scope="module")
def recon():
    from neurovision.tiny.unclip import build_tiny_unclip

    torch.manual_seed(0)
    embeds = torch.nn.functional.normalize(torch.randn(20, CLIP_DIM), dim=-1)
    return build_tiny_unclip(_tiny_vae().vae, CLIP_DIM, ["a red circle", "a blue square on grey"], embeds=embeds,
                             width=32)


def _inputs(n: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, 16, 16, generator=g), torch.randn(n, CLIP_DIM, generator=g)


def test_beta_zero_decodes_the_predicted_latent(recon):
    z, e = _inputs()
    out = recon.reconstruct(z, e, beta=0.0, steps=4)
    assert torch.equal(out, _tiny_vae().decode(z))  # the same VAE, the same scaling
    assert out.dtype == torch.uint8 and out.shape == (3, 3, 64, 64)


def test_beta_one_ignores_the_latent_and_intermediate_beta_uses_it(recon):
    z, e = _inputs()
    z2 = z + 3.0
    seeds = [11, 12, 13]
    a = recon.reconstruct(z, e, beta=1.0, steps=4, seeds=seeds)
    b = recon.reconstruct(z2, e, beta=1.0, steps=4, seeds=seeds)
    assert torch.equal(a, b)
    assert torch.equal(recon.reconstruct(None, e, beta=1.0, steps=4, seeds=seeds), a)
    c = recon.reconstruct(z, e, beta=0.5, steps=4, seeds=seeds)
    d = recon.reconstruct(z2, e, beta=0.5, steps=4, seeds=seeds)
    assert not torch.equal(c, d)
    # the image embedding conditions the UNet
    assert not torch.equal(recon.reconstruct(z, -e, beta=0.5, steps=4, seeds=seeds), c)


def test_timesteps_follow_img2img_strength(recon):
    assert len(recon.timesteps(0.0, 10)) == 0
    assert len(recon.timesteps(0.5, 10)) == 5
    assert len(recon.timesteps(0.93, 50)) == 46  # int(50 * 0.93), diffusers' img2img rule
    full = recon.timesteps(1.0, 10)
    assert len(full) == 10 and torch.equal(recon.timesteps(0.3, 10), full[-3:])  # the last (least noisy) steps


def test_seeded_per_item_and_independent_of_batching(recon):
    z, e = _inputs(4)
    seeds = [5, 6, 7, 8]
    full = recon.reconstruct(z, e, beta=0.7, steps=4, seeds=seeds, guidance_scale=2.0, prompts=["a red circle"] * 4)
    again = recon.reconstruct(z, e, beta=0.7, steps=4, seeds=seeds, guidance_scale=2.0, prompts=["a red circle"] * 4)
    assert torch.equal(full, again)
    part = recon.reconstruct(z[2:], e[2:], beta=0.7, steps=4, seeds=seeds[2:], guidance_scale=2.0,
                             prompts=["a red circle"] * 2)
    assert (part.int() - full[2:].int()).abs().max() <= 1  # batch-size float noise at most one grey level
    other = recon.reconstruct(z, e, beta=0.7, steps=4, seeds=[9, 6, 7, 8], guidance_scale=2.0,
                              prompts=["a red circle"] * 4)
    assert not torch.equal(other[0], full[0]) and torch.equal(other[1:], full[1:])
    no_prompt = recon.reconstruct(z, e, beta=0.7, steps=4, seeds=seeds, guidance_scale=2.0)
    assert not torch.equal(no_prompt, full)


def _pixel_selector(imgs: torch.Tensor) -> torch.Tensor:
    """A stand-in CLIP image encoder: a fixed random projection of 8x8-pooled pixels to CLIP_DIM."""
    w = torch.randn(3 * 8 * 8, CLIP_DIM, generator=torch.Generator().manual_seed(3))
    return torch.nn.functional.adaptive_avg_pool2d(imgs.float() / 255, 8).flatten(1) @ w


def test_best_of_n_keeps_the_candidate_closest_to_the_predicted_embedding(recon):
    from neurovision.pretrained.unclip import item_seed

    z, _ = _inputs(4)
    seeds = [21, 22, 23, 24]
    kw = {"beta": 0.8, "steps": 4, "guidance_scale": 2.0}
    # predicted embeddings in the selector's space, so the choice is not decided by one candidate always
    e = _pixel_selector(recon.reconstruct(z, torch.randn(4, CLIP_DIM), seeds=[1, 2, 3, 4], **kw))
    cands = [recon.reconstruct(z, e, seeds=s, **kw) for s in (seeds, *([item_seed(x, k) for x in seeds] for k in (1, 2)))]
    sims = torch.stack([torch.nn.functional.cosine_similarity(_pixel_selector(c), e, dim=-1) for c in cands])
    out, choice = recon.reconstruct(z, e, seeds=seeds, num_candidates=3, selector=_pixel_selector,
                                    return_choice=True, **kw)
    assert torch.equal(choice, sims.argmax(0))
    for i in range(4):
        assert torch.equal(out[i], cands[int(choice[i])][i])
    one, c1 = recon.reconstruct(z, e, seeds=seeds, return_choice=True, **kw)
    assert torch.equal(one, cands[0]) and not c1.any()  # one candidate = the plain sample
    assert not torch.equal(out, cands[0])  # this draw picks another candidate for some item
    b0, c0 = recon.reconstruct(z, e, beta=0.0, num_candidates=3, selector=_pixel_selector, return_choice=True)
    assert torch.equal(b0, recon.decode(z)) and not c0.any()  # β = 0 is deterministic
    with pytest.raises(ValueError, match="needs a selector"):
        recon.reconstruct(z, e, seeds=seeds, num_candidates=2, **kw)
    with pytest.raises(ValueError, match="num_candidates must be >= 1"):
        recon.reconstruct(z, e, seeds=seeds, num_candidates=0, **kw)


class _Count:
    """Counts the calls (and the rows of their first tensor argument) of a wrapped function."""

    def __init__(self, fn):
        self.fn, self.calls, self.rows = fn, 0, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        self.rows += int(first.shape[0]) if first is not None else 0
        return self.fn(*args, **kwargs)


def test_multi_beta_pass_equals_single_beta_runs_and_shares_the_per_item_work(recon, monkeypatch):
    import neurovision.pretrained.unclip as rmod

    z, _ = _inputs(3)
    e = _pixel_selector(recon.reconstruct(z, torch.randn(3, CLIP_DIM), beta=0.8, steps=4, seeds=[1, 2, 3]))
    kw = {"steps": 4, "guidance_scale": 2.0, "seeds": [31, 32, 33], "prompts": ["a red circle", None, "x"],
          "num_candidates": 2, "selector": _pixel_selector, "noise_level": 10}
    betas = [0.0, 0.5, 1.0]
    singles = [recon.reconstruct(z, e, beta=b, return_choice=True, **kw) for b in betas]
    counts = {"encode_prompt": _Count(recon.encode_prompt), "image_condition": _Count(recon.image_condition),
              "item_noise": _Count(rmod.item_noise)}
    monkeypatch.setattr(recon, "encode_prompt", counts["encode_prompt"])
    monkeypatch.setattr(recon, "image_condition", counts["image_condition"])
    monkeypatch.setattr(rmod, "item_noise", counts["item_noise"])
    multi = recon.reconstruct_betas(z, e, betas, **kw)
    assert len(multi) == 3
    for b, (img, choice), (want, want_choice) in zip(betas, multi, singles, strict=True):
        assert torch.equal(img, want), b
        assert torch.equal(choice, want_choice), b
    assert not torch.equal(multi[1][0], multi[2][0])
    # once per call, not per β: the prompts (+ the empty one of CFG), the conditioning, each candidate's noise
    # (+ the embedding's noise augmentation)
    assert (counts["encode_prompt"].calls, counts["image_condition"].calls, counts["item_noise"].calls) == (2, 1, 3)


@pytest.mark.parametrize("betas, steps, n, gs", [([0.0, 0.3, 0.5, 1.0], 10, 1, 1.0), ([0.5, 0.93], 10, 3, 2.0),
                                                 ([0.0], 4, 2, 7.5)])
def test_unet_evaluations_and_vae_decodes_match_the_denoising_loop(recon, monkeypatch, betas, steps, n, gs):
    from neurovision.pretrained.unclip import unet_evaluations, vae_decodes

    z, _ = _inputs(2)
    e = torch.randn(2, CLIP_DIM)
    rows = []
    handle = recon.unet.register_forward_hook(lambda m, args, out: rows.append(int(args[0].shape[0])))
    decode = _Count(recon.vae.decode)
    monkeypatch.setattr(recon.vae, "decode", decode)
    try:
        recon.reconstruct_betas(z, e, betas, steps=steps, guidance_scale=gs, num_candidates=n,
                                selector=_pixel_selector, seeds=[1, 2])
    finally:
        handle.remove()
    assert sum(rows) == 2 * unet_evaluations(betas, steps, n, gs)  # per item: rows / 2 items
    assert decode.rows == 2 * vae_decodes(betas, n)


def test_unet_evaluations_of_the_nsd_sweep():
    from neurovision.pretrained.unclip import denoising_steps, unet_evaluations, vae_decodes

    betas = [0.0, 0.3, 0.5, 0.7, 0.85, 0.93, 1.0]
    assert [denoising_steps(b, 25) for b in betas] == [0, 7, 12, 17, 21, 23, 25]
    assert unet_evaluations(betas, 25, 1, 7.5) == 2 * 105 and vae_decodes(betas) == 7
    assert unet_evaluations([0.93], 25, 8, 7.5) == 368 and vae_decodes([0.93], 8) == 8
    assert unet_evaluations(0.93, 50, 1, 1.0) == 46


def test_save_and_load_round_trip(recon, tmp_path):
    from neurovision.pretrained.unclip import UnCLIPReconstructor

    recon.save_pretrained(tmp_path / "r")
    loaded = UnCLIPReconstructor.from_pretrained(tmp_path / "r")
    z, e = _inputs(2)
    kw = {"beta": 0.6, "steps": 4, "seeds": [1, 2], "prompts": ["a blue square on grey", None],
          "noise_level": 10}
    assert torch.equal(loaded.reconstruct(z, e, **kw), recon.reconstruct(z, e, **kw))
    assert loaded.meta["clip_norm"] == pytest.approx(recon.meta["clip_norm"])


def test_bad_input_is_one_clear_error(recon, tmp_path):
    from neurovision.pretrained.unclip import UnCLIPReconstructor

    z, e = _inputs(2)
    with pytest.raises(ValueError, match=r"β must be in \[0, 1\]"):
        recon.reconstruct(z, e, beta=1.5)
    with pytest.raises(ValueError, match="VAE latents must be"):
        recon.reconstruct(z[:, :3], e, beta=0.5)
    bad = z.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        recon.reconstruct(bad, e, beta=0.5)
    with pytest.raises(ValueError, match=r"CLIP embeddings must be \(B, 128\)"):
        recon.reconstruct(z, e[:, :64], beta=0.5)
    with pytest.raises(ValueError, match="needs the predicted VAE latents"):
        recon.reconstruct(None, e, beta=0.5)
    with pytest.raises(FileNotFoundError, match="model.init_args.reconstructor.*no 'vae' component"):
        (tmp_path / "empty").mkdir()
        UnCLIPReconstructor.from_pretrained(tmp_path / "empty")


def test_image_grid(tmp_path):
    from PIL import Image

    from neurovision.pretrained.unclip import image_grid

    a = torch.zeros(3, 3, 8, 8, dtype=torch.uint8)
    b = torch.full((3, 3, 8, 8), 200, dtype=torch.uint8)
    g = image_grid([a, b], ["stimulus", "recon"], path=tmp_path / "grid.png")
    assert g.shape == (3 * 10 + 2, 2 * 10 + 2, 3)
    assert (g[2:10, 2:10] == 0).all() and (g[2:10, 12:20] == 200).all()
    assert Image.open(tmp_path / "grid.png").size[0] > 0


# ------------------------------------------------------------------------------------ end to end (CLI)
@pytest.fixture(scope="module")
def run(tiny_store, tmp_path_factory, recon):
    root = tmp_path_factory.mktemp("stage3")
    s1 = root / "s1"
    assert run_cli(["fit", *S1, *_root(s1), f"--data.init_args.store={tiny_store}", "--trainer.max_epochs=1",
                    "--trainer.limit_train_batches=4"]) == 0
    recon.save_pretrained(root / "unclip")
    ckpt = _version(s1) / "checkpoints" / "last.ckpt"
    common = [*S3, f"--data.init_args.store={tiny_store}", f"--model.init_args.stage1={ckpt}",
              f"--model.init_args.reconstructor={root / 'unclip'}"]
    return {"root": root, "common": common, "ckpt": ckpt, "store": tiny_store}


def _metrics(d: Path) -> dict[str, float]:
    rows = list(csv.DictReader(open(d / "metrics_table.csv")))
    return {r["metric"]: float(r["value"]) for r in rows}


def test_cli_test_writes_scores_grids_and_reconstructions(run):
    out = run["root"] / "b05"
    assert run_cli(["test", *run["common"], *_root(out), "--model.init_args.beta=0.5"]) == 0
    v = _version(out)
    m = _metrics(v)
    for cond in ("average", "single"):
        for k in ("pixcorr", "ssim", "clip"):
            assert np.isfinite(m[f"test/{cond}/{k}"])
        assert f"test/{cond}/alexnet2" not in m  # no weights: unavailable, not faked
        scores = json.loads((v / f"test_scores_{cond}.json").read_text())
        assert scores["n_items"] == 8 and scores["beta"] == 0.5
        assert scores["scores"]["alexnet2"] is None and "alexnet" in scores["unavailable"]["alexnet2"]
        assert scores["scores"]["clip"] == pytest.approx(m[f"test/{cond}/clip"])
        z = np.load(v / f"reconstructions_{cond}.npz")
        assert z["images"].shape == (8, 3, 64, 64) and z["images"].dtype == np.uint8
        assert (v / f"recon_grid_{cond}.png").stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = EventAccumulator(str(v), size_guidance={"images": 0}).Reload()
    assert {"test/average/reconstructions", "test/single/reconstructions"} <= set(ev.Tags()["images"])


def test_cli_beta_zero_is_the_decoded_stage1_latent(run):
    """β = 0 end to end: every reconstruction equals the VAE decoding of the stage-1 predicted latent."""
    from data_modules.fmri import FMRITrials
    from neurovision.data.store import Store
    from neurovision.models.stage1 import load_stage1
    from neurovision.pretrained.unclip import UnCLIPReconstructor

    out = run["root"] / "b0"
    assert run_cli(["test", *run["common"], *_root(out), "--model.init_args.beta=0",
                    "--data.init_args.eval_conditions=[average]"]) == 0
    z = np.load(_version(out) / "reconstructions_average.npz")
    parts = load_stage1(run["ckpt"])
    rec = UnCLIPReconstructor.from_pretrained(run["root"] / "unclip")
    store = Store(run["store"])
    ds = FMRITrials(store, "test", list(range(len(store.subject_names))), "average", max_items=8)
    items = [ds[i] for i in range(len(ds))]
    x = torch.stack([it["patches"] for it in items])
    with torch.no_grad():
        lat = parts.vae_head(parts.encoder(x).cls).view(-1, *rec.latent_shape)
    expect = rec.decode(lat).numpy()
    assert [it["stimulus"] for it in items] == z["stimulus"].tolist()
    assert (np.abs(expect.astype(int) - z["images"].astype(int)) <= 1).all()


def test_cli_prompts_from_stage2_predictions(run, tmp_path, capsys):
    rows = []
    from data_modules.fmri import FMRITrials
    from neurovision.data.store import Store

    store = Store(run["store"])
    ds = FMRITrials(store, "test", list(range(len(store.subject_names))), "average", max_items=8)
    for i in range(len(ds)):
        it = ds[i]
        rows.append({"subject": it["subject"], "stimulus": it["stimulus"], "trial": -1, "type": "sd_prompt",
                     "prediction": "a red circle"})
    p = tmp_path / "predictions.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    common = [*run["common"], "--model.init_args.beta=0.5", "--data.init_args.eval_conditions=[average]"]
    assert run_cli(["test", *common, *_root(run["root"] / "p1"), f"--model.init_args.prompts={p}"]) == 0
    assert run_cli(["test", *common, *_root(run["root"] / "p0")]) == 0
    with_prompt = np.load(_version(run["root"] / "p1") / "reconstructions_average.npz")["images"]
    without = np.load(_version(run["root"] / "p0") / "reconstructions_average.npz")["images"]
    assert with_prompt.shape == without.shape and not np.array_equal(with_prompt, without)
    p.write_text('{"subject": 0}\n')
    assert run_cli(["test", *common, *_root(run["root"] / "bad"), f"--model.init_args.prompts={p}"]) == 2
    assert re.search(r"predictions.jsonl: line 1: not a stage-2 prediction row", capsys.readouterr().err)


def test_cli_refuses_a_reconstructor_of_another_clip_space(run, tmp_path, capsys):
    from neurovision.tiny.unclip import build_tiny_unclip

    build_tiny_unclip(_tiny_vae().vae, 64, ["x"], width=32).save_pretrained(tmp_path / "r64")
    assert run_cli(["test", *run["common"], *_root(tmp_path / "o"), f"--model.init_args.reconstructor={tmp_path / 'r64'}"]) == 2
    assert re.search("share one CLIP space", capsys.readouterr().err)


def test_cli_best_of_n_needs_the_stage1_clip_teacher(run, tmp_path, capsys):
    out = tmp_path / "n2"
    common = [*run["common"], "--model.init_args.beta=0.5", "--data.init_args.eval_conditions=[average]"]
    assert run_cli(["test", *common, *_root(out), "--model.init_args.num_candidates=2"]) == 0
    v = _version(out)
    assert json.loads((v / "test_scores_average.json").read_text())["num_candidates"] == 2
    assert set(np.load(v / "reconstructions_average.npz")["candidate"].tolist()) <= {0, 1}
    assert run_cli(["test", *common, *_root(tmp_path / "o"), "--model.init_args.num_candidates=2",
                    "--model.init_args.clip_teacher.init_args.model_config=experiments/teachers/tiny_clip.json",
                    "--model.init_args.clip_teacher.init_args.normalize=false"]) == 2
    assert re.search("not the stage-1 CLIP teacher", capsys.readouterr().err)
    assert run_cli(["test", *common, *_root(tmp_path / "o2"), "--model.init_args.num_candidates=0"]) == 2
    assert re.search("num_candidates must be >= 1", capsys.readouterr().err)


# ------------------------------------------------------------------------------------------ many β, one pass
@pytest.fixture(scope="module")
def multi(run):
    """One test run over β in [0, 0.5, 1] with best of 2 (trial-averaged items), counting stage-1 predictions."""
    from neurovision.tasks.reconstruct import ReconstructionTask

    out = run["root"] / "multi"
    calls = _Count(ReconstructionTask.predict_latents)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ReconstructionTask, "predict_latents", lambda self, *a: calls(self, *a))
        assert run_cli(["test", *run["common"], *_root(out), "--model.init_args.beta=[0.0, 0.5, 1.0]",
                        "--model.init_args.num_candidates=2", "--data.init_args.eval_conditions=[average]"]) == 0
    return {"dir": _version(out), "stage1_calls": calls.calls}


@pytest.mark.parametrize("beta", [0.5, 1.0])
def test_cli_multi_beta_gives_each_beta_the_images_and_scores_of_a_one_beta_run(run, multi, beta, tmp_path):
    out = tmp_path / "one"
    assert run_cli(["test", *run["common"], *_root(out), f"--model.init_args.beta={beta}",
                    "--model.init_args.num_candidates=2", "--data.init_args.eval_conditions=[average]"]) == 0
    one, v = _version(out), multi["dir"]
    want = np.load(one / "reconstructions_average.npz")
    got = np.load(v / f"beta={beta:g}" / "reconstructions_average.npz")
    assert np.array_equal(got["images"], want["images"]) and np.array_equal(got["candidate"], want["candidate"])
    assert np.array_equal(got["stimulus"], want["stimulus"]) and "stimuli" not in got.files
    stim = np.load(v / "stimuli_average.npz")
    assert np.array_equal(stim["stimuli"], want["stimuli"]) and np.array_equal(stim["stimulus"], want["stimulus"])
    m, m1 = _metrics(v), _metrics(one)
    for k in ("pixcorr", "ssim", "clip"):
        assert m[f"test/average/beta={beta:g}/{k}"] == pytest.approx(m1[f"test/average/{k}"], abs=1e-7)
    scores = json.loads((v / f"beta={beta:g}" / "test_scores_average.json").read_text())
    assert scores["beta"] == beta and scores["n_items"] == 8 and scores["num_candidates"] == 2


def test_cli_multi_beta_runs_stage1_once_per_batch(multi):
    v = multi["dir"]
    assert multi["stage1_calls"] == 1  # 8 items, batch 8: one stage-1 prediction for the three β
    assert {p.name for p in v.iterdir() if p.name.startswith("beta=")} == {"beta=0", "beta=0.5", "beta=1"}
    assert set(np.load(v / "beta=0" / "reconstructions_average.npz")["candidate"].tolist()) == {0}
    from PIL import Image

    w = Image.open(v / "recon_grid_average.png").size[0]
    assert w > 0 and not (v / "test_scores_average.json").exists()
    m = _metrics(v)
    assert {f"test/average/beta={b}/pixcorr" for b in ("0", "0.5", "1")} <= set(m)


def test_cli_bad_beta_lists(run, tmp_path, capsys):
    for arg, msg in (("[0.5, 0.5]", "list of distinct"), ("[]", "list of distinct"),
                     ("[0.1, 0.5]", r"β = 0.1 runs int\(steps·β\) = 0")):
        assert run_cli(["test", *run["common"], *_root(tmp_path / "o"), f"--model.init_args.beta={arg}"]) == 2
        assert re.search(msg, capsys.readouterr().err), arg
