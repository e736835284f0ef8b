"""Instruction samples (chat + fMRI trial) for stage 2, streamed from a neurovision store."""

from __future__ import annotations

from collections.abc import Sequence, Sized
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from data_modules.fmri import Condition, EpochSampler, FMRIDataModule, FMRITrials, evenly_spaced
from neurovision.data.instructions import (
    GENERATORS,
    InstructionType,
    Sample,
    as_list,
    check_types,
    concept_vocabulary,
    encode_chat,
    eval_samples,
    needed_annotations,
)

EvalType = Literal["caption", "description", "reasoning", "sd_prompt", "concept"]


def _annotations(store: Any, stimulus: int, kinds: Sequence[str]) -> dict[str, Any]:
    return {k: store.annotations(k, stimulus) for k in kinds}


def _has(kind: str, ann: dict[str, Any]) -> bool:
    """Whether one image's annotations hold data for an instruction type (imported data may cover only some
    images; a COCO image may lack captions)."""
    key = {"caption": "captions", "description": "descriptions", "reasoning": "qa", "dialogue": "dialogues",
           "sd_prompt": "sd_prompts"}.get(kind)
    return key is None or bool(as_list(ann[key]) if key in ("descriptions", "sd_prompts", "dialogues") else ann[key])


class InstructionTrials(Dataset):
    """Training items: every fMRI trial (MixUp as :class:`FMRITrials`) with one instruction sample drawn for it.

    The instruction type (weighted) and the sample are functions of (seed, epoch, index), like the MixUp draws,
    so resumed and DDP runs see the same data as one uninterrupted process.
    """

    def __init__(self, trials: FMRITrials, tokenizer: Any, types: Sequence[str], weights: Sequence[float],
                 max_length: int, seed: int = 0) -> None:
        self.trials, self.tokenizer, self.types = trials, tokenizer, list(types)
        w = np.asarray(weights, dtype=np.float64)
        self.p = w / w.sum()
        self.max_length, self.seed = max_length, seed
        self.kinds = needed_annotations(self.types)
        self.vocabulary = concept_vocabulary(trials.store) if "concept" in self.types else []

    def __len__(self) -> int:
        return len(self.trials)

    def __getitem__(self, i: int | tuple[int, int]) -> dict[str, Any]:
        idx, epoch = (int(i[0]), int(i[1])) if isinstance(i, tuple) else (int(i), 0)
        item = self.trials[(idx, epoch)]
        rng = np.random.default_rng((self.seed, epoch, idx, 1))
        ann = _annotations(self.trials.store, item["stimulus"], self.kinds)
        has = np.array([_has(t, ann) for t in self.types])
        if not has.all():  # draw among the types this image has data for
            if not (has * self.p).any():
                raise ValueError(f"{self.trials.store.path}: stimulus {item['stimulus']} has no data for any of the "
                                 f"instruction types {self.types} (YAML key data.init_args.tasks)")
            p = has * self.p
            kind = self.types[int(rng.choice(len(self.types), p=p / p.sum()))]
        else:
            kind = self.types[int(rng.choice(len(self.types), p=self.p))]
        fn = GENERATORS[kind]
        sample = fn(ann, rng, vocabulary=self.vocabulary) if kind == "concept" else fn(ann, rng)
        ids, labels = encode_chat(self.tokenizer, sample.messages, self.max_length)
        return {**item, "input_ids": ids, "labels": labels, "type": kind}


