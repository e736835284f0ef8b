"""The torchmetrics Metrics of neurovision.metrics equal the functional metrics on the same inputs (accumulated over
several updates, gathered from two simulated ranks and de-padded); the one Pearson equals the implementations it
replaced; fdr_bh equals its former implementation and scipy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import false_discovery_control
from torchmetrics.utilities.data import dim_zero_cat

from neurovision.metrics import (
    CaptionScores,
    ImageMetrics,
    ItemMean,
    RetrievalTop1,
    TwoWayIdentification,
    caption_metrics,
    first_occurrences,
    pearson_r,
    retrieval_top1,
    two_way_identification,
)
from neurovision.metrics.images import evaluate_images
from neurovision.metrics.instruct import GenerationScores, score_generations
from tests.helpers import np_two_way


# --------------------------------------------------------------------------------------- references
def _old_ridge_pearson(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """encoding.ridge.pearson_r before it called neurovision.metrics.correlation (one chunk)."""
    ys = y.astype(np.float64) - y.mean(0)
    ps = p.astype(np.float64) - p.mean(0)
    num = (ys * ps).sum(0)
    den = np.sqrt((ys * ys).sum(0) * (ps * ps).sum(0))
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


def _old_pixel_correlation(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """tasks.linear.pixel_correlation before."""
    p = pred - pred.mean(1, keepdim=True)
    t = target - target.mean(1, keepdim=True)
    return (p * t).sum(1) / (p.norm(dim=1) * t.norm(dim=1)).clamp_min(1e-8)


def _old_fdr_bh(p: np.ndarray) -> np.ndarray:
    """encoding.stats.fdr_bh's adjusted p before it called scipy."""
    flat = p.ravel()
    m = flat.size
    order = np.argsort(flat, kind="stable")
    ranked = flat[order] * m / np.arange(1, m + 1)
    adj_sorted = np.minimum(np.minimum.accumulate(ranked[::-1])[::-1], 1.0)
    adj = np.empty(m)
    adj[order] = adj_sorted
    return adj.reshape(p.shape)


class FakeWorld:
    """Two (or more) ranks in one process: each metric's ``dist_sync_fn`` returns every rank's state, in rank
    order, as torchmetrics' ``gather_all_tensors`` does (states are synced one by one, in ``add_state`` order)."""

    def __init__(self) -> None:
        self.metrics: list = []
        self.calls = 0

    def sync_fn(self, rank: int):
        def gather(t: torch.Tensor, group=None) -> list[torch.Tensor]:
            names = list(self.metrics[rank]._reductions)
            name = names[self.calls % len(names)]
            self.calls += 1
            out = []
            for r, m in enumerate(self.metrics):
                state = getattr(m, name)
                out.append(t if r == rank else (dim_zero_cat(state) if len(state) else torch.tensor([])))
            return out
        return gather

    def make(self, cls, *args, **kwargs) -> list:
        return [cls(*args, **kwargs) for _ in range(2)]


def _ranks(world: FakeWorld, cls, n_ranks: int = 2, **kwargs) -> list:
    world.metrics = [cls(dist_sync_fn=world.sync_fn(r), distributed_available_fn=lambda: True, **kwargs)
                     for r in range(n_ranks)]
    return world.metrics


