"""A linear baseline: fMRI active patches -> a small colour thumbnail of the stimulus."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from neurovision.metrics.correlation import pearson_r
from neurovision.tasks.base import BaseTask, DataSpec, adamw


def thumbnails(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float (B, 3*size*size) RGB in [0, 1] (colour matters: on the phantom's grey
    background, red, green and blue objects are nearly invisible in grayscale)."""
    return F.adaptive_avg_pool2d(images.float() / 255.0, size).flatten(1)


def pixel_correlation(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample Pearson r between flattened prediction and target, (B,) (0 for a constant row)."""
    return pearson_r(pred.flatten(1), target.flatten(1), dim=1)


class LinearDecoder(BaseTask):
    """Linear decoding of stimulus thumbnails: the sanity baseline of a new store.

    Needs ``data.init_args.return_images: true``. Logs ``{split}/{condition}/pixcorr`` (mean per-image
    Pearson r) and ``.../identification`` (two-way identification among the batch's images).

    Args:
        thumbnail: side of the RGB thumbnail that is predicted.
        optimizer: optimiser factory; regularise with its (decoupled) weight decay.
        scheduler: optional learning-rate scheduler factory.
    """

    IMMUTABLE_HPARAMS: ClassVar[tuple[str, ...]] = ("thumbnail",)  # fixed by training (see BaseTask)

    def __init__(
        self,
        data_spec: DataSpec | None = None,
        thumbnail: int = 8,
        optimizer: OptimizerCallable = adamw,
        scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        self.thumbnail = thumbnail
        super().__init__(data_spec, optimizer, scheduler)

    def configure_models(self) -> None:
        self.decoder = nn.Linear(self.spec.num_active_patches * self.spec.patch_dim, 3 * self.thumbnail**2)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.decoder(patches.flatten(1))

    def _step(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if "image" not in batch:
            raise ValueError("LinearDecoder needs images: set data.init_args.return_images: true")
        target = thumbnails(batch["image"], self.thumbnail)
        pred = self(batch["patches"])
        loss = F.mse_loss(pred, target)
        return loss, pred, target

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss, _, _ = self._step(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["patches"]))
        return loss

    def _eval(self, split: str, batch: dict[str, Any], dataloader_idx: int) -> None:
        loss, pred, target = self._step(batch)
        name = f"{split}/{self.condition(dataloader_idx)}"
        r = pixel_correlation(pred, target)
        # two-way identification: is corr(pred_i, target_i) > corr(pred_i, target_j), over all j != i
        c = pearson_r(pred[:, None], target[None], dim=-1)  # c[i, j] = r(pred_i, target_j)
        ident = (c.diag()[:, None] > c).float().sum(1) / max(len(pred) - 1, 1)
        n = len(pred)
        self.log(f"{name}/loss", loss, batch_size=n, add_dataloader_idx=False)
        self.log(f"{name}/pixcorr", r.mean(), prog_bar=True, batch_size=n, add_dataloader_idx=False)
        self.log(f"{name}/identification", ident.mean(), batch_size=n, add_dataloader_idx=False)

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval("val", batch, dataloader_idx)

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval("test", batch, dataloader_idx)

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        return {"stimulus": batch["stimulus"], "subject": batch["subject"], "thumbnail": self(batch["patches"])}
