"""Concept localisation after ``trainer.test``: GradCAM concept maps in each subject's space, scored and logged."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import lightning as L

from neurovision.localization.maps import ModelParts, localize
from neurovision.pretrained.teachers import placed

_NEEDS = ("encoder", "clip_head", "clip_teacher")


class ConceptMaps(L.Callback):
    """At the end of each test run, localise concepts with the module's ``encoder``, ``clip_head`` and
    ``clip_teacher`` on the run's store (the task's data spec) (:func:`neurovision.localization.maps.localize`).

    Writes ``<out_dir>/<subject>/<concept>.nii.gz`` (+ ``.png``) and ``concept_r.csv``, and logs
    ``test/concepts/r_mean`` and ``test/concepts/<concept>/r`` (the mean over subjects of the Pearson r with
    the planted map inside the subject's ROI; only for stores with planted maps, i.e. the phantom).

    Args:
        out_dir: where the maps go (default: ``<trainer.log_dir>/concept_maps``).
        concepts: concept words (default: the store's).
        every_test: localise on every ``trainer.test``; False: only on the first.
        split: the store split whose items are explained.
        method: ``gradcam`` or ``pattern`` (see :func:`neurovision.localization.maps.model_maps`).
        aggregate: ``present`` or ``contrast`` (see :func:`neurovision.localization.maps.aggregate`).
        upsample: ``trilinear`` or ``nearest`` patch -> voxel spreading.
        layer: GradCAM at the hidden states entering this encoder block (-1: the last block, the paper's
            penultimate layer; 0: the token embeddings), see :func:`neurovision.localization.maps.gradcam`.
        mask: where r is computed: ``roi`` or ``active``.
        target: the explained score: ``relative`` (the concept's CLIP similarity minus the mean similarity to
            the store's concepts) or ``similarity`` (the plain cosine), see
            :func:`neurovision.localization.maps.concept_directions`.
        prompt: text template of a concept.
        png: also write a glass-brain PNG per map.
        batch_size: items per GradCAM batch.
    """

    def __init__(
        self,
        out_dir: str | None = None,
        concepts: list[str] | None = None,
        every_test: bool = True,
        split: str = "test",
        method: Literal["gradcam", "pattern"] = "gradcam",
        aggregate: Literal["present", "contrast"] = "present",
        upsample: Literal["trilinear", "nearest"] = "trilinear",
        layer: int = -1,
        mask: Literal["roi", "active"] = "roi",
        target: Literal["relative", "similarity"] = "relative",
        prompt: str = "{}",
        png: bool = True,
        batch_size: int = 64,
    ) -> None:
        self.out_dir = out_dir
        self.concepts = concepts
        self.every_test = every_test
        self.split = split
        self.method = method
        self.aggregate = aggregate
        self.upsample = upsample
        self.layer = layer
        self.mask = mask
        self.target = target
        self.prompt = prompt
        self.png = png
        self.batch_size = batch_size
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
            loc = localize([parts], store, clip, out if trainer.is_global_zero else None,
                           concepts=self.concepts, split=self.split, method=self.method,
                           aggregate_mode=self.aggregate, upsample=self.upsample, layer=self.layer, mask=self.mask,
                           target=self.target, prompt=self.prompt, batch_size=self.batch_size, device=pl_module.device,
                           png=self.png, progress=False)
        self.runs += 1
        self.last = loc
        if not math.isnan(loc.r_mean):  # every rank computes the same values
            pl_module.log("test/concepts/r_mean", loc.r_mean, sync_dist=False, add_dataloader_idx=False)
            for c, r in loc.per_concept.items():
                pl_module.log(f"test/concepts/{c}/r", r, sync_dist=False, add_dataloader_idx=False)
