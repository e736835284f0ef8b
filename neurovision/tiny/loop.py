"""The one training loop of the demo stand-ins: a Lightning ``Trainer(max_steps=...)`` on the CPU.

Each tiny trainer (:mod:`neurovision.tiny.teachers`, :mod:`neurovision.tiny.unclip`, :mod:`neurovision.tiny.llm`)
builds its model, a step function (one batch of item indices -> loss) and a batch sampler, and hands them to
:func:`fit`, which wraps them in a :class:`StepModule` and runs Lightning for exactly the step budget.

Budgets are optimiser steps and schedules functions of the step, never of the clock: the same seed and thread
count give the same weights on an idle or a loaded machine (``tests/test_determinism.py``). There is no
wall-clock budget; a stop after so many minutes would make the result depend on the machine.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from torch.utils.data import DataLoader, Dataset, Sampler

StepFn = Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, float]]]
"""One training step: the batch's item indices -> (loss to minimise, numbers to record / show)."""


# --------------------------------------------------------------------------------------------- budgets
def set_threads(threads: int | None) -> int:
    """Set torch's CPU threads (``None``: keep torch's choice) and return the count in use.

    Why: the thread count changes how CPU convolutions split their sums, so it changes the trained weights
    (measured: after 4 steps a tiny CLIP / VAE differ by up to 1e-4 / 5e-4 between 1 and 2 threads; the tiny
    Llama's matmuls did not). The machine's load does not. The count is recorded in every metrics file
    (``torch_threads``); give the same ``--threads`` to get the same weights on machines with different core
    counts (and the same CPU instruction set: AVX2 and AVX-512 kernels round differently)."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(int(threads))
    return torch.get_num_threads()


def resolve_steps(n: int, batch_size: int, epochs: int | None, steps: int | None, where: str) -> int:
    """The step budget: ``steps`` when given, else ``epochs`` x (``n // batch_size``) (the last partial batch
    dropped); one clear error for a non-positive budget, batch size or an empty training set."""
    if batch_size < 1:
        raise ValueError(f"{where}: batch_size must be >= 1, got {batch_size}")
    if n < 1:
        raise ValueError(f"{where}: no training items (the store's train+val splits are empty)")
    if steps is not None:
        if steps < 1:
            raise ValueError(f"{where}: steps must be >= 1, got {steps}")
        return int(steps)
    if epochs is None or epochs < 1:
        raise ValueError(f"{where}: epochs must be >= 1 (or give steps), got {epochs}")
    return int(epochs) * max(1, n // batch_size)


def deprecated_max_minutes(max_minutes: float | None, where: str) -> None:
    """``max_minutes`` (a wall-clock budget) was removed: budgets are steps. Accepted for one release (``None``
    silently, a number with a warning, then ignored) so that old call sites keep working."""
    if max_minutes is not None:
        warnings.warn(f"{where}: max_minutes={max_minutes} is ignored (budgets are in steps now: give steps=N); "
                      "the argument will be removed in the next release", FutureWarning, stacklevel=3)


# --------------------------------------------------------------------------------------------- schedules
def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """The teachers' and unCLIP's lr factor: linear warm-up over ``warmup`` steps, then cosine decay to 0 at
    ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, p)))


def warmup_times_cosine(step: int, total: int, warmup: int) -> float:
    """The tiny LLM's lr factor: a linear warm-up times a cosine over the whole run."""
    return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / total))