def _shards(n: int, world: int) -> list[np.ndarray]:
    """DistributedSampler(shuffle=False): pad with the first items to a multiple of ``world``, rank r gets r::world."""
    idx = np.arange(n)
    total = -(-n // world) * world
    idx = np.concatenate([idx, idx[: total - n]])
    return [idx[r::world] for r in range(world)]


@pytest.fixture
def pairs(rng):
    subject = np.repeat([0, 1, 2], 9)
    stimulus = np.tile(np.arange(9), 3)
    target = torch.tensor(rng.normal(size=(27, 12)))
    pred = target + torch.tensor(rng.normal(scale=1.5, size=target.shape))
    return pred, target, torch.tensor(subject), torch.tensor(stimulus)


# --------------------------------------------------------------------------------------- Pearson
def test_pearson_numpy_equals_corrcoef_and_the_former_ridge_function(rng) -> None:
    y = rng.normal(size=(50, 7)).astype(np.float32)
    p = (y + rng.normal(size=y.shape)).astype(np.float32)
    p[:, 3] = 2.0  # constant: 0
    r = pearson_r(y, p)
    want = [np.corrcoef(y[:, j], p[:, j])[0, 1] if j != 3 else 0.0 for j in range(7)]
    np.testing.assert_allclose(r, want, atol=1e-12)
    np.testing.assert_allclose(r, _old_ridge_pearson(y, p), atol=1e-14)
    np.testing.assert_allclose(pearson_r(y, p, budget=8 * 3 * 50), r, atol=1e-14)  # one column per chunk
    np.testing.assert_allclose(pearson_r(y.T, p.T, dim=1), r, atol=1e-14)
    assert np.isnan(pearson_r(y, p, constant="nan")[3])
    with pytest.raises(ValueError, match=r"pred: item\(s\) \[3\] are constant"):
        pearson_r(y, p, constant="raise", names=("y", "pred"))
    with pytest.raises(ValueError, match="shapes differ"):
        pearson_r(y, p[:, :3])


def test_pearson_torch_rows_broadcast_and_pairwise(rng) -> None:
    a = torch.tensor(rng.normal(size=(6, 20)))
    b = a + torch.tensor(rng.normal(size=a.shape))
    ref = np.corrcoef(a.numpy(), b.numpy())[:6, 6:]  # ref[i, j] = r(a_i, b_j)
    np.testing.assert_allclose(pearson_r(a, b, dim=1).numpy(), np.diag(ref), atol=1e-12)
    np.testing.assert_allclose(pearson_r(a, b, pairwise=True).numpy(), ref, atol=1e-12)
    np.testing.assert_allclose(pearson_r(a[:, None], b[None], dim=-1).numpy(), ref, atol=1e-12)
    assert pearson_r(a.float(), b.float(), dim=1).dtype == torch.float32
    const = torch.ones(2, 20, dtype=torch.float64)
    assert pearson_r(const, b[:2], dim=1).tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match=r"recon: item\(s\) \[5, 6\] are constant"):
        pearson_r(const, b[:2], dim=1, constant="raise", names=("recon", "target"), offset=5)


def test_linear_baseline_scores_equal_the_former_formula(rng) -> None:
    from neurovision.tasks.linear import pixel_correlation

    pred = torch.tensor(rng.normal(size=(8, 48)), dtype=torch.float32)
    target = torch.tensor(rng.uniform(size=(8, 48)), dtype=torch.float32)
    target[3] = target[1]  # a repeated image in the batch: ties must stay ties
    torch.testing.assert_close(pixel_correlation(pred, target), _old_pixel_correlation(pred, target))
    old = _old_pixel_correlation(pred.repeat_interleave(8, 0), target.repeat(8, 1)).view(8, -1)
    new = pearson_r(pred[:, None], target[None], dim=-1)
    torch.testing.assert_close(new, old)
    ident = lambda c: ((c.diag()[:, None] > c).float().sum(1) / 7).mean().item()  # noqa: E731
    assert ident(new) == ident(old)


def test_interpretation_and_image_pearsons_call_the_one(rng) -> None:
    from neurovision.localization.maps import pearson
    from neurovision.metrics.images import correlation_distance

    a, b = rng.normal(size=(5, 6)), rng.normal(size=(5, 6))
    m = rng.uniform(size=(5, 6)) > 0.3
    assert pearson(a, b, m) == pytest.approx(float(pearson_r(a[m], b[m])), abs=1e-15)
    assert np.isnan(pearson(np.ones(4), b[0, :4]))
    p, t = rng.normal(size=(5, 30)), rng.normal(size=(5, 30))
    assert correlation_distance(p, t) == pytest.approx(
        float((1 - pearson_r(torch.tensor(p), torch.tensor(t), dim=1)).mean()), abs=1e-14)


# --------------------------------------------------------------------------------------- FDR
def test_fdr_bh_equals_its_former_implementation_and_scipy_with_ties(rng) -> None:
    from neurovision.encoding.stats import fdr_bh

    p = rng.choice([0.001, 0.01, 0.02, 0.04, 0.2, 0.5, 1.0], size=(9, 11))  # many ties
    p[0, :4] = 0.0
    reject, adj = fdr_bh(p, q=0.05)
    np.testing.assert_allclose(adj, _old_fdr_bh(p), rtol=1e-12)
    np.testing.assert_allclose(adj, false_discovery_control(p, axis=None).reshape(p.shape), rtol=1e-12)
    np.testing.assert_array_equal(reject, _old_fdr_bh(p) <= 0.05)
    assert 0 < reject.sum() < p.size
    r0, a0 = fdr_bh(np.empty((0, 3)))
    assert r0.shape == a0.shape == (0, 3)
    for bad in (np.array([0.1, np.nan]), np.array([0.1, np.inf]), np.array([-0.1])):
        with pytest.raises(ValueError, match="finite values in"):
            fdr_bh(bad)


