"""Stage 3 sharded over DDP ranks (2 CPU processes, gloo): the same reconstructions, choices and scores as one
process, with the best-of-N selector on each rank's own device."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest

import neurovision  # noqa: F401  (torchvision fix; spawned ranks rely on neurovision_boot.pth)
from tests.helpers import run_cli
from tests.test_stage3 import _metrics, _root, _version, recon, run  # noqa: F401  (the tiny stage-3 chain)


class TeacherDevice(L.Callback):
    """Records, per rank, where the selector/metric CLIP teacher is when each test batch starts."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        t = pl_module.clip_teacher
        p = Path(self.out) / f"rank{trainer.global_rank}.jsonl"
        with open(p, "a") as f:
            f.write(json.dumps({"root": str(trainer.strategy.root_device), "teacher": str(t.device),
                                "weights": str(next(t.model.parameters()).device),
                                "stimuli": batch["stimulus"].tolist()}) + "\n")


def _test(run, out: Path, devices: int, record: Path) -> Path:  # noqa: F811
    record.mkdir(parents=True, exist_ok=True)
    unpinned = record / "unpinned.yaml"  # the preset pins the teacher to the CPU; unpinned it follows the rank
    unpinned.write_text("model:\n  init_args:\n    clip_teacher:\n      init_args:\n        device: null\n")
    cb = json.dumps({"class_path": "tests.test_stage3_ddp.TeacherDevice", "init_args": {"out": str(record)}})
    assert run_cli(["test", *run["common"], *_root(out), "--model.init_args.beta=[0.0, 0.6, 1.0]",
                    "--model.init_args.num_candidates=2", "-c", str(unpinned),
                    "--data.init_args.max_eval_items=7", "--data.init_args.batch_size=1",
                    f"--trainer.devices={devices}", *(["--trainer.strategy=ddp_spawn"] if devices > 1 else []),
                    f"--trainer.callbacks+={cb}"]) == 0
    return _version(out)


@pytest.mark.slow
def test_ddp_sharded_test_equals_one_process(run, tmp_path, monkeypatch):  # noqa: F811  (the imported fixture)
    # one CPU thread in every process (Lightning gives each CPU rank cores // ranks threads otherwise, and float
    # sums differ with the thread count); batch 1, so an item's images do not depend on its batch-mates either
    import torch

    threads = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    try:
        one = _test(run, tmp_path / "one", 1, tmp_path / "rec1")
        two = _test(run, tmp_path / "two", 2, tmp_path / "rec2")
    finally:
        torch.set_num_threads(threads)
    # the items were sharded: each rank saw part of them (7 items: 4 + 4 with DistributedSampler's one repeat)
    seen = {r: [json.loads(x) for x in (tmp_path / "rec2" / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)}
    per_rank = [{s for row in seen[r] for s in row["stimuli"]} for r in (0, 1)]
    assert per_rank[0] and per_rank[1] and per_rank[0] != per_rank[1]
    assert all(row["teacher"] == row["weights"] == row["root"] for r in (0, 1) for row in seen[r])
    for cond in ("average", "single"):
        stim1, stim2 = np.load(one / f"stimuli_{cond}.npz"), np.load(two / f"stimuli_{cond}.npz")
        assert len(stim1["stimulus"]) == 7  # the padding repeat dropped
        for k in ("stimuli", "subject", "stimulus"):  # same items in the same order
            assert np.array_equal(stim1[k], stim2[k]), (cond, k)
        for b in ("0", "0.6", "1"):
            a, c = np.load(one / f"beta={b}" / f"reconstructions_{cond}.npz"), np.load(two / f"beta={b}" / f"reconstructions_{cond}.npz")
            for k in ("images", "candidate", "subject", "stimulus"):
                assert np.array_equal(a[k], c[k]), (cond, b, k)
            s1 = json.loads((one / f"beta={b}" / f"test_scores_{cond}.json").read_text())
            s2 = json.loads((two / f"beta={b}" / f"test_scores_{cond}.json").read_text())
            assert s1 == s2
    assert set(np.load(two / "beta=0.6" / "reconstructions_average.npz")["candidate"].tolist()) == {0, 1}
    m1, m2 = _metrics(one), _metrics(two)
    assert m1 == m2 and "test/single/beta=0.6/clip" in m1
