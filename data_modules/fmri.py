"""Stream fMRI trials (active patches) from a neurovision store."""

from __future__ import annotations

from collections.abc import Iterator, Sized
from pathlib import Path
from typing import Any, Literal, cast

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from neurovision.data.spec import DataSpec
from neurovision.data.store import SPLITS, Store

Condition = Literal["average", "single"]


def evenly_spaced(n: int, k: int | None) -> np.ndarray:
    """Indices of ``k`` evenly spaced items among ``n`` (all when ``k`` is None or >= n): the evaluation subsets
    of stage 2 and stage 3 pick the same (subject, image) items for the same ``k``."""
    if k is None or k >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, max(int(k), 1)).round().astype(np.int64))


class FMRITrials(Dataset):
    """Items of one split of a store: single trials (training) or evaluation items per (subject, stimulus).

    ``mode="trials"``: every trial is an item; with ``mixup_prob > 0`` a trial is mixed with a random other
    repeat of the same image for the same subject (λ ~ Beta(α, α)), the paper's MixUp between repeats.
    ``mode="average"``: one item per (subject, stimulus), the mean of all its repeats.
    ``mode="single"``: one item per (subject, stimulus), its first repeat only.
    """

    def __init__(
        self,
        store: Store,
        split: str,
        subjects: list[int],
        mode: Literal["trials", "average", "single"] = "trials",
        mixup_prob: float = 0.0,
        mixup_alpha: float = 1.0,
        return_images: bool = False,
        seed: int = 0,
        max_items: int | None = None,
    ) -> None:
        self.store = store
        self.seed = seed
        self.mode = mode
        self.mixup_prob = mixup_prob
        self.mixup_alpha = mixup_alpha
        self.return_images = return_images
        t = store.trials
        keep = store.split_mask(split) & np.isin(t["subject"], subjects)
        idx = np.nonzero(keep)[0]
        key = t["subject"][idx].astype(np.int64) * (int(t["stimulus"].max()) + 1) + t["stimulus"][idx]
        order = np.lexsort((t["repeat"][idx], key))  # group by (subject, stimulus), repeats in order
        idx, key = idx[order], key[order]
        starts = np.r_[0, np.nonzero(np.diff(key))[0] + 1]
        self.groups = np.split(idx, starts[1:]) if len(idx) else []  # trial indices of each (subj, stim)
        self.group_of_trial = {int(i): g for g, grp in enumerate(self.groups) for i in grp}
        self.items = idx if mode == "trials" else np.array([g[0] for g in self.groups], dtype=np.int64)
        if mode != "trials":  # evenly spaced over the (subject, stimulus)-sorted items: every subject keeps its share
            self.items = self.items[evenly_spaced(len(self.items), max_items)]

    def __len__(self) -> int:
        return len(self.items)

    def _load(self, trial: int) -> torch.Tensor:
        # torch converts float16 -> float32 ~10x faster than numpy's astype
        return torch.from_numpy(self.store.patches(trial)).float()

    def group_mean(self, g: int) -> torch.Tensor:
        """The mean over repeats of group ``g`` (one subject's trials of one stimulus)."""
        return torch.stack([self._load(int(j)) for j in self.groups[g]]).mean(0)

    def __getitem__(self, i: int | tuple[int, int]) -> dict[str, Any]:
        # (index, epoch) from EpochSampler: MixUp draws are a function of (seed, epoch, index), so a run
        # resumed from a checkpoint, or split over DDP ranks or workers, draws exactly the same mixes
        i, epoch = (int(i[0]), int(i[1])) if isinstance(i, tuple) else (int(i), 0)
        trial = int(self.items[i])
        t = self.store.trials
        if self.mode == "average":
            g = self.group_of_trial[trial]
            x = self.group_mean(g)
            n_rep = len(self.groups[g])
        else:
            x = self._load(trial)
            n_rep = 1
            if self.mode == "trials" and self.mixup_prob > 0:
                grp = self.groups[self.group_of_trial[trial]]
                others = grp[grp != trial]
                rng = np.random.default_rng((self.seed, epoch, i))
                if len(others) and rng.random() < self.mixup_prob:
                    other = int(others[rng.integers(len(others))])
                    lam = float(rng.beta(self.mixup_alpha, self.mixup_alpha))
                    x = lam * x + (1 - lam) * self._load(other)
        item: dict[str, Any] = {
            "patches": x,
            "subject": int(t["subject"][trial]),
            "stimulus": int(t["stimulus"][trial]),
            "trial": trial if self.mode != "average" else -1,
            "n_repeats": n_rep,
        }
        if self.return_images:
            img = self.store.image(int(t["stimulus"][trial]))
            item["image"] = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)  # uint8 (3, H, W)
        return item