# --------------------------------------------------------------------------------------- Metrics
def test_metrics_accumulated_over_updates_equal_the_functions(pairs) -> None:
    pred, target, subject, stimulus = pairs
    perm = torch.randperm(27, generator=torch.Generator().manual_seed(0))  # batches in any order
    ret = RetrievalTop1(candidates=5, draws=7, seed=2)
    ret_all = RetrievalTop1()
    ident = TwoWayIdentification()
    unkeyed = TwoWayIdentification()
    for chunk in perm.split(6):
        ret.update(pred[chunk], target[chunk], subject[chunk], stimulus[chunk])
        ret_all.update(pred[chunk], target[chunk], subject[chunk], stimulus[chunk])
        ident.update(pred[chunk], target[chunk], subject=subject[chunk], stimulus=stimulus[chunk])
        unkeyed.update(pred[chunk], target[chunk])
    # keyed items are scored in (subject, stimulus) order, i.e. the original order here
    assert ret.compute() == retrieval_top1(pred, target, candidates=5, draws=7, seed=2)
    assert ret_all.compute() == retrieval_top1(pred, target)
    assert ident.compute() == pytest.approx(two_way_identification(pred, target), abs=1e-15)
    assert ident.compute() == pytest.approx(np_two_way(pred.numpy(), target.numpy()))
    assert unkeyed.compute() == pytest.approx(two_way_identification(pred[perm], target[perm]), abs=1e-15)
    for m in (ret, ident):
        for name in ("pred", "target", "subject", "stimulus"):
            assert m._reductions[name] is dim_zero_cat  # torchmetrics gathers them across ranks
    ident.reset()
    with pytest.warns(UserWarning, match="before the ``update``"), pytest.raises(ValueError, match="no items"):
        ident.compute()


def test_by_subject_equals_the_function_per_subject_and_drops_small_subjects(pairs) -> None:
    pred, target, subject, stimulus = pairs
    keep = ~((subject == 2) & (stimulus > 0))  # subject 2 keeps one item: left out (min_items=2)
    pred, target, subject, stimulus = pred[keep], target[keep], subject[keep], stimulus[keep]
    ret = RetrievalTop1(by_subject=True, min_items=2)
    ident = TwoWayIdentification(by_subject=True, min_items=2)
    cos = ItemMean(by_subject=True, min_items=2)
    for chunk in torch.arange(len(pred)).split(4):
        ret.update(pred[chunk], target[chunk], subject[chunk], stimulus[chunk])
        ident.update(pred[chunk], target[chunk], subject[chunk], stimulus[chunk])
        cos.update(torch.nn.functional.cosine_similarity(pred[chunk], target[chunk]), subject[chunk], stimulus[chunk])
    r, i, c = ret.compute(), ident.compute(), cos.compute()
    assert sorted(r) == sorted(i) == sorted(c) == [0, 1]
    for s in (0, 1):
        m = subject == s
        assert r[s] == retrieval_top1(pred[m], target[m])
        assert i[s] == pytest.approx(two_way_identification(pred[m], target[m]), abs=1e-15)
        assert c[s] == pytest.approx(torch.nn.functional.cosine_similarity(pred[m], target[m]).mean().item())
    with pytest.raises(ValueError, match="needs subject and stimulus"):
        TwoWayIdentification(by_subject=True).update(pred, target)


def test_two_ranks_with_sampler_padding_equal_one_process(pairs) -> None:
    """Gathered as torchmetrics gathers (rank order) from a DistributedSampler's padded shards, then de-padded."""
    pred, target, subject, stimulus = pairs
    n = 26  # 26 items on 4 ranks: 2 padded repeats
    world = FakeWorld()
    shards = _shards(n, 4)
    assert sum(len(s) for s in shards) == 28
    ranks = _ranks(world, RetrievalTop1, n_ranks=4, candidates=6, draws=5, by_subject=True, min_items=2)
    for m, idx in zip(ranks, shards, strict=True):
        for chunk in torch.as_tensor(idx).split(3):
            m.update(pred[chunk], target[chunk], subject[chunk], stimulus[chunk])
    got = ranks[1].compute()  # every rank computes the same
    want = {s: retrieval_top1(pred[:n][subject[:n] == s], target[:n][subject[:n] == s], 6, 5) for s in (0, 1, 2)}
    assert got == want
    assert ranks[3].compute() == want
    # the local states are kept (torchmetrics unsyncs after compute): this rank's items only
    assert len(dim_zero_cat(ranks[1].pred)) == 7
    items = ranks[0].gather()
    assert items["stimulus"].tolist() == stimulus[:n].tolist() and items["subject"].tolist() == subject[:n].tolist()
    # without the keys the padding would count twice
    world2 = FakeWorld()
    unkeyed = _ranks(world2, TwoWayIdentification, n_ranks=4)
    for m, idx in zip(unkeyed, shards, strict=True):
        m.update(pred[torch.as_tensor(idx)], target[torch.as_tensor(idx)])
    assert len(unkeyed[0].gather()["pred"]) == 28


