"""Under DDP each rank sees a distinct shard of the training trials (2 CPU processes, gloo)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from data_modules import FMRIDataModule
from neurovision.data.store import Store


class _Recorder(L.LightningModule):
    def __init__(self, out: str) -> None:
        super().__init__()
        self.out = out
        self.lin = torch.nn.Linear(1, 1)
        self.seen: list[int] = []

    def training_step(self, batch, batch_idx):
        self.seen += batch["trial"].tolist()
        return self.lin(batch["patches"].mean((1, 2))[:, None]).pow(2).mean()

    def on_train_epoch_end(self) -> None:
        Path(self.out, f"rank{self.global_rank}.json").write_text(json.dumps(self.seen))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.slow
def test_ddp_ranks_see_disjoint_shards(tiny_store, tmp_path):
    dm = FMRIDataModule(store=str(tiny_store), batch_size=8, num_workers=0)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0,
                        default_root_dir=tmp_path)
    trainer.fit(_Recorder(str(tmp_path)), datamodule=dm)
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    n_train = int(Store(tiny_store).split_mask("train").sum())
    assert not set(r0) & set(r1)
    assert len(set(r0) | set(r1)) == n_train
    assert abs(len(r0) - len(r1)) <= 1