class EpochSampler(DistributedSampler):
    """Yields ``(index, epoch)``: a permutation seeded by (seed, epoch), or the plain order; sharded over DDP.

    Lightning calls :meth:`set_epoch` before every epoch (also after resuming from a checkpoint), so the order
    and the MixUp draws of epoch k are the same whether or not the run was interrupted. Under DDP rank r takes
    items r, r + W, r + 2W, ... of that order (padded to equal length), so one step over W ranks with batch
    b sees exactly the items one process with batch W*b sees. It is a ``DistributedSampler``, so Lightning
    keeps it instead of wrapping it.
    """

    def __init__(self, n: int, shuffle: bool = True, seed: int = 0) -> None:
        super().__init__(range(n), num_replicas=1, rank=0, shuffle=shuffle, seed=seed)  # type: ignore[arg-type]
        self.n = n

    @staticmethod
    def _world() -> tuple[int, int]:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size(), dist.get_rank()
        return 1, 0

    def __len__(self) -> int:
        world, _ = self._world()
        return -(-self.n // world)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        world, rank = self._world()
        per_rank = -(-self.n // world)
        order = (order * (1 + world))[: per_rank * world] if order else order
        return iter([(i, self.epoch) for i in order[rank::world]])


class StoreDataModule(L.LightningDataModule):
    """Base class of the datamodules that read a neurovision store; holds what the data decides.

    ``store`` is opened lazily (``setup``) and only its header is read when the CLI links ``spec`` (sizes the
    data decides) into the model.
    """

    def __init__(self, store: str | Path) -> None:
        super().__init__()
        self.store_path = Path(store)
        self._store: Store | None = None

    @property
    def store(self) -> Store:
        if self._store is None:
            if not self.store_path.exists():
                raise FileNotFoundError(
                    f"{self.store_path}: store file does not exist (YAML key data.init_args.store); "
                    f"create it with `neurovision prepare <source> --out {self.store_path}`")
            self._store = Store(self.store_path)
        return self._store

    def prepare_data(self) -> None:
        _ = self.store  # validates the file; one clear error if missing or foreign

    # values the data decides (for LightningCLI.link_arguments, apply_on="instantiate") ----------------
    @property
    def spec(self) -> DataSpec:
        """Everything a task reads from the data (linked to ``model.init_args.data_spec``): the sizes, the
        subject names, the evaluation conditions (one val/test dataloader each), the store's path, the training
        subjects, the data seed and the worker count."""
        g = self.store.grid
        return DataSpec(
            num_active_patches=g.n_active, patch_size=g.patch_size, grid_shape=g.shape,
            patch_coords=tuple(tuple(int(v) for v in c) for c in g.active_coords),  # type: ignore[misc]
            num_subjects=len(self.store.subjects), image_shape=self.store.image_shape,
            subject_names=tuple(str(n) for n in self.store.subject_names),
            eval_conditions=tuple(str(c) for c in getattr(self, "eval_conditions", ())),
            store=str(self.store_path),
            train_subjects=tuple(self._subject_indices(getattr(self, "subjects", None), "data.init_args.subjects")),
            seed=int(getattr(self, "seed", 0)), num_workers=int(getattr(self, "num_workers", 0) or 0),
        )

    def _subject_indices(self, names: list[str] | None, key: str) -> list[int]:
        if names is None:
            return [s.index for s in self.store.subjects]
        out = []
        for n in names:
            match = [s.index for s in self.store.subjects if s.name == n]
            if not match:
                raise ValueError(f"{self.store_path}: field 'subjects': no subject {n!r} (YAML key {key}); "
                                 f"available: {self.store.subject_names}")
            out.append(match[0])
        return out


class FMRIDataModule(StoreDataModule):
    """fMRI trials from a store: train on single trials (optional MixUp), evaluate per image.

    Validation and test return one dataloader per entry of ``eval_conditions``: ``average`` (the mean over
    an image's repeats, the paper's main condition) and/or ``single`` (its first repeat only). ``predict``
    uses the test split with the first condition.

    Args:
        store: path of the store file (``neurovision prepare``).
        subjects: subjects to train on (names such as ``sub-01``); all when omitted.
        eval_subjects: subjects to validate/test on; ``subjects`` when omitted. Naming a subject left out of
            ``subjects`` evaluates it zero-shot.
        batch_size: items per batch.
        num_workers: DataLoader worker processes (each opens its own file handle).
        eval_conditions: evaluation conditions, one val/test dataloader each.
        mixup_prob: probability of mixing a training trial with another repeat of the same image.
        mixup_alpha: Beta(α, α) parameter of the MixUp weight.
        return_images: also return the stimulus image (uint8, channels first).
        pin_memory: pin host memory (for GPU training).
        shuffle: shuffle the training trials (a permutation seeded by ``seed`` and the epoch).
        seed: seed of the training order and of the MixUp draws.
        max_eval_items: evaluate N evenly spaced (subject, image) items per condition (None: all), e.g. for
            the costly stage-3 diffusion on a CPU.
    """

    def __init__(
        self,
        store: str | Path,
        subjects: list[str] | None = None,
        eval_subjects: list[str] | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
        eval_conditions: list[Condition] | None = None,
        mixup_prob: float = 0.0,
        mixup_alpha: float = 1.0,
        return_images: bool = False,
        pin_memory: bool = False,
        shuffle: bool = True,
        seed: int = 0,
        max_eval_items: int | None = None,
    ) -> None:
        super().__init__(store)
        self.save_hyperparameters()
        self.subjects = subjects
        self.eval_subjects = eval_subjects
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"data.init_args.batch_size: {batch_size!r}: must be an integer >= 1")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.eval_conditions: list[Condition] = list(eval_conditions or ["average", "single"])
        if not self.eval_conditions or any(c not in ("average", "single") for c in self.eval_conditions):
            raise ValueError(f"eval_conditions must be a non-empty list of 'average'/'single', "
                             f"got {eval_conditions}")
        if not 0 <= mixup_prob <= 1:
            raise ValueError(f"mixup_prob must be in [0, 1], got {mixup_prob}")
        self.mixup_prob = mixup_prob
        self.mixup_alpha = mixup_alpha
        self.return_images = return_images
        self.pin_memory = pin_memory
        self.shuffle = shuffle
        self.seed = seed
        if max_eval_items is not None and max_eval_items < 1:
            raise ValueError(f"data.init_args.max_eval_items must be >= 1 or null, got {max_eval_items}")
        self.max_eval_items = max_eval_items
        self.datasets: dict[str, Any] = {}

    def setup(self, stage: str | None = None) -> None:
        train_s = self._subject_indices(self.subjects, "data.init_args.subjects")
        eval_s = self._subject_indices(self.eval_subjects, "data.init_args.eval_subjects") \
            if self.eval_subjects is not None else train_s
        kw = {"return_images": self.return_images}
        if stage in ("fit", None):
            self.datasets["train"] = FMRITrials(self.store, "train", train_s, "trials", self.mixup_prob,
                                                self.mixup_alpha, seed=self.seed, **kw)
            if len(self.datasets["train"]) == 0:
                raise ValueError(f"{self.store_path}: field 'trials/split': no training trials for subjects "
                                 f"{[self.store.subject_names[i] for i in train_s]}")
        for split in ("val", "test"):
            self.datasets[split] = [FMRITrials(self.store, split, eval_s, c, max_items=self.max_eval_items, **kw)
                                    for c in self.eval_conditions]

    def _loader(self, ds: Dataset, shuffle: bool) -> DataLoader:
        sampler = EpochSampler(len(cast(Sized, ds)), shuffle=shuffle and self.shuffle, seed=self.seed) if shuffle else None
        return DataLoader(
            ds, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
            pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0,
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["train"], shuffle=True)

    def val_dataloader(self) -> list[DataLoader]:
        return [self._loader(d, False) for d in self.datasets["val"]]

    def test_dataloader(self) -> list[DataLoader]:
        return [self._loader(d, False) for d in self.datasets["test"]]

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["test"][0], False)

    def state_dict(self) -> dict[str, Any]:
        return {"store": str(self.store_path), "fingerprint": self.store.attrs.get("fingerprint", "")}

    def teardown(self, stage: str | None = None) -> None:
        if self._store is not None:
            self._store.close()


__all__ = ["EpochSampler", "FMRIDataModule", "FMRITrials", "StoreDataModule", "SPLITS", "evenly_spaced"]
