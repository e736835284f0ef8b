"""Metrics over evaluation items: DDP gathering and de-padding in one place.

:class:`ItemMetric` is a torchmetrics ``Metric`` whose states are per-item tensors (``dist_reduce_fx="cat"``:
torchmetrics gathers every rank's items, uneven sizes included) keyed by ``(subject, stimulus)``. Lightning's
``DistributedSampler`` pads each rank's share with repeats of the first items, so the gathered items are
de-padded by :func:`first_occurrences` (each key once, sorted by key: the order of the evaluation datasets, the
same for any number of ranks). :class:`RowMetric` does the same for rows of text (JSON rows stored as UTF-8
bytes), de-padded by a key of the row's fields where they were gathered from several ranks.

Subclasses name their tensor ``fields`` and turn the de-padded items into a score in :meth:`ItemMetric.score`
(the functional metrics of this package); ``compute()`` is that score, over all items or per subject.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Hashable, Sequence
from typing import Any, ClassVar, cast

import torch
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat


def first_occurrences(keys: Sequence[Hashable], sort: bool = True) -> list[int]:
    """Indices of the first occurrence of each distinct key: ordered by key (``sort``) or by position."""
    first: dict[Hashable, int] = {}
    for i, k in enumerate(keys):
        first.setdefault(k, i)
    return [first[k] for k in sorted(first)] if sort else list(first.values())  # type: ignore[type-var]


def gather_to_zero(result: torch.Tensor, group: Any = None) -> list[torch.Tensor]:
    """A torchmetrics ``dist_sync_fn`` that gathers every rank's tensor on global rank 0 only (uneven sizes
    padded and trimmed, as torchmetrics' ``gather_all_tensors``); the other ranks get their own tensor back.

    For large states that only rank 0 uses (stage 3's images: rank 0 scores and writes them): no rank but 0
    ever holds every rank's items. ``group`` must contain global rank 0 (e.g. a gloo group of all ranks for CPU
    tensors under NCCL)."""
    import torch.distributed as dist
    import torch.nn.functional as F

    group = dist.group.WORLD if group is None else group
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    result = result.contiguous()
    shape = torch.tensor(result.shape, dtype=torch.long, device=result.device)
    shapes = [torch.zeros_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape, group=group)
    most = torch.stack(shapes).amax(0).tolist()
    pad: list[int] = []
    for d in reversed(range(result.ndim)):  # F.pad lists the last dimension first
        pad += [0, int(most[d]) - result.shape[d]]
    padded = F.pad(result, pad) if any(pad) else result
    bufs = [torch.empty_like(padded) for _ in range(world)] if rank == 0 else None
    dist.gather(padded, bufs, dst=0, group=group)
    if bufs is None:
        return [result]
    return [b[tuple(slice(0, int(n)) for n in s.tolist())] for b, s in zip(bufs, shapes, strict=True)]


def _cat(state: Any) -> torch.Tensor | None:
    """A list state (local) or tensor state (after a sync) as one tensor; None when it holds nothing."""
    if isinstance(state, list) and not state:
        return None
    t = dim_zero_cat(state)
    return t if t.numel() else None


class ItemMetric(Metric):
    """Per-item tensors, gathered across ranks and de-padded by ``(subject, stimulus)``.

    Args:
        by_subject: ``compute()`` gives ``{subject: score}`` over each subject's items (needs the keys).
        min_items: with ``by_subject``, subjects with fewer items are left out.
        extra_fields: more per-item tensors that ``update`` takes by name and :meth:`gather` returns (not scored).
        kwargs: torchmetrics ``Metric`` options (``process_group``, ``dist_sync_fn``, ...).

    ``update`` takes the ``fields`` (same length N) and, optionally, ``subject`` and ``stimulus`` (N,): without
    them nothing is de-padded (use the keys under DDP). Call ``compute()`` / :meth:`gather` on every rank
    (a collective under DDP).
    """

    full_state_update = False
    is_differentiable = False
    fields: ClassVar[tuple[str, ...]] = ()

    def __init__(self, by_subject: bool = False, min_items: int = 1, extra_fields: Sequence[str] = (),
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.by_subject, self.min_items = bool(by_subject), int(min_items)
        self.item_fields = (*self.fields, *extra_fields)
        for f in (*self.item_fields, "subject", "stimulus"):
            self.add_state(f, default=[], dist_reduce_fx="cat")

    def _append(self, subject: torch.Tensor | None, stimulus: torch.Tensor | None, **values: torch.Tensor) -> None:
        if set(values) != set(self.item_fields):
            raise ValueError(f"{type(self).__name__}.update needs {list(self.item_fields)}, got {sorted(values)}")
        sizes = {k: len(v) for k, v in values.items()}
        n = next(iter(sizes.values()))
        if any(s != n for s in sizes.values()):
            raise ValueError(f"{type(self).__name__}.update: fields of different lengths {sizes}")
        if (subject is None) != (stimulus is None):
            raise ValueError(f"{type(self).__name__}.update: give both subject and stimulus, or neither")
        if subject is None and self.by_subject:
            raise ValueError(f"{type(self).__name__}(by_subject=True).update needs subject and stimulus")
        for k, v in values.items():
            getattr(self, k).append(v.detach())
        if subject is not None and stimulus is not None:
            dev = next(iter(values.values())).device
            for k, v in (("subject", subject), ("stimulus", stimulus)):
                v = torch.as_tensor(v).detach().long().flatten().to(dev)
                if len(v) != n:
                    raise ValueError(f"{type(self).__name__}.update: {k} has {len(v)} entries for {n} items")
                getattr(self, k).append(v)

    def items(self) -> dict[str, torch.Tensor]:
        """The items of the current states (this rank's, or every rank's inside a sync), de-padded."""
        out = {f: _cat(getattr(self, f)) for f in self.item_fields}
        if any(v is None for v in out.values()):
            raise ValueError(f"{type(self).__name__}: no items (update was never called)")
        subject, stimulus = _cat(self.subject), _cat(self.stimulus)
        if subject is None or stimulus is None:
            return out  # type: ignore[return-value]
        keep = first_occurrences(list(zip(subject.tolist(), stimulus.tolist(), strict=True)))
        idx = torch.tensor(keep, dtype=torch.long)
        res = {k: v[idx.to(v.device)] for k, v in out.items() if v is not None}
        res["subject"], res["stimulus"] = subject[idx.to(subject.device)], stimulus[idx.to(stimulus.device)]
        return res

    def gather(self) -> dict[str, torch.Tensor]:
        """Every rank's items, de-padded (a collective under DDP); the local states are kept."""
        if self._is_synced:
            return self.items()
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, process_group=self.process_group):
            return self.items()

    def score(self, items: dict[str, torch.Tensor]) -> Any:
        """The metric of de-padded items (subclasses)."""
        raise NotImplementedError

    def compute(self) -> Any:
        items = self.items()
        if not self.by_subject:
            return self.score(items)
        out: dict[int, Any] = {}
        for s in torch.unique(items["subject"]).tolist():
            m = items["subject"] == s
            if int(m.sum()) >= self.min_items:
                out[int(s)] = self.score({k: v[m.to(v.device)] for k, v in items.items()})
        return out


