"""Stage 1 of Shen et al.: one ViT3D for all subjects, aligned to CLIP image embeddings and SD-VAE latents."""

from __future__ import annotations

import logging
import math
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.trainer.states import TrainerFn

from neurovision.metrics import ItemMean, ItemMetric, RetrievalTop1, TwoWayIdentification
from neurovision.models import ViT3D, VoxelReadout, with_readout
from neurovision.models.readout import principal_subspace
from neurovision.models.stage1 import MLPHead
from neurovision.pretrained.teachers import OpenCLIPImageTeacher, TeacherCache, VAETeacher
from neurovision.tasks.base import BaseTask, DataSpec, adamw

log = logging.getLogger(__name__)


def _in_batch(pred: torch.Tensor, target: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Prediction-target logits of a batch and its soft labels: items sharing a target (repeats, MixUp
    partners) are positives of each other."""
    p = F.normalize(pred.float(), dim=-1)
    t = F.normalize(target.float(), dim=-1)
    same = (t @ t.T) > 1 - 1e-6  # identical targets
    return p @ t.T / temperature, same.float() / same.float().sum(1, keepdim=True)


def info_nce(pred: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE between L2-normalised predictions and targets (in-batch negatives)."""
    logits, labels = _in_batch(pred, target, temperature)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def info_nce_bank(pred: torch.Tensor, target: torch.Tensor, row: torch.Tensor, bank: torch.Tensor,
                  temperature: float) -> torch.Tensor:
    """InfoNCE whose fMRI->image direction ranks each prediction against a whole bank of image embeddings.

    ``bank`` holds the (L2-normalised) embeddings of every training image and ``row`` the bank row of each
    item's own image: the negatives are all other training images, not only the few in the batch, so the
    rare near-duplicates (same shape and colour, another position) are seen as negatives at every step. The
    image->fMRI direction stays in-batch (the other images' fMRI predictions exist only for the batch).
    """
    logits, labels = _in_batch(pred, target, temperature)
    f2i = F.cross_entropy(F.normalize(pred.float(), dim=-1) @ bank.T / temperature, row)
    return 0.5 * (f2i + F.cross_entropy(logits.T, labels))


def soft_clip(pred: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    """SoftCLIP (MindEye): cross-entropy towards the target-target similarity distribution."""
    p = F.normalize(pred.float(), dim=-1)
    t = F.normalize(target.float(), dim=-1)
    soft = F.softmax(t @ t.T / temperature, dim=-1)
    logits = p @ t.T / temperature
    return 0.5 * (F.cross_entropy(logits, soft) + F.cross_entropy(logits.T, soft))


class _GroupMeans(torch.utils.data.Dataset):
    """The repeat-averaged pattern of each group of an :class:`~data_modules.fmri.FMRITrials`, flattened."""

    def __init__(self, train: Any) -> None:
        self.train = train

    def __len__(self) -> int:
        return len(self.train.groups)

    def __getitem__(self, g: int) -> torch.Tensor:
        return self.train.group_mean(g).flatten()


def _group_mean_chunks(train: Any, dim: int, workers: int = 0, values: int = 2**25) -> torch.utils.data.DataLoader:
    """The repeat-averaged patterns of ``train`` in chunks of about ``values`` values (128 MiB of float32), in
    group order: a re-iterable stream for :func:`~neurovision.models.readout.principal_subspace`, read by
    ``workers`` DataLoader processes."""
    return torch.utils.data.DataLoader(_GroupMeans(train), batch_size=max(1, min(1024, values // max(dim, 1))),
                                       shuffle=False, num_workers=workers)


class AlignmentTask(BaseTask):
    """ViT3D (CLS) -> two 2-layer MLP heads -> CLIP image embedding and VAE latent of the stimulus.

    Loss = MSE(clip) + ``alpha`` * MSE(vae) + ``contrastive_weight`` * (InfoNCE | SoftCLIP on the CLIP head).
    Teacher targets come from the teachers' cache (computed once per stimulus, see
    :class:`neurovision.pretrained.teachers.TeacherCache`) and are looked up by the batch's ``stimulus`` index.

    Validation/test log, per condition of the datamodule (``average``, ``single``), per subject and as the mean
    over subjects:
    ``retrieval_fmri2img`` and ``retrieval_img2fmri`` (top-1 among ``retrieval_candidates`` images,
    averaged over ``retrieval_draws`` random draws), ``identification`` (two-way, CLIP space) and
    ``vae_mse``.

    Args:
        data_spec: sizes the data decides (linked by the CLI).
        clip_teacher: the CLIP image teacher (``neurovision.pretrained.teachers.OpenCLIPImageTeacher``).
        vae_teacher: the VAE teacher (``neurovision.pretrained.teachers.VAETeacher``); None drops the VAE stream.
        dim: ViT3D width (paper 768).
        depth: ViT3D layers (paper 16).
        heads: attention heads.
        mlp_ratio: transformer MLP width / dim.
        dropout: dropout in the transformer.
        drop_path: stochastic depth (linearly increasing over the blocks).
        head_hidden: hidden width of the two MLP heads (paper 1024).
        alpha: weight of the VAE-latent MSE (paper 1/64).
        contrastive: the optional contrastive term on the CLIP head.
        contrastive_weight: its weight (0 = the paper's pure regression).
        temperature: contrastive temperature.
        negatives: negatives of the InfoNCE term's fMRI->image direction: ``batch`` (the other images of the
            batch) or ``train`` (every training image: the cached targets make this one matrix product).
        subject_embedding: add a learned subject embedding (off = one model, no subject-specific parts).
        linear_skip: add a linear read-out of all active voxels to the CLIP head's output (a ridge-like path
            beside the transformer, zero-initialised; MindEye pairs a linear layer with its MLP likewise).
        linear_skip_dropout: dropout on the input of the linear path (voxels, or components with a rank).
        linear_skip_rank: read the top-k principal components of the repeat-averaged training patterns
            instead of every voxel (None = full rank): fitted once, by global rank 0 at the start of ``fit``
            (streamed, bounded memory; broadcast to the other ranks), stored in the checkpoint, so a resumed
            fit and ``validate/test/predict --ckpt_path`` restore it instead of refitting.
        gradient_checkpointing: recompute activations in the backward pass (memory for compute).
        retrieval_candidates: candidate-set size of the retrieval metric (paper: 300).
        retrieval_draws: random candidate sets averaged in the retrieval metric.
        shuffle_targets: control run: train on the targets of other training images (a fixed derangement of
            the training stimuli, seed 0); evaluation uses the true targets, so its metrics should sit at chance.
        cache_dtype: dtype of the cached teacher targets.
        optimizer: optimiser factory (paper: AdamW, lr 5e-4).
        scheduler: learning-rate scheduler factory.
    """

    # fixed by training (see BaseTask)
    IMMUTABLE_HPARAMS: ClassVar[tuple[str, ...]] = ("dim", "depth", "heads", "mlp_ratio", "head_hidden",
                                                    "subject_embedding", "linear_skip", "linear_skip_rank")
    # buffers (register_buffer in configure_models), typed here for the checker
    clip_targets: torch.Tensor
    vae_targets: torch.Tensor
    train_target_index: torch.Tensor
    bank_row: torch.Tensor
    bank: torch.Tensor

    def __init__(
        self,
        data_spec: DataSpec | None = None,
        clip_teacher: OpenCLIPImageTeacher | None = None,
        vae_teacher: VAETeacher | None = None,
        dim: int = 768,
        depth: int = 16,
        heads: int = 12,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        drop_path: float = 0.1,
        head_hidden: int = 1024,
        alpha: float = 1 / 64,
        contrastive: Literal["none", "infonce", "softclip"] = "none",
        contrastive_weight: float = 0.0,
        temperature: float = 0.05,
        negatives: Literal["batch", "train"] = "batch",
        subject_embedding: bool = False,
        linear_skip: bool = False,
        linear_skip_dropout: float = 0.5,
        linear_skip_rank: int | None = None,
        gradient_checkpointing: bool = False,
        retrieval_candidates: int = 300,
        retrieval_draws: int = 30,
        shuffle_targets: bool = False,
        cache_dtype: Literal["float32", "float16"] = "float32",
        optimizer: OptimizerCallable = adamw,
        scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        if clip_teacher is None:
            raise ValueError("AlignmentTask needs model.init_args.clip_teacher (e.g. OpenCLIPImageTeacher)")
        self.clip_teacher = clip_teacher
        self.vae_teacher = vae_teacher
        self.dim, self.depth, self.heads, self.mlp_ratio = dim, depth, heads, mlp_ratio
        self.dropout, self.drop_path, self.head_hidden = dropout, drop_path, head_hidden
        self.alpha = alpha
        self.contrastive = contrastive
        self.contrastive_weight = contrastive_weight
        self.temperature = temperature
        if negatives not in ("batch", "train"):
            raise ValueError(f"model.init_args.negatives must be 'batch' or 'train', got {negatives!r}")
        if negatives == "train" and contrastive != "infonce":
            raise ValueError("model.init_args.negatives='train' needs contrastive='infonce', "
                             f"got contrastive={contrastive!r}")
        self.negatives = negatives
        self.subject_embedding = subject_embedding
        self.linear_skip, self.linear_skip_dropout = linear_skip, linear_skip_dropout
        if linear_skip_rank is not None and not linear_skip:
            raise ValueError("model.init_args.linear_skip_rank needs model.init_args.linear_skip=true")
        self.linear_skip_rank = linear_skip_rank
        self.gradient_checkpointing = gradient_checkpointing
        self.retrieval_candidates = retrieval_candidates
        self.retrieval_draws = retrieval_draws
        self.shuffle_targets = shuffle_targets
        self.cache_dtype = cache_dtype
        super().__init__(data_spec, optimizer, scheduler)
        # hparams hold init args only (LightningCLI re-parses them on --ckpt_path); teachers are objects
        self.drop_hparams("clip_teacher", "vae_teacher")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["teacher_ids"] = {
            "clip": self.clip_teacher.id, "vae": None if self.vae_teacher is None else self.vae_teacher.id}

    # hooks ------------------------------------------------------------------------------------------
    def configure_models(self) -> None:
        spec = self.spec
        self.encoder = ViT3D(
            patch_dim=spec.patch_dim, patch_coords=spec.patch_coords, dim=self.dim, depth=self.depth,
            heads=self.heads, mlp_ratio=self.mlp_ratio, dropout=self.dropout, drop_path=self.drop_path,
            num_subjects=spec.num_subjects if self.subject_embedding else 0,
            gradient_checkpointing=self.gradient_checkpointing,
        )
        self.clip_dim = int(self.clip_teacher.dim)
        self.clip_head = MLPHead(self.dim, self.head_hidden, self.clip_dim)
        self.skip = None
        if self.linear_skip:
            self.skip = VoxelReadout(spec.num_active_patches * spec.patch_dim, self.clip_dim,
                                     rank=self.linear_skip_rank, dropout=self.linear_skip_dropout)
        if self.vae_teacher is not None:
            self.latent_shape = tuple(int(s) for s in self.vae_teacher.latent_shape)
            self.vae_head = MLPHead(self.dim, self.head_hidden, math.prod(self.latent_shape))
        self.register_buffer("clip_targets", torch.empty(0), persistent=False)
        self.register_buffer("vae_targets", torch.empty(0), persistent=False)
        self.register_buffer("train_target_index", torch.empty(0, dtype=torch.long), persistent=False)
        self.register_buffer("bank_row", torch.empty(0, dtype=torch.long), persistent=False)
        self.register_buffer("bank", torch.empty(0), persistent=False)

    def configure_losses(self) -> None:
        self.contrastive_fn = {"infonce": info_nce, "softclip": soft_clip}.get(self.contrastive)

    def configure_metrics(self) -> None:
        """Per evaluation condition (built at its first batch by :meth:`_build_metrics`): retrieval, two-way
        identification, CLIP cosine and VAE MSE per subject, over every rank's items (de-padded)."""

    def _build_metrics(self) -> dict[str, ItemMetric]:
        kw: dict[str, Any] = {"by_subject": True, "min_items": 2}  # < 2 items: no retrieval / identification
        metrics: dict[str, ItemMetric] = {
            "retrieval": RetrievalTop1(self.retrieval_candidates, self.retrieval_draws, **kw),
            "identification": TwoWayIdentification(**kw),
            "clip_cosine": ItemMean(**kw),
        }
        if self.vae_teacher is not None:
            metrics["vae_mse"] = ItemMean(**kw)
        return {k: m.to(self.device) for k, m in metrics.items()}

    # targets ----------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if self.clip_targets.numel():
            return
        store = self.data_store  # the spec's store path (data.init_args.store)
        # on the rank's own device (back to the CPU after); under DDP every rank calls get() and encodes its
        # shard of a missing entry (TeacherCache.get: rank 0 gathers and writes, all ranks then read it)
        cache = TeacherCache(dtype=self.cache_dtype, device=self.teacher_device)
        self.clip_targets = torch.from_numpy(np.asarray(cache.get(store, self.clip_teacher))).float()
        if self.vae_teacher is not None:
            self.vae_targets = torch.from_numpy(np.asarray(cache.get(store, self.vae_teacher))).float()
        index = torch.arange(len(self.clip_targets))
        if self.shuffle_targets:
            train = np.unique(store.trials["stimulus"][store.split_mask("train")])
            order = train[np.random.default_rng(0).permutation(len(train))]
            index[order] = torch.from_numpy(np.roll(order, 1)).long()  # a derangement: no image keeps its own target
        self.train_target_index = index
        if self.negatives == "train":
            # the bank: every training image of the trained subjects (the datamodule's training trials: the
            # train split of the spec's training subjects; every subject when the spec names none)
            keep = store.split_mask("train") & np.isin(store.trials["subject"], self._train_subjects(store))
            trials = np.flatnonzero(keep)
            stimuli = torch.from_numpy(np.unique(store.trials["stimulus"][np.asarray(trials)])).long()
            self.bank_row = torch.full((len(self.clip_targets),), -1, dtype=torch.long)
            self.bank_row[stimuli] = torch.arange(len(stimuli))
            self.bank = F.normalize(self.clip_targets[stimuli], dim=-1)
        # buffers: the strategy moves them to the device with the module, after the setup hooks. The read-out's
        # subspace is not fitted here: setup() runs before a checkpoint is restored (see _ensure_readout)

    # the read-out's subspace -----------------------------------------------------------------------
    def on_fit_start(self) -> None:
        # Lightning's order (trainer._run): setup -> configure_model -> checkpoint weights restored (resume) ->
        # strategy.setup (module on the rank's device) -> on_fit_start -> sanity check -> on_train_start. Strategies
        # that restore the checkpoint after on_fit_start (FSDP, DeepSpeed) fit at the first validation/train start
        if not self.trainer.strategy.restore_checkpoint_after_setup:
            self._ensure_readout()

    def on_validation_start(self) -> None:
        self._ensure_readout()

    def on_train_start(self) -> None:
        self._ensure_readout()

    def _ensure_readout(self) -> None:
        """Fit the read-out's principal subspace if ``fit`` is running and no checkpoint restored one: after the
        restore, so a resumed fit never refits; ``validate/test/predict`` never fit (their checkpoint has it)."""
        if self.skip is None or not self.skip.needs_fit or self.trainer.state.fn != TrainerFn.FITTING:
            return
        from data_modules.fmri import FMRITrials

        # the datamodule's training trials, from the spec: the store's train split of the training subjects
        store = self.data_store
        self._fit_readout(FMRITrials(store, "train", self._train_subjects(store), "trials", seed=self.spec.seed),
                          self.spec.num_workers)

    def _train_subjects(self, store: Any) -> list[int]:
        """The datamodule's training subjects (indices), from the spec: every subject when it names none."""
        return list(self.spec.train_subjects) or [int(s.index) for s in store.subjects]

    def _fit_readout(self, train: Any, workers: int = 0) -> None:
        """Fit the read-out's principal subspace to the repeat-averaged pattern of every training (subject,
        stimulus), read in chunks through ``train.group_mean`` by ``workers`` DataLoader processes
        (:func:`principal_subspace`: bounded memory, exact for small inputs, randomised for large ones).

        Only global rank 0 reads the patterns and fits, on its device; the other ranks receive the mean and
        basis by ``trainer.strategy.broadcast`` (an error on rank 0 is broadcast too, so no rank waits for ever).
        """
        skip = self.skip
        if skip is None or skip.rank is None:
            raise ValueError("AlignmentTask: no read-out subspace to fit (model.init_args.linear_skip_rank is unset)")
        trainer = self._trainer
        rank0 = trainer is None or trainer.global_rank == 0
        distributed = trainer is not None and trainer.world_size > 1
        result: Any = None
        if rank0:
            try:
                sub = principal_subspace(
                    _group_mean_chunks(train, skip.in_dim, workers), skip.rank, n=len(train.groups),
                    dim=skip.in_dim, seed=int(getattr(train, "seed", 0)), device=self.device, progress=True,
                    desc="read-out subspace", where="AlignmentTask read-out fit (model.init_args.linear_skip_rank)")
                result = (sub.mean.cpu(), sub.basis.cpu(), sub.ratio.cpu(), sub.n, sub.exact)
            except Exception as e:
                if not distributed:
                    raise
                result = e
        if distributed and trainer is not None:
            result = trainer.strategy.broadcast(result, src=0)
        if isinstance(result, BaseException):
            raise result
        mean, basis, ratio, n, exact = result
        skip.set_subspace(mean, basis)
        if rank0:
            log.info("read-out: %s principal components of %s repeat-averaged training patterns explain %.1f%% of "
                     "their variance (%s fit)", skip.rank, n, 100 * ratio.sum().item(),
                     "exact" if exact else "randomised")

    # forward ----------------------------------------------------------------------------------------
    def forward(self, patches: torch.Tensor, subject: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        out = self.encoder(patches, subject if self.subject_embedding else None)
        pred = {"clip": with_readout(self.clip_head(out.cls), self.skip, patches)}
        if self.vae_teacher is not None:
            pred["vae"] = self.vae_head(out.cls).view(-1, *self.latent_shape)
        return pred

    def _targets(self, stimulus: torch.Tensor) -> dict[str, torch.Tensor]:
        t = {"clip": self.clip_targets[stimulus]}
        if self.vae_teacher is not None:
            t["vae"] = self.vae_targets[stimulus]
        return t

    def _losses(self, pred: dict[str, torch.Tensor], tgt: dict[str, torch.Tensor],
                stimulus: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The loss terms; ``stimulus`` (the targets' images) switches on the bank negatives in training."""
        losses = {"mse_clip": F.mse_loss(pred["clip"].float(), tgt["clip"])}
        total = losses["mse_clip"]
        if "vae" in pred:
            losses["mse_vae"] = F.mse_loss(pred["vae"].float(), tgt["vae"])
            total = total + self.alpha * losses["mse_vae"]
        if self.contrastive_fn is not None and self.contrastive_weight > 0:
            if stimulus is not None and self.negatives == "train":
                losses["contrastive"] = info_nce_bank(pred["clip"], tgt["clip"], self.bank_row[stimulus],
                                                      self.bank, self.temperature)
            else:
                losses["contrastive"] = self.contrastive_fn(pred["clip"], tgt["clip"], self.temperature)
            total = total + self.contrastive_weight * losses["contrastive"]
        losses["loss"] = total
        return losses

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        pred = self(batch["patches"], batch["subject"])
        target_stimulus = self.train_target_index[batch["stimulus"]]
        losses = self._losses(pred, self._targets(target_stimulus), target_stimulus)
        n = len(batch["patches"])
        for k, v in losses.items():
            self.log(f"train/{k}", v, prog_bar=k == "loss", batch_size=n)
        return losses["loss"]

    # evaluation -------------------------------------------------------------------------------------
    def _eval_step(self, split: str, batch: dict[str, Any], dataloader_idx: int) -> None:
        pred = self(batch["patches"], batch["subject"])
        losses = self._losses(pred, self._targets(batch["stimulus"]))
        self.log(f"{split}/{self.condition(dataloader_idx)}/loss", losses["loss"], batch_size=len(pred["clip"]),
                 add_dataloader_idx=False, sync_dist=True)
        metrics = self.condition_metrics(dataloader_idx, self._build_metrics)
        keys = {"subject": batch["subject"], "stimulus": batch["stimulus"]}
        clip, tgt = pred["clip"].detach().float(), self.clip_targets[batch["stimulus"]]
        metrics["retrieval"].update(clip, tgt, **keys)
        metrics["identification"].update(clip, tgt, **keys)
        metrics["clip_cosine"].update(F.cosine_similarity(clip, tgt, dim=1), **keys)
        if "vae_mse" in metrics:
            vae = pred["vae"].detach().float()
            err = F.mse_loss(vae, self.vae_targets[batch["stimulus"]], reduction="none").flatten(1).mean(1)
            metrics["vae_mse"].update(err, **keys)

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("val", batch, dataloader_idx)

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("test", batch, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def _eval_epoch_end(self, split: str) -> None:
        names = self.spec.subject_names
        for _, cond, metrics in self.pop_condition_metrics():
            # every rank's items (the samplers' padding dropped), per subject (each image once per candidate set),
            # then the mean over subjects: pooling subjects would put the same image (identical targets) several
            # times in one candidate set
            values = {k: m.compute() for k, m in metrics.items()}  # on every rank: a collective under DDP
            per_subject: list[dict[str, float]] = []
            for s, r in values["retrieval"].items():
                m = {"retrieval_fmri2img": r["fmri2img"], "retrieval_img2fmri": r["img2fmri"],
                     "retrieval_chance": 1.0 / r["candidates"], "identification": values["identification"][s],
                     "clip_cosine": values["clip_cosine"][s]}
                if "vae_mse" in values:
                    m["vae_mse"] = values["vae_mse"][s]
                per_subject.append(m)
                name = names[s] if names else f"s{s}"
                for k, v in m.items():
                    self.log(f"{split}/{cond}/{name}/{k}", v, sync_dist=False)  # same value on every rank
            for k in per_subject[0] if per_subject else []:
                self.log(f"{split}/{cond}/{k}", float(np.mean([d[k] for d in per_subject])), sync_dist=False)

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        pred = self(batch["patches"], batch["subject"])
        return {"stimulus": batch["stimulus"], "subject": batch["subject"], **pred}