class EvalInstructions(Dataset):
    """Evaluation items: for each (subject, image) item of ``trials`` (``average`` or ``single``), one row per
    evaluation prompt. A row has the teacher-forced ids/labels (validation loss) and the prompt alone
    (generation), plus its references. ``shuffle_fmri`` pairs each prompt with another image's fMRI
    (a fixed derangement, seed 0): the control whose scores should collapse."""

    def __init__(self, trials: FMRITrials, tokenizer: Any, types: Sequence[str], max_length: int,
                 max_items: int | None = None, shuffle_fmri: bool = False) -> None:
        self.trials, self.tokenizer, self.max_length = trials, tokenizer, max_length
        kinds = needed_annotations(types)
        vocabulary = concept_vocabulary(trials.store) if "concept" in types else []
        n_all = len(trials)
        picked = evenly_spaced(n_all, max_items)
        n = len(picked)
        self.rows: list[tuple[int, Sample]] = []
        for i in picked.tolist():
            stim = int(trials.store.trials["stimulus"][int(trials.items[i])])
            for s in eval_samples(_annotations(trials.store, stim, kinds), types, vocabulary, key=stim):
                self.rows.append((i, s))
        self.source = {int(i): int(i) for i in picked}  # item -> the item whose fMRI it gets
        if shuffle_fmri and n > 1:  # a derangement: no prompt keeps its own image's fMRI
            perm = picked[np.random.default_rng(0).permutation(n)]
            self.source.update({int(a): int(b) for a, b in zip(perm, np.roll(perm, 1), strict=True)})
        self._cached: tuple[int, dict[str, Any]] | None = None  # rows come grouped by item: read its fMRI once

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item_idx, sample = self.rows[int(i)]
        if self._cached is None or self._cached[0] != item_idx:
            item = self.trials[int(item_idx)]
            if self.source[item_idx] != item_idx:
                item = {**item, "patches": self.trials[int(self.source[item_idx])]["patches"]}
            self._cached = (item_idx, item)
        item = self._cached[1]
        ids, labels = encode_chat(self.tokenizer, sample.messages, self.max_length)
        prompt, _ = encode_chat(self.tokenizer, sample.messages[:-1], self.max_length)
        meta = {"type": sample.type, **sample.meta}
        return {**item, "input_ids": ids, "labels": labels, "prompt_ids": prompt, "meta": meta}