class ItemMean(ItemMetric):
    """Mean of a per-item value (``update(value, subject, stimulus)``) over the de-padded items."""

    fields = ("value",)

    def update(self, value: torch.Tensor, subject: torch.Tensor | None = None,
               stimulus: torch.Tensor | None = None) -> None:
        self._append(subject, stimulus, value=value.flatten())

    def score(self, items: dict[str, torch.Tensor]) -> float:
        return items["value"].mean().item()


def _row_key(row: dict[str, Any]) -> Hashable:
    return tuple(json.dumps(row.get(k), sort_keys=True) for k in ("subject", "stimulus", "type", "question"))


class RowMetric(Metric):
    """Rows (JSON-serialisable dicts) gathered across ranks as UTF-8 bytes (``dist_reduce_fx="cat"``).

    De-padding: rows gathered from several ranks keep the first of each ``key(row)`` (default: subject,
    stimulus, type, question), in rank order; a single process keeps every row. :meth:`score` (subclasses)
    turns the rows into scores; ``compute()`` is ``score(rows)``.
    """

    full_state_update = False
    is_differentiable = False

    def __init__(self, key: Callable[[dict[str, Any]], Hashable] = _row_key, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.key = key
        self.add_state("text", default=[], dist_reduce_fx="cat")
        self.add_state("length", default=[], dist_reduce_fx="cat")

    def update(self, rows: Sequence[dict[str, Any]]) -> None:
        if not rows:
            return
        data = [json.dumps(r).encode() for r in rows]
        text, length = cast(list[torch.Tensor], self.text), cast(list[torch.Tensor], self.length)  # list states
        text.append(torch.frombuffer(bytearray(b"".join(data)), dtype=torch.uint8).to(self.device))
        length.append(torch.tensor([len(b) for b in data], dtype=torch.long, device=self.device))

    def items(self) -> list[dict[str, Any]]:
        """The rows of the current states (de-padded when they were gathered from several ranks)."""
        text, length = _cat(self.text), _cat(self.length)
        if text is None or length is None:
            return []
        buf = text.to(torch.uint8).cpu().numpy().tobytes()
        rows, start = [], 0
        for n in length.long().tolist():
            rows.append(json.loads(buf[start:start + n].decode()))
            start += n
        if self._is_synced:
            rows = [rows[i] for i in first_occurrences([self.key(r) for r in rows], sort=False)]
        return rows

    def gather(self) -> list[dict[str, Any]]:
        """Every rank's rows, de-padded (a collective under DDP); the local states are kept."""
        if self._is_synced:
            return self.items()
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, process_group=self.process_group):
            return self.items()

    def score(self, rows: list[dict[str, Any]]) -> Any:
        raise NotImplementedError

    def compute(self) -> Any:
        return self.score(self.items())


__all__ = ["ItemMean", "ItemMetric", "RowMetric", "first_occurrences", "gather_to_zero"]