def test_first_occurrences() -> None:
    keys = [(1, 5), (0, 2), (1, 5), (0, 1), (0, 2)]
    assert first_occurrences(keys) == [3, 1, 0]
    assert first_occurrences(keys, sort=False) == [0, 1, 3]


def test_image_metrics_equal_evaluate_images(rng) -> None:
    recon = torch.from_numpy(rng.integers(0, 256, size=(7, 3, 16, 16), dtype=np.uint8))
    target = torch.from_numpy(rng.integers(0, 256, size=(7, 3, 16, 16), dtype=np.uint8))
    subject, stimulus = torch.zeros(7, dtype=torch.long), torch.arange(7)
    kw = {"size": None, "batch_size": 3}
    m = ImageMetrics(kw)
    for chunk in torch.arange(7).split(3):
        m.update(recon[chunk], target[chunk], subject[chunk], stimulus[chunk])
    want = evaluate_images(recon, target, **kw)
    got = m.compute()
    assert got["pixcorr"] == pytest.approx(want["pixcorr"], abs=1e-14)
    assert got["ssim"] == pytest.approx(want["ssim"], abs=1e-14)
    assert got["unavailable"] == want["unavailable"]
    assert m.score(m.gather(), size=12)["pixcorr"] == pytest.approx(evaluate_images(recon, target, size=12)["pixcorr"])
    extra = ImageMetrics(kw, extra_fields=("candidate",))
    extra.update(recon, target, subject, stimulus, candidate=torch.arange(7))
    assert extra.gather()["candidate"].tolist() == list(range(7))
    with pytest.raises(ValueError, match="candidate"):
        extra.update(recon, target, subject, stimulus)


CAPTIONS = [("a red ball on the grass", ["a red ball lies on green grass", "red ball on a lawn"]),
            ("two dogs play", ["two dogs are playing in a park", "a pair of dogs playing"]),
            ("a blue car", ["a blue car parked on the street", "blue car by the road"]),
            ("a cat sleeps", ["a cat sleeping on a sofa", "the cat is asleep"])]


def test_caption_scores_equal_caption_metrics_over_updates_and_ranks() -> None:
    pytest.importorskip("pycocoevalcap")
    kw = {"spice": False, "meteor": False, "tokenizer": "python"}
    want = caption_metrics({i: c for i, (c, _) in enumerate(CAPTIONS)}, {i: r for i, (_, r) in enumerate(CAPTIONS)},
                           **kw)
    m = CaptionScores(**kw)
    m.update([c for c, _ in CAPTIONS[:3]], [r for _, r in CAPTIONS[:3]], keys=[0, 1, 2])
    m.update([CAPTIONS[3][0]], [CAPTIONS[3][1]], keys=[3])
    assert m.compute() == want
    # two ranks, padded with a repeat of item 0: de-padded by key
    world = FakeWorld()
    ranks = _ranks(world, CaptionScores, **kw)
    for m, idx in zip(ranks, _shards(3, 2), strict=True):
        m.update([CAPTIONS[i][0] for i in idx], [CAPTIONS[i][1] for i in idx], keys=[int(i) for i in idx])
    assert [r["key"] for r in ranks[0].gather()] == [0, 2, 1]  # rank order, first occurrence kept
    assert ranks[0].compute() == caption_metrics({i: CAPTIONS[i][0] for i in (0, 2, 1)},
                                                 {i: CAPTIONS[i][1] for i in (0, 2, 1)}, **kw)
    assert ranks[0].compute() != want  # item 3 is missing: the test can tell