class Collate:
    """Pads token fields (``input_ids``/``labels`` on the right, ``prompt_ids`` on the left for generation) and
    stacks the fMRI fields; ``meta`` stays a list."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def _pad(self, seqs: list[list[int]], value: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
        n = max(len(s) for s in seqs)
        out = torch.full((len(seqs), n), value, dtype=torch.long)
        mask = torch.zeros((len(seqs), n), dtype=torch.long)
        for i, s in enumerate(seqs):
            if left:
                out[i, n - len(s):], mask[i, n - len(s):] = torch.tensor(s), 1
            else:
                out[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
        return out, mask

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {
            "patches": torch.stack([it["patches"] for it in items]),
            "subject": torch.tensor([it["subject"] for it in items]),
            "stimulus": torch.tensor([it["stimulus"] for it in items]),
            "trial": torch.tensor([it["trial"] for it in items]),
        }
        batch["input_ids"], batch["attention_mask"] = self._pad([it["input_ids"] for it in items], self.pad_id, False)
        batch["labels"], _ = self._pad([it["labels"] for it in items], -100, False)
        if "prompt_ids" in items[0]:
            batch["prompt_ids"], batch["prompt_mask"] = self._pad([it["prompt_ids"] for it in items], self.pad_id, True)
        batch["meta"] = [it.get("meta", {"type": it.get("type")}) for it in items]
        return batch


class InstructionDataModule(FMRIDataModule):
    """fMRI trials paired with chat-formatted instruction samples (stage 2).

    Training draws one instruction per trial from ``tasks`` (weights ``task_weights``); validation computes the
    teacher-forced loss and test/predict generate, both on the deterministic prompts of ``eval_tasks`` per
    (subject, image) item and condition. The tokenizer is loaded from ``tokenizer``, the LLM's local directory,
    as the model loads it (:func:`neurovision.pretrained.llm.load_tokenizer`, with the same ``chat_template``): ``neurovision``
    links both from ``model.init_args.llm`` and ``model.init_args.chat_template``, so the datamodule takes nothing
    from the model and both tokenise identically.

    Args (beyond :class:`~data_modules.FMRIDataModule`'s):
        tasks: instruction types for training.
        task_weights: their sampling weights (uniform when omitted).
        eval_tasks: types evaluated in validation/test/predict.
        max_length: token limit of one sample (before the fMRI tokens are spliced in).
        max_eval_items: evaluate N evenly spaced (subject, image) items per condition (None: all).
        shuffle_fmri: control: evaluation prompts get another image's fMRI.
        tokenizer: the LLM's local directory (linked from ``model.init_args.llm``; leave unset in YAML).
        chat_template: Jinja chat template or ``.jinja`` path (linked from ``model.init_args.chat_template``).
        eval_batch_size: batch size of validation/test/predict (generation); ``batch_size`` when omitted.
    """

    def __init__(
        self,
        store: str | Path,
        subjects: list[str] | None = None,
        eval_subjects: list[str] | None = None,
        batch_size: int = 16,
        num_workers: int = 0,
        eval_conditions: list[Condition] | None = None,
        mixup_prob: float = 0.0,
        mixup_alpha: float = 1.0,
        pin_memory: bool = False,
        shuffle: bool = True,
        seed: int = 0,
        tasks: list[InstructionType] | None = None,
        task_weights: list[float] | None = None,
        eval_tasks: list[EvalType] | None = None,
        max_length: int = 256,
        max_eval_items: int | None = None,
        shuffle_fmri: bool = False,
        tokenizer: str | None = None,
        eval_batch_size: int | None = None,
        chat_template: str | None = None,
    ) -> None:
        for key, value, low in (("batch_size", batch_size, 1), ("eval_batch_size", eval_batch_size, 1),
                                ("max_length", max_length, 1), ("max_eval_items", max_eval_items, 1)):
            if value is not None and value < low:  # before the store opens: torch refuses it only at the first batch
                raise ValueError(f"data.init_args.{key}: {value}: must be >= {low}")
        super().__init__(store, subjects, eval_subjects, batch_size, num_workers, eval_conditions, mixup_prob,
                         mixup_alpha, False, pin_memory, shuffle, seed)
        self.save_hyperparameters()
        self.tasks = list(tasks or ["caption", "description", "reasoning", "dialogue", "sd_prompt", "concept"])
        self.task_weights = list(task_weights) if task_weights is not None else [1.0] * len(self.tasks)
        if len(self.task_weights) != len(self.tasks) or any(w < 0 for w in self.task_weights) \
                or sum(self.task_weights) <= 0:
            raise ValueError(f"data.init_args.task_weights must be {len(self.tasks)} non-negative weights with a "
                             f"positive sum, got {task_weights}")
        self.eval_tasks = list(eval_tasks or ["caption", "reasoning"])
        self.max_length = max_length
        self.max_eval_items = max_eval_items
        self.shuffle_fmri = shuffle_fmri
        self.tokenizer_path = tokenizer
        self.chat_template = chat_template
        self.eval_batch_size = eval_batch_size or batch_size
        self._tokenizer: Any = None

    @property
    def tokenizer(self) -> Any:
        """The LLM's tokenizer, loaded at first use from ``tokenizer`` (see the class docstring)."""
        if self._tokenizer is None:
            if self.tokenizer_path is None:
                raise ValueError("data.init_args.tokenizer is unset: run through `neurovision` (it links "
                                 "model.init_args.llm) or pass the LLM's directory")
            from neurovision.pretrained.llm import load_tokenizer

            self._tokenizer = load_tokenizer(self.tokenizer_path, "data.init_args.tokenizer", self.chat_template)
        return self._tokenizer

    def setup(self, stage: str | None = None) -> None:
        check_types(self.tasks, self.store.annotation_kinds, str(self.store_path))
        check_types(self.eval_tasks, self.store.annotation_kinds, str(self.store_path))
        super().setup(stage)
        tok = self.tokenizer
        if "train" in self.datasets and isinstance(self.datasets["train"], FMRITrials):
            self.datasets["train"] = InstructionTrials(self.datasets["train"], tok, self.tasks, self.task_weights,
                                                       self.max_length, self.seed)
        for split in ("val", "test"):
            self.datasets[split] = [
                d if isinstance(d, EvalInstructions) else
                EvalInstructions(d, tok, self.eval_tasks, self.max_length, self.max_eval_items, self.shuffle_fmri)
                for d in self.datasets[split]]

    def _loader(self, ds: Dataset, shuffle: bool) -> DataLoader:
        sampler = EpochSampler(len(cast(Sized, ds)), shuffle=shuffle and self.shuffle, seed=self.seed) if shuffle else None
        pad = self.tokenizer.pad_token_id
        return DataLoader(ds, batch_size=self.batch_size if shuffle else self.eval_batch_size, sampler=sampler,
                          num_workers=self.num_workers,
                          pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0,
                          collate_fn=Collate(int(pad if pad is not None else 0)))


__all__ = ["Collate", "EvalInstructions", "InstructionDataModule", "InstructionTrials"]
