"""Under DDP the teacher cache is filled by every rank, each encoding its own shard of the stimuli (issue 17).

Before, one rank won the cache's file lock and encoded all stimuli while the others waited on it (NSD: ~52 min of
a node with 7 GPUs idle). The recording teachers here log how many images each rank encoded, and the cache
records which rank wrote the entry; the DDP tests run 2 gloo processes on the CPU (the patterns and tiny teachers
of tests/test_ddp_devices.py).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from test_ddp_devices import TINY_CLIP, RecordingCLIP, RecordingVAE, _alignment, _ddp, _jsonl, _quiet

from neurovision.data.cache import shard_bounds
from neurovision.pretrained.teachers import TeacherCache


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class _Counts:
    """Mixin: every ``encode`` appends ``{"teacher", "rank", "n"}`` (images encoded) to ``<count>/count<rank>.jsonl``."""

    count: str | None

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        out = super().encode(images)  # type: ignore[misc]
        if self.count:
            with open(Path(self.count) / f"count{_rank()}.jsonl", "a") as f:
                f.write(json.dumps({"teacher": type(self).__name__, "rank": _rank(), "n": int(images.shape[0])}) + "\n")
        return out


class CountingCLIP(_Counts, RecordingCLIP):
    def __init__(self, count: str | None = None, **kw: Any) -> None:
        super().__init__(None, model_name="tiny_clip", model_config=TINY_CLIP, **kw)
        self.count = count


class CountingVAE(_Counts, RecordingVAE):
    def __init__(self, count: str | None = None, **kw: Any) -> None:
        super().__init__(None, config="tiny", image_size=32, **kw)
        self.count = count


class FailingCLIP(CountingCLIP):
    """Raises on rank ``fail_rank`` (a teacher that breaks on one rank must not leave the others waiting)."""

    def __init__(self, fail_rank: int, **kw: Any) -> None:
        super().__init__(**kw)
        self.fail_rank = fail_rank

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if _rank() == self.fail_rank:
            raise ValueError(f"teacher broke on rank {self.fail_rank}")
        return super().encode(images)


class WriterRecordingCache(TeacherCache):
    """Records which rank writes an entry (``<record>/wrote<rank>``)."""

    def __init__(self, record: str, **kw: Any) -> None:
        super().__init__(**kw)
        self.record = record

    def _write_entry(self, path: Path, store: Any, teacher: Any, rows: Any) -> None:
        (Path(self.record) / f"wrote{_rank()}").touch()
        super()._write_entry(path, store, teacher, rows)


def _counts(rec: Path, world: int) -> dict[tuple[str, int], int]:
    out: dict[tuple[str, int], int] = {}
    for r in range(world):
        for c in _jsonl(rec / f"count{r}.jsonl"):
            out[(c["teacher"], c["rank"])] = out.get((c["teacher"], c["rank"]), 0) + c["n"]
    return out


# --------------------------------------------------------------------------------------------- shard arithmetic
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 124, 37000])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_shards_are_contiguous_and_cover_every_stimulus_once(n, world):
    bounds = [shard_bounds(n, world, r) for r in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    for (_, a1), (b0, _) in zip(bounds, bounds[1:], strict=False):
        assert a1 == b0  # contiguous, in rank order, no overlap
    sizes = [i1 - i0 for i0, i1 in bounds]
    assert sum(sizes) == n and max(sizes) - min(sizes) <= 1  # balanced; uneven sizes differ by one row
    assert sizes == sorted(sizes, reverse=True)  # the first n % world shards hold the extra row


@pytest.mark.parametrize("n", [0, 1, 63, 64, 65, 124, 37000])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_aligned_shards_start_at_batch_boundaries(n, world):
    """Aligned to the fill's batch size, the sharded fill's batches are the one-process fill's batches."""
    bs = 16
    bounds = [shard_bounds(n, world, r, align=bs) for r in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    for (_, a1), (b0, _) in zip(bounds, bounds[1:], strict=False):
        assert a1 == b0
    sharded = {(i0, min(i0 + bs, i1)) for lo, i1 in bounds for i0 in range(lo, i1, bs)}
    assert sharded == {(i0, min(i0 + bs, n)) for i0 in range(0, n, bs)}
    sizes = [-(-(i1 - i0) // bs) for i0, i1 in bounds]  # batches per rank differ by at most one
    assert max(sizes) - min(sizes) <= 1


def test_shard_bounds_rejects_a_rank_outside_the_world():
    with pytest.raises(ValueError, match="shard 2 of 10 rows over 2 ranks"):
        shard_bounds(10, 2, 2)
    with pytest.raises(ValueError):
        shard_bounds(10, 0, 0)


def test_without_a_process_group_one_process_fills_everything(tiny_store, tmp_path):
    """No process group: the single-process path (every stimulus encoded here), and distributed=True refuses."""
    store = tmp_path / "tiny.h5"
    shutil.copy(tiny_store, store)
    (tmp_path / "rec").mkdir()
    t = CountingCLIP(str(tmp_path / "rec"))
    TeacherCache(progress=False, device="cpu").get(store, t)
    assert _counts(tmp_path / "rec", 1) == {("CountingCLIP", 0): 124}
    with pytest.raises(RuntimeError, match="process group"):
        TeacherCache(progress=False).get(store, t, distributed=True)


# --------------------------------------------------------------------------------------------- 2-rank DDP
def _spawned_get(rank: int, world: int, init: str, store: str, rec: str, fail_rank: int) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        t = FailingCLIP(fail_rank, count=rec, batch_size=1) if fail_rank >= 0 else CountingCLIP(rec, batch_size=1)
        try:
            out = WriterRecordingCache(rec, progress=False, device="cpu").get(store, t)
            np.save(Path(rec) / f"out{rank}.npy", out)
        except Exception as e:
            (Path(rec) / f"error{rank}.txt").write_text(f"{type(e).__name__}: {e}")
    finally:
        dist.destroy_process_group()


def _run_spawned(tmp_path: Path, store: Path, world: int, fail_rank: int) -> Path:
    rec = tmp_path / "rec"
    rec.mkdir()
    ctx = mp.get_context("spawn")
    init = f"file://{tmp_path / 'pg'}"
    procs = [ctx.Process(target=_spawned_get, args=(r, world, init, str(store), str(rec), fail_rank))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, "a rank hung (deadlock)"
    assert [p.exitcode for p in procs] == [0] * world
    return rec


@pytest.mark.slow
def test_ddp_uneven_shards_rank0_writes_and_every_rank_reads(tiny_store, tmp_path):
    """3 gloo ranks, 124 stimuli (shards 42/41/41): each rank encodes its own shard, only rank 0 writes the
    entry, every rank returns the same targets, equal to a single-process fill bit for bit (one-image batches:
    the same batches in both fills)."""
    store = tmp_path / "tiny.h5"
    shutil.copy(tiny_store, store)
    rec = _run_spawned(tmp_path, store, 3, -1)
    assert not list(rec.glob("error*.txt")), [f.read_text() for f in rec.glob("error*.txt")]
    assert _counts(rec, 3) == {("CountingCLIP", 0): 42, ("CountingCLIP", 1): 41, ("CountingCLIP", 2): 41}
    assert sorted(f.name for f in rec.glob("wrote*")) == ["wrote0"]
    ref = tmp_path / "ref" / "tiny.h5"
    ref.parent.mkdir()
    shutil.copy(tiny_store, ref)
    want = TeacherCache(progress=False, device="cpu").get(ref, CountingCLIP(batch_size=1))
    for r in range(3):
        got = np.load(rec / f"out{r}.npy")
        assert got.dtype == want.dtype and np.array_equal(got, want), r


@pytest.mark.slow
def test_ddp_error_on_one_rank_is_raised_on_every_rank(tiny_store, tmp_path):
    """A teacher failing on rank 1 raises there (its own error) and on rank 0 (naming rank 1); nobody hangs, and
    no entry is written."""
    store = tmp_path / "tiny.h5"
    shutil.copy(tiny_store, store)
    rec = _run_spawned(tmp_path, store, 2, 1)
    assert (rec / "error1.txt").read_text() == "ValueError: teacher broke on rank 1"
    err0 = (rec / "error0.txt").read_text()
    assert err0.startswith("RuntimeError") and "rank 1: ValueError: teacher broke on rank 1" in err0
    assert not list(rec.glob("wrote*")) and not list(rec.glob("out*.npy"))
    assert TeacherCache().entries(store) == []


@pytest.mark.slow
def test_ddp_alignment_fill_is_split_over_the_ranks(tiny_store, tmp_path):
    """2-process gloo DDP fit of AlignmentTask with an empty cache: each rank encodes half of the 124 stimuli with
    each teacher (before: one rank all, the other none), and the cache equals a single-process fill bit for bit
    (batches of 31 rows: the same batches in both fills)."""
    store = tmp_path / "run" / "tiny.h5"
    store.parent.mkdir()
    shutil.copy(tiny_store, store)
    rec = tmp_path / "rec"
    rec.mkdir()
    task, dm = _alignment(store, CountingCLIP(str(rec), batch_size=31), CountingVAE(str(rec), batch_size=31))
    L.Trainer(accelerator="cpu", devices=2, strategy=_ddp(2), max_steps=1, limit_val_batches=0,
              default_root_dir=tmp_path, **_quiet()).fit(task, dm)
    assert _counts(rec, 2) == {("CountingCLIP", 0): 62, ("CountingCLIP", 1): 62,
                               ("CountingVAE", 0): 62, ("CountingVAE", 1): 62}
    ref = tmp_path / "ref" / "tiny.h5"
    ref.parent.mkdir()
    shutil.copy(tiny_store, ref)
    for make in (CountingCLIP, CountingVAE):
        got = TeacherCache(progress=False).get(store, make(batch_size=31), distributed=False)  # a cache hit
        want = TeacherCache(progress=False, device="cpu").get(ref, make(batch_size=31))
        assert got.dtype == want.dtype and np.array_equal(got, want), make.__name__