def test_generation_scores_equal_score_generations_and_keep_rows_in_one_process(monkeypatch) -> None:
    pytest.importorskip("pycocoevalcap")
    import neurovision.metrics.captions as captions

    real = captions.caption_metrics
    monkeypatch.setattr(captions, "caption_metrics",
                        lambda c, r: real(c, r, spice=False, meteor=False, tokenizer="python"))
    rows = [{"subject": 0, "stimulus": i, "trial": -1, "type": "caption", "question": "q", "prediction": c,
             "references": r} for i, (c, r) in enumerate(CAPTIONS)]
    rows += [{"subject": 0, "stimulus": 1, "trial": -1, "type": "reasoning", "question": "how many?",
              "answer": "two", "qtype": "count", "prediction": p} for p in ("Two.", "three")]  # same key twice
    m = GenerationScores()
    m.update(rows[:3])
    m.update(rows[3:])
    assert m.gather() == rows  # one process: every row, in order (no de-padding)
    assert m.compute() == score_generations(rows)
    world = FakeWorld()
    ranks = _ranks(world, GenerationScores)
    ranks[0].update(rows[:4])
    ranks[1].update(rows[4:] + rows[:1])  # rank 1 padded with rank 0's first row
    got = ranks[1].gather()
    assert got == rows[:5]  # gathered: the repeat of a (subject, stimulus, type, question) key dropped


# --------------------------------------------------------------------------------------- tasks
def _former_alignment_metrics(task, batches: list[dict], names: list[str], split: str, cond: str) -> dict[str, float]:
    """AlignmentTask's evaluation before it used the Metrics: concatenate, de-pad by (subject, stimulus), per
    subject the functional metrics, then the mean over subjects."""
    with torch.no_grad():
        preds = [task(b["patches"], b["subject"]) for b in batches]
    clip = torch.cat([p["clip"].float() for p in preds])
    vae = torch.cat([p["vae"].float() for p in preds])
    stim = torch.cat([b["stimulus"] for b in batches])
    subj = torch.cat([b["subject"] for b in batches])
    key = subj.long() * (int(stim.max()) + 1) + stim.long()
    _, first = np.unique(key.numpy(), return_index=True)
    keep = torch.as_tensor(first)
    clip, vae, stim, subj = clip[keep], vae[keep], stim[keep], subj[keep]
    out, per = {}, []
    for s in subj.unique():
        m = subj == s
        tgt = task.clip_targets[stim[m]]
        r = retrieval_top1(clip[m], tgt, task.retrieval_candidates, task.retrieval_draws)
        d = {"retrieval_fmri2img": r["fmri2img"], "retrieval_img2fmri": r["img2fmri"],
             "retrieval_chance": 1.0 / r["candidates"], "identification": two_way_identification(clip[m], tgt),
             "clip_cosine": torch.nn.functional.cosine_similarity(clip[m], tgt, dim=1).mean().item(),
             "vae_mse": torch.nn.functional.mse_loss(vae[m], task.vae_targets[stim[m]]).item()}
        per.append(d)
        out.update({f"{split}/{cond}/{names[int(s)]}/{k}": v for k, v in d.items()})
    out.update({f"{split}/{cond}/{k}": float(np.mean([d[k] for d in per])) for k in per[0]})
    return out


def test_alignment_task_logs_the_values_of_the_former_evaluation(tiny_store, tmp_path) -> None:
    import shutil
    from pathlib import Path

    import lightning as L

    from data_modules import FMRIDataModule
    from neurovision.pretrained.teachers import OpenCLIPImageTeacher, VAETeacher
    from neurovision.tasks import AlignmentTask

    root = Path(__file__).resolve().parents[1]
    store = tmp_path / "tiny.h5"
    shutil.copy(tiny_store, store)
    dm = FMRIDataModule(store=str(store), batch_size=5)
    clip = OpenCLIPImageTeacher(model_name="tiny_clip", model_config=str(root / "experiments/teachers/tiny_clip.json"),
                                device="cpu")
    vae = VAETeacher(config="tiny", image_size=64, device="cpu")
    torch.manual_seed(0)
    task = AlignmentTask(data_spec=dm.spec, clip_teacher=clip, vae_teacher=vae, dim=32, depth=1, heads=2,
                         head_hidden=32, retrieval_candidates=3, retrieval_draws=4)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.validate(task, dm)
    names = dm.store.subject_names
    task.eval()
    for idx, cond in enumerate(dm.eval_conditions):
        want = _former_alignment_metrics(task, list(dm.val_dataloader()[idx]), names, "val", cond)
        got = {k: v for k, v in trainer.callback_metrics.items() if k.startswith(f"val/{cond}/") and not
               k.endswith("/loss")}
        assert sorted(got) == sorted(want)
        for k, v in want.items():
            assert float(got[k]) == pytest.approx(v, rel=1e-6, abs=1e-7), k


