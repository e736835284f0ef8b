"""Stage 3 sharded over DDP ranks (2 CPU processes, gloo): the same reconstructions, choices and scores as one
process, with the best-of-N selector on each rank's own device (rank r on the device object ``cpu:r``, a
stand-in for its GPU)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch

from tests.test_stage3 import _metrics, recon, run  # noqa: F401  (the tiny stage-3 chain: stage 1 + unCLIP)

BETAS = ["0", "0.6", "1"]


class TeacherDevice(L.Callback):
    """Per rank: its root device, where the selector/metric CLIP teacher runs and holds its weights after each
    test batch (best of 2 calls it in every batch), and the stimuli the rank saw."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        t = pl_module.clip_teacher
        with open(Path(self.out) / f"rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps({"root": str(trainer.strategy.root_device), "device": str(t.device),
                                "weights": str(t.weights_device), "stimuli": batch["stimulus"].tolist()}) + "\n")


def _test(run: dict[str, Any], out: Path, devices: int) -> tuple[Path, list[dict[str, Any]]]:  # noqa: F811
    from lightning.pytorch.loggers import TensorBoardLogger
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    from callbacks import MetricsTable
    from data_modules import FMRIDataModule
    from neurovision.pretrained.teachers import OpenCLIPImageTeacher
    from neurovision.tasks.reconstruct import ReconstructionTask

    rec = out / "rec"
    rec.mkdir(parents=True)
    dm = FMRIDataModule(store=str(run["store"]), batch_size=1, num_workers=0, pin_memory=False,
                        eval_conditions=["average", "single"], return_images=True, max_eval_items=7)
    clip = OpenCLIPImageTeacher(model_name="tiny_clip", model_config="experiments/teachers/tiny_clip.json")  # unpinned
    task = ReconstructionTask(dm.spec, stage1=str(run["ckpt"]), reconstructor=str(run["root"] / "unclip"),
                              beta=[float(b) for b in BETAS], steps=4, num_candidates=2, clip_teacher=clip,
                              metric_size=32, metric_batch_size=16, grid_items=4)
    strategy = (DDPStrategy(start_method="spawn", process_group_backend="gloo",
                            parallel_devices=[torch.device("cpu", r) for r in range(devices)])
                if devices > 1 else SingleDeviceStrategy(device=torch.device("cpu", 0)))
    L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, logger=TensorBoardLogger(out, name="tb"),
              callbacks=[MetricsTable(), TeacherDevice(str(rec))], enable_progress_bar=False,
              enable_model_summary=False).test(task, dm)
    calls = [{**json.loads(x), "rank": r} for r in range(devices)
             for x in (rec / f"rank{r}.jsonl").read_text().splitlines()]
    return out / "tb" / "version_0", calls


@pytest.mark.slow
def test_ddp_sharded_test_equals_one_process(run, tmp_path, monkeypatch):  # noqa: F811  (the imported fixture)
    # one CPU thread in every process (Lightning gives each CPU rank cores // ranks threads otherwise, and float
    # sums differ with the thread count); batch 1, so an item's images do not depend on its batch-mates either
    threads = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    try:
        one, _ = _test(run, tmp_path / "one", 1)
        two, calls = _test(run, tmp_path / "two", 2)
    finally:
        torch.set_num_threads(threads)
    # the items were sharded (7 per condition: 4 + 4 with DistributedSampler's one repeat), and every rank's
    # selector ran on that rank's own device
    per_rank = [{s for c in calls if c["rank"] == r for s in c["stimuli"]} for r in (0, 1)]
    assert per_rank[0] and per_rank[1] and per_rank[0] != per_rank[1]
    assert len([c for c in calls if c["rank"] == 1]) == 2 * 4
    for c in calls:
        assert c["root"] == c["device"] == c["weights"] == f"cpu:{c['rank']}", c
    for cond in ("average", "single"):
        stim1, stim2 = np.load(one / f"stimuli_{cond}.npz"), np.load(two / f"stimuli_{cond}.npz")
        assert len(stim1["stimulus"]) == 7  # the padding repeat dropped
        for k in ("stimuli", "subject", "stimulus"):  # the same items in the same order
            assert np.array_equal(stim1[k], stim2[k]), (cond, k)
        for b in BETAS:
            a, c = np.load(one / f"beta={b}" / f"reconstructions_{cond}.npz"), np.load(two / f"beta={b}" / f"reconstructions_{cond}.npz")
            for k in ("images", "candidate", "subject", "stimulus"):
                assert np.array_equal(a[k], c[k]), (cond, b, k)
            s1 = json.loads((one / f"beta={b}" / f"test_scores_{cond}.json").read_text())
            s2 = json.loads((two / f"beta={b}" / f"test_scores_{cond}.json").read_text())
            assert s1 == s2
    assert set(np.load(two / "beta=0.6" / "reconstructions_average.npz")["candidate"].tolist()) == {0, 1}
    m1, m2 = _metrics(one), _metrics(two)
    assert m1 == m2 and "test/single/beta=0.6/clip" in m1