# --------------------------------------------------------------------------------------------- batches
class PassBatches(Sampler[list[int]]):
    """``total`` batches of ``batch_size`` of ``n`` item indices: a fresh permutation (from ``rng``) each pass,
    the last partial batch of a pass dropped, as many passes as the budget needs."""

    def __init__(self, n: int, batch_size: int, total: int, rng: np.random.Generator) -> None:
        self.n, self.batch_size, self.total, self.rng = n, batch_size, total, rng
        self.steps_per_epoch = max(1, n // batch_size)
        self.epochs = math.ceil(total / self.steps_per_epoch)

    def __len__(self) -> int:
        return self.total

    def __iter__(self) -> Iterator[list[int]]:
        step = 0
        while step < self.total:
            order = self.rng.permutation(self.n)
            for b in range(self.steps_per_epoch):
                if step >= self.total:
                    return
                yield order[b * self.batch_size:(b + 1) * self.batch_size].tolist()
                step += 1


class DrawBatches(Sampler[list[int]]):
    """``total`` batches of ``batch_size`` indices drawn uniformly with replacement from ``n`` (``generator``)."""

    def __init__(self, n: int, batch_size: int, total: int, generator: torch.Generator) -> None:
        self.n, self.batch_size, self.total, self.generator = n, batch_size, total, generator

    def __len__(self) -> int:
        return self.total

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.total):
            yield torch.randint(self.n, (self.batch_size,), generator=self.generator).tolist()


class _Indices(Dataset[torch.Tensor]):
    """A batch sampler's list of indices as one tensor (the step function indexes its own in-memory data)."""

    def __getitem__(self, index: list[int]) -> torch.Tensor:
        return torch.as_tensor(index, dtype=torch.long)


# --------------------------------------------------------------------------------------------- module
class StepModule(L.LightningModule):
    """A LightningModule around a model and a step function: AdamW on ``param_groups`` (each group's ``lr`` is
    ``lr`` times its optional ``lr_scale``), the lr multiplied by ``schedule(step)`` at every step, and
    ``after_step`` called after each optimiser step (e.g. a clamp). ``losses`` collects ``record`` of every
    step (the loss by default)."""

    def __init__(self, model: torch.nn.Module, step: StepFn, *, lr: float, schedule: Callable[[int], float],
                 param_groups: Sequence[dict[str, Any]] | None = None, weight_decay: float = 0.01,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, record: str = "loss",
                 after_step: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.model = model
        self.step_fn = step
        self.lr, self.schedule, self.weight_decay, self.betas, self.eps = lr, schedule, weight_decay, betas, eps
        self.groups: list[dict[str, Any]] = list(param_groups) if param_groups is not None else [{"params": list(model.parameters())}]
        self.record, self.after_step = record, after_step
        self.losses: list[float] = []

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss, shown = self.step_fn(batch)
        self.losses.append(float(shown[self.record]) if self.record in shown else loss.item())
        for k, v in shown.items():
            self.log(k, float(v), prog_bar=True, on_step=True, on_epoch=False, logger=False, batch_size=len(batch))
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.after_step is not None:
            self.after_step()

    def configure_optimizers(self) -> Any:
        groups = [{**{k: v for k, v in g.items() if k != "lr_scale"}, "lr": self.lr * g.get("lr_scale", 1.0)}
                  for g in self.groups]
        opt = torch.optim.AdamW(groups, lr=self.lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self.schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}


class _NamedBar(TQDMProgressBar):
    """Lightning's tqdm bar, named after the model instead of "Epoch 0"."""

    def __init__(self, desc: str) -> None:
        super().__init__()
        self.desc = desc

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(self.desc)


def fit(module: StepModule, batches: PassBatches | DrawBatches, *, desc: str, progress: bool = True,
        gradient_clip_val: float | None = None) -> int:
    """Train ``module`` on the CPU for one step per batch of ``batches`` (``max_steps=len(batches)``); return the
    number of optimiser steps taken.

    One process, no workers: the step functions index tensors already in memory, and the samplers' generators
    must be drawn in order. ``deterministic=True`` (restored afterwards: it is process-wide)."""
    loader = DataLoader(_Indices(), sampler=batches, batch_size=None, num_workers=0)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*does not have many workers.*")
            trainer = L.Trainer(
                accelerator="cpu", devices=1, max_steps=len(batches), max_epochs=1, logger=False,
                enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=progress,
                callbacks=[_NamedBar(desc)] if progress else [], deterministic=True, num_sanity_val_steps=0,
                limit_val_batches=0, gradient_clip_val=gradient_clip_val, use_distributed_sampler=False,
            )
            trainer.fit(module, train_dataloaders=loader)
    finally:
        torch.use_deterministic_algorithms(was_deterministic, warn_only=warn_only)
    return int(trainer.global_step)
