"""Stage 3 as a LightningModule: stage-1 predictions -> diffusion img2img at strength β -> image metrics.

``neurovision test -c experiments/stage3_reconstruct.yaml`` runs it (nothing is trained: ``fit`` refuses).
Each test batch holds evaluation items of one condition (trial-averaged or single-trial, from
:class:`data_modules.FMRIDataModule` with ``return_images: true``); the frozen stage-1 ViT3D predicts the
CLIP embedding and VAE latent of each item, :class:`~neurovision.pretrained.unclip.UnCLIPReconstructor`
turns them into an image, and at the end of the epoch :func:`neurovision.metrics.images.evaluate_images`
scores all reconstructions of a condition against their stimuli. Written into the run's log dir:
``test_scores_<cond>.json`` (scores + why a metric is unavailable), ``reconstructions_<cond>.npz``
(uint8 images, subject, stimulus), ``recon_grid_<cond>.png`` (stimulus | reconstruction) and the same grid
in TensorBoard.

Many β in one pass: ``model.init_args.beta: [0.0, 0.5, 0.93]`` (a list) runs the stage-1 model, the
conditioning, the prompt encoding and each item's noise once per batch and every β from them
(:meth:`~neurovision.pretrained.unclip.UnCLIPReconstructor.reconstruct_betas`); each β is scored and written on its
own: metrics ``test/<cond>/beta=<b>/<metric>``, files ``beta=<b>/test_scores_<cond>.json`` and
``beta=<b>/reconstructions_<cond>.npz`` (without the stimuli, which are written once as
``stimuli_<cond>.npz``); ``recon_grid_<cond>.png`` then has one column per β. A scalar β keeps the layout above.

Sharded over GPUs: ``neurovision test -c experiments/stage3_reconstruct.yaml --trainer.devices=8
--trainer.strategy=ddp`` gives each rank a slice of the items (Lightning's DistributedSampler); an item's noise
depends only on (seed, subject, stimulus), the best-of-N selector CLIP runs on the rank's own device (placed at
test start), and rank 0 gathers the images (:class:`~neurovision.metrics.images.ImageMetrics` with
:func:`~neurovision.metrics.items.gather_to_zero`; sorted by (subject, stimulus), DistributedSampler's padding
dropped), scores and writes them: the same files and numbers for any number of ranks, up to float rounding:
sharding changes an item's batch-mates, and batched kernels (and CPU thread counts) may round differently (at
most a grey level in an image; tests/test_stage3_ddp.py shows exact equality at batch size 1, one thread).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from neurovision.models.stage1 import check_stage1_spec, load_stage1
from neurovision.pretrained.teachers import OpenCLIPImageTeacher
from neurovision.pretrained.unclip import (
    UnCLIPReconstructor,
    check_beta,
    denoising_steps,
    image_grid,
    item_seed,
)
from neurovision.tasks.base import TORCH_DTYPES, BaseTask, DataSpec, adamw

PROMPT_SOURCES = ("none", "file")


def read_prompts(path: str | Path, prompt_type: str = "sd_prompt",
                 key: str = "model.init_args.prompts") -> dict[tuple[int, int, bool], str]:
    """Prompts from a stage-2 ``predictions.jsonl`` (``neurovision predict``): ``(subject, stimulus, averaged)``
    -> the generated text of rows whose ``type`` is ``prompt_type``."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{key}: prompts file not found: {p} (write it with `neurovision predict` of "
                                "stage 2 and data.init_args.eval_tasks=[sd_prompt])")
    out: dict[tuple[int, int, bool], str] = {}
    with open(p) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if row.get("type", prompt_type) != prompt_type:
                    continue
                text = row.get("prediction", row.get("generated"))
                if text is None:
                    raise KeyError("prediction")
                out[(int(row["subject"]), int(row["stimulus"]), int(row.get("trial", -1)) < 0)] = str(text)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{p}: line {n}: not a stage-2 prediction row ({e}); expected subject, stimulus, "
                                 f"trial, type and prediction fields") from e
    if not out:
        raise ValueError(f"{p}: no rows of type {prompt_type!r} ({key})")
    return out


