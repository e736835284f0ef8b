"""Base task: ``save_hyperparameters`` then three hooks (models, losses, metrics); injected optimisers."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import AttributeDict

from neurovision.data.spec import DataSpec  # re-exported: old imports keep working

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # YAML names


def adamw(params: Any) -> torch.optim.Optimizer:
    """The default optimiser of every task (AdamW, lr 1e-3): a YAML's ``optimizer`` block replaces it."""
    return torch.optim.AdamW(params, lr=1e-3)


class BaseTask(L.LightningModule):
    """Subclasses fill :meth:`configure_models`, :meth:`configure_losses`, :meth:`configure_metrics`.

    Args:
        data_spec: sizes decided by the data (linked from the datamodule by the CLI; leave unset in YAML).
        optimizer: optimiser factory (``class_path`` + ``init_args`` in YAML).
        scheduler: optional learning-rate scheduler factory.

    ``IMMUTABLE_HPARAMS``: init args that cannot change after training (architecture; each task sets its own, paths
    such as ``llm`` or ``stage1`` are locations and may move); with ``--ckpt_path`` the CLI refuses a config that gives them other values than the checkpoint's (``data_spec`` always counts).
    Every other init arg given on the command line or in a ``-c`` file applies to the run; one given nowhere
    takes the checkpoint's value (see :class:`neurovision.runs.lightning.NeuroVisionCLI`).
    """

    IMMUTABLE_HPARAMS: ClassVar[tuple[str, ...]] = ()
    # set by Lightning's save_hyperparameters (the copy loggers write out), not declared by its mixin: typed here
    _hparams_initial: AttributeDict

    def __init__(
        self,
        data_spec: DataSpec | None = None,
        optimizer: OptimizerCallable = adamw,
        scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        if data_spec is None:
            raise ValueError("data_spec is unset: run through `neurovision` (it links data.spec) or pass "
                             "DataSpec explicitly")
        self.spec = data_spec
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        # plain types only in hparams, so checkpoints load with torch.load(weights_only=True)
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "data_spec"])
        self._condition_metrics: dict[int, dict[str, Any]] = {}  # evaluation metrics per dataloader (a plain dict:
        # built at the first batch of each condition, never in the state dict)
        self.hparams["data_spec"] = data_spec.sizes()  # the run fields (names, conditions) stay out
        self.configure_models()
        self.configure_losses()
        self.configure_metrics()

    @classmethod
    def immutable_hparams(cls) -> frozenset[str]:
        """``IMMUTABLE_HPARAMS`` of the class and its bases."""
        return frozenset(k for c in cls.__mro__ for k in vars(c).get("IMMUTABLE_HPARAMS", ()))

    def drop_hparams(self, *keys: str) -> None:
        """Remove object-valued init args from the saved hyper-parameters (and from ``hparams_initial``, which
        loggers write out): checkpoints keep plain types, and the YAML supplies the objects again on reload."""
        for k in keys:
            self.hparams.pop(k, None)
            self._hparams_initial.pop(k, None)

    @property
    def data_store(self) -> Any:
        """The run's store (:class:`neurovision.data.store.Store`), opened from the data spec's ``store`` path at first
        use (the task reads the data through its spec, never through ``trainer.datamodule``)."""
        store = self.__dict__.get("_data_store")
        if store is None:
            if not self.spec.store:
                raise ValueError(f"{type(self).__name__} needs a neurovision store: the data spec has none (run "
                                 "through `neurovision`, which links data.spec, or give DataSpec(store=...))")
            from neurovision.data.store import Store

            store = self.__dict__["_data_store"] = Store(self.spec.store)
        return store

    # teachers (frozen plain-object models: CLIP, VAE) on the rank's own device ------------------------
    @property
    def teacher_device(self) -> torch.device:
        """The device this rank's teachers run on: ``trainer.strategy.root_device`` once attached to a trainer
        (already set per rank in ``setup``, before the module itself moves there), else the module's device."""
        if self._trainer is not None:
            return self.trainer.strategy.root_device
        return self.device

    def teachers(self) -> dict[str, Any]:
        """The teacher attributes of this task (plain objects with ``id``, ``output_shape``, ``encode``, ``to``)."""
        from neurovision.pretrained.teachers import Teacher

        return {k: v for k, v in vars(self).items()
                if not k.startswith("_") and isinstance(v, Teacher) and callable(getattr(v, "to", None))}

    def place_teachers(self, device: str | torch.device | None = None, lazy: bool = True) -> None:
        """Put every unpinned teacher on ``device`` (default :attr:`teacher_device`, the rank's own); teachers
        with an explicit ``device`` keep it (see :func:`neurovision.pretrained.teachers.place`). ``lazy``: the weights
        move at each teacher's first use (a teacher the run never calls takes no accelerator memory).

        Called at test start (:meth:`on_test_start`), so scorers and selectors (stage 2's CLIP-S, stage 3's
        best-of-N CLIP, the ConceptMaps callback) run where the rank's data are; released at test end. A task
        that overrides :meth:`on_test_start` / :meth:`on_test_end` calls ``super()`` first. Code that uses a
        teacher's network directly (``teacher.model``) calls ``teacher.ready()`` first."""
        from neurovision.pretrained.teachers import place

        dev = self.teacher_device if device is None else torch.device(device)
        for t in self.teachers().values():
            place(t, dev, lazy=lazy)

    def release_teachers(self) -> None:
        """Move every teacher's weights back to the CPU (frees the accelerator; see
        :func:`neurovision.pretrained.teachers.release`)."""
        from neurovision.pretrained.teachers import release

        for t in self.teachers().values():
            release(t)

    def on_test_start(self) -> None:
        self.place_teachers()

    def on_test_end(self) -> None:
        self.release_teachers()

    # evaluation conditions (one val/test dataloader each) ------------------------------------------------
    def condition(self, dataloader_idx: int, default: Sequence[str] = ()) -> str:
        """The name of evaluation dataloader ``dataloader_idx``: the data spec's ``eval_conditions`` entry (else
        ``default``'s, else the index)."""
        return self.spec.condition(dataloader_idx, tuple(default))

    def condition_metrics(self, dataloader_idx: int, build: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """The metrics (torchmetrics ``Metric``s) of one evaluation condition: ``build()`` at its first batch,
        the same objects until :meth:`pop_condition_metrics`."""
        m = self._condition_metrics.get(dataloader_idx)
        if m is None:
            m = self._condition_metrics[dataloader_idx] = build()
        return m

    def pop_condition_metrics(self, default: Sequence[str] = ()) -> Iterator[tuple[int, str, dict[str, Any]]]:
        """``(dataloader_idx, condition, metrics)`` of every condition seen this epoch, in dataloader order; they
        are dropped afterwards (the next epoch builds new ones)."""
        items = sorted(self._condition_metrics.items())
        self._condition_metrics = {}
        for idx, metrics in items:
            yield idx, self.condition(idx, default), metrics

    def on_validation_epoch_start(self) -> None:
        self._condition_metrics = {}  # nothing left over from an interrupted evaluation

    def on_test_epoch_start(self) -> None:
        self._condition_metrics = {}

    def configure_models(self) -> None:
        """Build the networks."""

    def configure_losses(self) -> None:
        """Build the loss functions."""

    def configure_metrics(self) -> None:
        """Build the metrics."""

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]  # frozen parts (e.g. stage 2's LLM) left out
        if not params:
            raise ValueError(f"{type(self).__name__}: nothing to train (every parameter is frozen)")
        opt = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.scheduler_factory(opt), "interval": "epoch"}}


__all__ = ["TORCH_DTYPES", "BaseTask", "DataSpec"]