@pytest.mark.slow
def test_alignment_task_on_two_ddp_ranks_logs_the_values_of_one_process(tiny_store, tmp_path) -> None:
    """2 CPU processes (gloo), 7 evaluation items per condition: DistributedSampler pads with a repeat, which the
    Metrics' gathering and de-padding must drop to give one process's values."""
    import shutil
    from pathlib import Path

    import lightning as L

    import neurovision  # noqa: F401  (torchvision fix; spawned ranks rely on neurovision_boot.pth)
    from data_modules import FMRIDataModule
    from neurovision.pretrained.teachers import OpenCLIPImageTeacher, VAETeacher
    from neurovision.tasks import AlignmentTask

    root = Path(__file__).resolve().parents[1]
    store = tmp_path / "tiny.h5"
    shutil.copy(tiny_store, store)
    dm = FMRIDataModule(store=str(store), batch_size=2, num_workers=0, pin_memory=False, max_eval_items=7)
    clip = OpenCLIPImageTeacher(model_name="tiny_clip", model_config=str(root / "experiments/teachers/tiny_clip.json"),
                                device="cpu")
    torch.manual_seed(0)
    task = AlignmentTask(data_spec=dm.spec, clip_teacher=clip, vae_teacher=VAETeacher(config="tiny", image_size=64,
                         device="cpu"), dim=32, depth=1, heads=2, head_hidden=32, retrieval_candidates=3,
                         retrieval_draws=4)
    quiet = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
             "enable_model_summary": False, "default_root_dir": tmp_path}
    one = {k: v for d in L.Trainer(accelerator="cpu", devices=1, **quiet).validate(task, dm) for k, v in d.items()}
    two = {k: v for d in L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", **quiet).validate(task, dm)
           for k, v in d.items()}
    keys = [k for k in one if not k.endswith("/loss")]
    assert any("/sub-" in k for k in keys) and "val/single/retrieval_fmri2img" in keys
    for k in keys:
        assert two[k] == pytest.approx(one[k], rel=1e-5, abs=1e-6), k


def _gather_to_zero_rank(rank: int, init: str, out: str) -> None:
    import torch.distributed as dist

    from neurovision.metrics.items import gather_to_zero

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        n = 3 if rank == 0 else 2  # uneven shards
        local = torch.full((n, 3, 4 + rank, 2), rank + 1, dtype=torch.uint8)
        got = gather_to_zero(local)
        torch.save([g.clone() for g in got], f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_gather_to_zero_gives_rank_zero_every_rank_and_the_others_their_own(tmp_path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_gather_to_zero_rank, args=(f"file://{tmp_path / 'init'}", str(tmp_path)), nprocs=2)
    zero, one = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert [tuple(t.shape) for t in zero] == [(3, 3, 4, 2), (2, 3, 5, 2)]
    assert [t.unique().tolist() for t in zero] == [[1], [2]] and zero[0].dtype == torch.uint8
    assert len(one) == 1 and one[0].shape == (2, 3, 5, 2) and one[0].unique().tolist() == [2]


@pytest.mark.parametrize("shape", [(2, 3, 64, 64), (1, 3, 48, 80), (1, 3, 480, 640), (1, 3, 100, 37)])
def test_teacher_resize_is_open_clips_eval_transform(shape: tuple[int, ...]) -> None:
    """The teachers' tensor resize is torchvision's ``Resize(size)`` + ``CenterCrop(size)`` (open_clip's eval
    transform for a square size), including the long side's rounding (480 x 640 -> 224 x 298, not 299)."""
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Resize

    from neurovision.pretrained.teachers import resize_images

    x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    ref = Compose([Resize(32, interpolation=InterpolationMode.BICUBIC, antialias=True), CenterCrop(32)])(x)
    torch.testing.assert_close(resize_images(x, 32), ref, rtol=0, atol=0)
    assert resize_images(x, (24, 40), "bilinear", "squash").shape[-2:] == (24, 40)
    padded = resize_images(x, 32, "bicubic", "longest", fill=0.5)
    assert padded.shape[-2:] == (32, 32) and (shape[-1] == shape[-2] or bool((padded == 0.5).any()))
