"""Concept localisation after ``trainer.test``: GradCAM concept maps in each subject's space, scored and logged."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L

from neurovision.localization.maps import ModelParts, localize
from neurovision.localization.options import LocalizationOptions
from neurovision.pretrained.teachers import placed

_NEEDS = ("encoder", "clip_head", "clip_teacher")


class ConceptMaps(L.Callback):
    """At the end of each test run, localise concepts with the module's ``encoder``, ``clip_head`` and
    ``clip_teacher`` on the run's store (the task's data spec) (:func:`neurovision.localization.maps.localize`).

    Writes ``<out_dir>/<subject>/<concept>.nii.gz`` (+ ``.png``) and ``concept_r.csv``, and logs
    ``test/concepts/r_mean`` and ``test/concepts/<concept>/r`` (the mean over subjects of the Pearson r with
    the planted map inside the subject's ROI; only for stores with planted maps, i.e. the phantom).

    Args:
        options: how maps are made and scored (:class:`~neurovision.localization.options.LocalizationOptions`,
            the options of ``neurovision localize``; in YAML ``init_args: {options: {method: pattern}}``).
        out_dir: where the maps go (default: ``<trainer.log_dir>/concept_maps``).
        every_test: localise on every ``trainer.test``; False: only on the first.
        png: also write a glass-brain PNG per map.
    """

    def __init__(self, options: LocalizationOptions | None = None, out_dir: str | None = None,
                 every_test: bool = True, png: bool = True) -> None:
        self.options = options or LocalizationOptions()
        self.out_dir = out_dir
        self.every_test = every_test
        self.png = png
        self.runs = 0
        self.last: Any = None  # the last Localization (for inspection)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        missing = [a for a in _NEEDS if getattr(pl_module, a, None) is None]
        if missing:
            raise ValueError(f"callbacks.ConceptMaps needs a module with {', '.join(_NEEDS)}; "
                             f"{type(pl_module).__name__} lacks {', '.join(missing)}")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or (self.runs and not self.every_test):
            return
        # the store named by the task's data spec (the datamodule's, linked by the CLI); a module without one: the
        # datamodule's own
        store: Any
        if getattr(getattr(pl_module, "spec", None), "store", ""):
            store = getattr(pl_module, "data_store")  # noqa: B009  # BaseTask's (LightningModule does not declare it)
        else:
            store = getattr(getattr(trainer, "datamodule", None), "store", None)
        if store is None:
            raise ValueError("callbacks.ConceptMaps needs a neurovision store (the task's data spec or the datamodule)")
        root = trainer.log_dir or trainer.default_root_dir  # on every rank: a collective under DDP
        out = Path(self.out_dir) if self.out_dir else Path(root) / "concept_maps"
        spec = getattr(pl_module, "spec", None)
        parts = ModelParts(pl_module.encoder, pl_module.clip_head,  # type: ignore[arg-type]
                           getattr(spec, "patch_size", None), getattr(spec, "patch_coords", None),
                           name=type(pl_module).__name__, skip=getattr(pl_module, "skip", None))
        # the CLIP teacher on this rank's own device for the concept words, and back as it was afterwards
        with placed(pl_module.clip_teacher, pl_module.device) as clip:
            loc = localize([parts], store, clip, out if trainer.is_global_zero else None, device=pl_module.device,
                           png=self.png, progress=False, **self.options.localize_kwargs())
        self.runs += 1
        self.last = loc
        if not math.isnan(loc.r_mean):  # every rank computes the same values
            pl_module.log("test/concepts/r_mean", loc.r_mean, sync_dist=False, add_dataloader_idx=False)
            for c, r in loc.per_concept.items():
                pl_module.log(f"test/concepts/{c}/r", r, sync_dist=False, add_dataloader_idx=False)