class ReconstructionTask(BaseTask):
    """Stage 3 (Shen et al.): x̂ = D((1 − β)·ẑ_vae + β·σ | ẑ_clip, prompt), evaluated with image metrics.

    Args:
        data_spec: linked by the CLI (must match the stage-1 run's grid and patches).
        stage1: the stage-1 checkpoint (``AlignmentTask``; loaded with ``weights_only=True``).
        reconstructor: a local Stable unCLIP folder (or the tiny one of ``neurovision tiny unclip``).
        beta: noise strength β in [0, 1] (paper 0.93; 0 decodes the predicted latent, 1 ignores it), or a list of
            them: one pass per item for every β (see the module docstring; distinct values).
        steps: denoising steps of the full schedule (β runs ``int(steps·β)`` of them).
        guidance_scale: classifier-free guidance (> 1) against the empty prompt and a zero image embedding.
        noise_level: unCLIP noise augmentation of the predicted image embedding (0 = none).
        clip_norm: rescale predicted embeddings to this L2 norm; ``"meta"`` = the norm recorded in the
            reconstructor folder by the tiny trainer (used as predicted when the folder records none);
            ``null`` = as predicted.
        prompts: a stage-2 ``predictions.jsonl`` whose ``sd_prompt`` rows condition the text encoder (the
            LLM's reconstruction prompt); ``null`` = no prompt.
        prompt_type: the ``type`` of the rows to use from ``prompts``.
        seed: sampling seed; an item's noise depends only on (seed, subject, stimulus).
        num_candidates: images sampled per item; > 1 keeps the one whose ``clip_teacher`` embedding is closest
            (cosine) to the item's *predicted* CLIP embedding (MindEye's best-of-N; the stimulus is never
            used). Needs ``clip_teacher`` to be the stage-1 CLIP teacher (the predictions' space).
        clip_teacher: the CLIP whose image embeddings score the reconstructions (two-way identification);
            the paper used CLIP ViT-L/14.
        feature_weights: local weight files of the metric networks (``alexnet``, ``inception``,
            ``efficientnet``, ``swav``); a metric without one is reported unavailable.
        metric_size: PixCorr/SSIM resolution (425 for NSD; the demo uses the stimulus size).
        grid_items: items shown in the reconstruction grid.
        dtype: the diffusion components' dtype.
    """

    def __init__(
        self,
        data_spec: DataSpec | None = None,
        stage1: str = "",
        reconstructor: str = "",
        beta: float | list[float] = 0.93,
        steps: int = 25,
        guidance_scale: float = 1.0,
        noise_level: int = 0,
        clip_norm: float | Literal["meta"] | None = "meta",
        prompts: str | None = None,
        prompt_type: str = "sd_prompt",
        seed: int = 0,
        num_candidates: int = 1,
        clip_teacher: OpenCLIPImageTeacher | None = None,
        feature_weights: dict[str, str] | None = None,
        metric_size: int = 425,
        metric_batch_size: int = 32,
        grid_items: int = 8,
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        optimizer: OptimizerCallable = adamw,
        scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        if not stage1:
            raise ValueError("ReconstructionTask needs model.init_args.stage1 (a stage-1 checkpoint)")
        if not reconstructor:
            raise ValueError("ReconstructionTask needs model.init_args.reconstructor (a Stable unCLIP folder)")
        if not Path(stage1).is_file():  # before the prompts, the teacher and the diffusion model are read
            raise FileNotFoundError(f"{stage1}: stage-1 checkpoint does not exist (YAML key model.init_args.stage1)")
        self.stage1_path, self.reconstructor_path = str(stage1), str(reconstructor)
        self.multi_beta = isinstance(beta, (list, tuple))
        self.betas = [check_beta(b) for b in (beta if isinstance(beta, (list, tuple)) else [beta])]
        if not self.betas or len({f"{b:g}" for b in self.betas}) != len(self.betas):  # distinct names (beta=<b>/)
            raise ValueError(f"model.init_args.beta: expected a noise strength or a non-empty list of distinct ones, "
                             f"got {beta!r}")
        if steps < 1:
            raise ValueError(f"model.init_args.steps must be >= 1, got {steps}")
        for b in self.betas:
            if b > 0 and denoising_steps(b, steps) == 0:
                raise ValueError(f"model.init_args.beta: β = {b:g} runs int(steps·β) = 0 of model.init_args.steps = "
                                 f"{steps} denoising steps (use β = 0 or more steps)")
        self.steps, self.guidance_scale, self.noise_level = int(steps), float(guidance_scale), int(noise_level)
        self.clip_norm = clip_norm
        self.prompt_rows = read_prompts(prompts, prompt_type) if prompts else None
        self.sample_seed = int(seed)
        if int(num_candidates) < 1:
            raise ValueError(f"model.init_args.num_candidates must be >= 1, got {num_candidates}")
        self.num_candidates = int(num_candidates)
        if self.num_candidates > 1 and clip_teacher is None:
            raise ValueError("model.init_args.num_candidates > 1 needs model.init_args.clip_teacher (the stage-1 CLIP "
                             "teacher, whose space the predicted embeddings are in)")
        self.clip_teacher = clip_teacher
        self.feature_weights = dict(feature_weights or {})
        self.metric_size, self.metric_batch_size = int(metric_size), int(metric_batch_size)
        self.grid_items = int(grid_items)
        self.torch_dtype = TORCH_DTYPES[dtype]
        super().__init__(data_spec, optimizer, scheduler)
        self.drop_hparams("clip_teacher")

    def configure_models(self) -> None:
        parts = load_stage1(self.stage1_path)
        check_stage1_spec(parts.spec, self.spec, self.stage1_path)
        if parts.vae_head is None and min(self.betas) < 1:
            raise ValueError(f"{self.stage1_path}: field 'state_dict/vae_head.*': missing: the stage-1 run had no VAE "
                             f"stream, so only beta = 1 is possible (model.init_args.beta = {min(self.betas):g})")
        self.stage1 = parts.requires_grad_(False)
        self.subject_embedding = bool(parts.hparams.get("subject_embedding"))
        self.recon = UnCLIPReconstructor.from_pretrained(self.reconstructor_path, torch_dtype=self.torch_dtype)
        out_dim = parts.clip_head.out_features
        if out_dim != self.recon.clip_dim:
            raise ValueError(f"{self.reconstructor_path}: unet.projection_class_embeddings_input_dim / 2 = "
                             f"{self.recon.clip_dim}, but the stage-1 CLIP head predicts {out_dim}-d embeddings "
                             "(model.init_args.stage1 and model.init_args.reconstructor must share one CLIP space)")
        if parts.vae_head is not None:
            n = int(np.prod(self.recon.latent_shape))
            if parts.vae_head.out_features != n:
                raise ValueError(f"{self.reconstructor_path}: latents {self.recon.latent_shape} ({n} values) differ "
                                 f"from the stage-1 VAE head's {parts.vae_head.out_features} outputs")
        want = self.recon.meta.get("clip_teacher")
        have = (parts.teacher_ids or {}).get("clip")
        if want and have and want != have:
            raise ValueError(f"{self.reconstructor_path}: trained on CLIP teacher {want!r}, but the stage-1 run "
                             f"predicts {have!r} (model.init_args.reconstructor / model.init_args.stage1)")
        if self.num_candidates > 1 and self.clip_teacher is not None and have and self.clip_teacher.id != have:
            raise ValueError(f"model.init_args.clip_teacher: {self.clip_teacher.id!r} is not the stage-1 CLIP teacher "
                             f"{have!r} of {self.stage1_path}; best-of-N selection (model.init_args.num_candidates = "
                             f"{self.num_candidates}) compares images with the predicted embeddings in that space")

    def configure_metrics(self) -> None:
        """Per test condition (built at its first batch by :meth:`_build_metrics`): one
        :class:`~neurovision.metrics.images.ImageMetrics` per β, holding that β's reconstructions, the stimuli
        (the same CPU tensors for every β), the chosen candidates and the (subject, stimulus) keys."""

    def _build_metrics(self) -> dict[str, Any]:
        from neurovision.metrics.images import ImageMetrics
        from neurovision.metrics.items import gather_to_zero

        group = self._group() if self.trainer.world_size > 1 else None  # CPU tensors: gathered over gloo
        kw = {"weights": self.feature_weights, "size": self.metric_size, "batch_size": self.metric_batch_size}
        # gathered on rank 0 only (it alone scores and writes them): no other rank holds every rank's images
        return {str(j): ImageMetrics(kw, extra_fields=("candidate",), process_group=group, dist_sync_fn=gather_to_zero)
                for j in range(len(self.betas))}

    def on_test_start(self) -> None:
        super().on_test_start()
        if self.trainer.world_size > 1:
            self._group()  # a collective: every rank creates the gloo group before the first batch

    def configure_optimizers(self) -> Any:
        raise ValueError("ReconstructionTask trains nothing: run `neurovision test -c experiments/stage3_reconstruct.yaml`")

    # --------------------------------------------------------------------------------------------- steps
    def predict_latents(self, patches: torch.Tensor, subject: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self.stage1.encoder(patches, subject if self.subject_embedding else None)
        clip = self.stage1.predict_clip(out.cls, patches)
        vae = None
        if self.stage1.vae_head is not None:
            vae = self.stage1.vae_head(out.cls).view(-1, *self.recon.latent_shape)
        return clip, vae

    def _prompts(self, subject: torch.Tensor, stimulus: torch.Tensor, averaged: bool) -> list[str] | None:
        if self.prompt_rows is None:
            return None
        out = []
        for s, i in zip(subject.tolist(), stimulus.tolist(), strict=True):
            text = self.prompt_rows.get((s, i, averaged))  # never another condition's prompt
            if text is None:
                raise ValueError(f"model.init_args.prompts: no {('trial-averaged' if averaged else 'single-trial')} "
                                 f"prompt for subject {s}, stimulus {i} (predict stage 2 with the same "
                                 "data.init_args.eval_conditions and max_eval_items)")
            out.append(text)
        return out

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        if "image" not in batch:
            raise ValueError("ReconstructionTask needs the stimuli: set data.init_args.return_images: true")
        with torch.no_grad():
            clip, vae = self.predict_latents(batch["patches"], batch["subject"])  # once for every β
        averaged = bool((batch["trial"] < 0).all())
        seeds = [item_seed(self.sample_seed, s, i) for s, i in zip(batch["subject"].tolist(), batch["stimulus"].tolist(), strict=True)]
        selector = self.clip_teacher.encode if self.num_candidates > 1 and self.clip_teacher is not None else None
        per_beta = self.recon.reconstruct_betas(
            vae, clip, self.betas, prompts=self._prompts(batch["subject"], batch["stimulus"], averaged),
            seeds=seeds, steps=self.steps, guidance_scale=self.guidance_scale, noise_level=self.noise_level,
            clip_norm=self.clip_norm, num_candidates=self.num_candidates, selector=selector)
        metrics = self.condition_metrics(dataloader_idx, self._build_metrics)
        image, keys = batch["image"].cpu(), {"subject": batch["subject"].cpu(), "stimulus": batch["stimulus"].cpu()}
        for j, (imgs, choice) in enumerate(per_beta):  # uint8 on the CPU: β × items stay small
            metrics[str(j)].update(imgs.cpu(), image, candidate=choice.cpu(), **keys)

    def _group(self) -> Any:
        """The process group of the object collectives: gloo (CPU memory), also when the default one is NCCL."""
        import torch.distributed as dist

        if getattr(self, "_cpu_group", None) is None:
            self._cpu_group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
        return self._cpu_group

    def _broadcast(self, obj: Any) -> Any:
        if self.trainer.world_size <= 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self._group())
        return box[0]

    def _score(self, metric: Any, items: dict[str, torch.Tensor]) -> dict[str, Any]:
        device = self.trainer.strategy.root_device
        clip_kw: dict[str, Any] = {}
        if self.clip_teacher is not None:
            ready = getattr(self.clip_teacher, "ready", None)
            if callable(ready):
                ready()
            device = self.clip_teacher.device  # the metric CLIP runs where its weights are (the rank's device)
            pp = self.clip_teacher.preprocess_cfg
            clip_kw = {"clip_model": self.clip_teacher.model, "clip_mean": pp["mean"], "clip_std": pp["std"],
                       "clip_size": self.clip_teacher.image_size[0]}
        return metric.score(items, device=device, **clip_kw)

    def on_test_epoch_end(self) -> None:
        from neurovision.data.atomic import atomic_path, write_json

        log_dir = Path(self.trainer.log_dir) if self.trainer.log_dir else None
        zero = self.trainer.is_global_zero
        for _, cond, metrics in self.pop_condition_metrics(default=("average", "single")):
            stim: dict[str, torch.Tensor] | None = None
            cols: list[torch.Tensor] = []
            sel = None
            for j, beta in enumerate(self.betas):  # one β at a time: its images, then the next
                m = metrics.pop(str(j))
                # every rank's items on rank 0, sorted by (subject, stimulus), the samplers' padding dropped (a
                # collective; the other ranks get their own items back and drop them); scored and written on rank 0
                items = m.gather()
                m.reset()
                g = items if zero else None
                del items
                if g is not None and stim is None:
                    stim = {"image": g["target"], "subject": g["subject"], "stimulus": g["stimulus"]}
                scores = self._score(m, g) if g is not None else None
                scores = self._broadcast(scores)
                unavailable = scores.pop("unavailable", {})
                tag = f"test/{cond}/beta={beta:g}/" if self.multi_beta else f"test/{cond}/"
                for k, v in scores.items():
                    if v is not None:
                        self.log(tag + k, float(v), sync_dist=False)
                if not zero or log_dir is None or g is None or stim is None:
                    continue
                out = log_dir / f"beta={beta:g}" if self.multi_beta else log_dir
                out.mkdir(parents=True, exist_ok=True)
                write_json(out / f"test_scores_{cond}.json", {
                    "condition": cond, "beta": beta, "steps": self.steps, "guidance_scale": self.guidance_scale,
                    "prompts": self.prompt_rows is not None, "num_candidates": self.num_candidates,
                    "n_items": int(len(g["recon"])), "scores": scores, "unavailable": unavailable})
                arrays = {"images": g["recon"].numpy(), "subject": g["subject"].numpy(),
                          "stimulus": g["stimulus"].numpy(), "candidate": g["candidate"].numpy()}
                if not self.multi_beta:
                    arrays["stimuli"] = stim["image"].numpy()
                with atomic_path(out / f"reconstructions_{cond}.npz") as tmp, open(tmp, "wb") as f:
                    np.savez_compressed(f, **arrays)
                n = min(self.grid_items, len(g["recon"]))
                sel = torch.from_numpy(np.linspace(0, len(g["recon"]) - 1, n).round().astype(np.int64))
                cols.append(g["recon"][sel])
                del g
            if not zero or log_dir is None or stim is None or sel is None:
                continue
            if self.multi_beta:  # the stimuli once, not once per β
                with atomic_path(log_dir / f"stimuli_{cond}.npz") as tmp, open(tmp, "wb") as f:
                    np.savez_compressed(f, stimuli=stim["image"].numpy(), subject=stim["subject"].numpy(),
                                        stimulus=stim["stimulus"].numpy())
            labels = [f"β={b:g}" for b in self.betas]
            grid = image_grid([stim["image"][sel], *cols], ["stimulus", *labels], path=log_dir / f"recon_grid_{cond}.png",
                              title=f"{cond}: stimulus | reconstruction ({', '.join(labels)})")
            exp = getattr(self.logger, "experiment", None)
            if exp is not None and hasattr(exp, "add_image"):
                exp.add_image(f"test/{cond}/reconstructions", grid, global_step=self.global_step, dataformats="HWC")


__all__ = ["ReconstructionTask", "read_prompts"]
