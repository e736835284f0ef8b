"""Scores of stage-2 generations: caption metrics per free-text type, exact match per question type, CLIP-S."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from neurovision.metrics.items import RowMetric

FREE_TEXT = ("caption", "description", "sd_prompt")
QUESTIONS = ("reasoning", "concept")


def score_generations(rows: Sequence[dict[str, Any]], clip_teacher: Any = None,
                      images: Callable[[int], np.ndarray] | None = None, clip_prefix: str = "A photo depicts ",
                      ) -> dict[str, float | None]:
    """Scores of generation rows (``type``, ``prediction``, ``references`` or ``answer``/``qtype``, ``subject``,
    ``stimulus``), named ``<type>/<metric>``: BLEU-1..4, METEOR, ROUGE-L, CIDEr, SPICE (None where unavailable)
    of every free-text type against its references (one candidate per (subject, image)); ``caption/CLIP-S``
    when a CLIP teacher and the images are given; ``<type>/exact_match/<qtype>`` for questions."""
    from neurovision.metrics.captions import caption_metrics, clip_score_from_teacher, exact_match_by_type

    out: dict[str, float | None] = {}
    for t in FREE_TEXT:
        sel = [r for r in rows if r["type"] == t]
        if not sel:
            continue
        cands = {(r["subject"], r["stimulus"]): r["prediction"] for r in sel}
        refs = {(r["subject"], r["stimulus"]): list(r["references"]) for r in sel}
        for k, v in caption_metrics(cands, refs).items():
            out[f"{t}/{k}"] = v
        if t == "caption" and clip_teacher is not None and images is not None:
            imgs = torch.stack([torch.from_numpy(np.ascontiguousarray(images(int(r["stimulus"])))).permute(2, 0, 1)
                                for r in sel])
            out[f"{t}/CLIP-S"] = clip_score_from_teacher(clip_teacher, imgs, [r["prediction"] for r in sel],
                                                         prefix=clip_prefix)
            out[f"{t}/CLIP-S_references"] = clip_score_from_teacher(
                clip_teacher, imgs, [r["references"][0] for r in sel], prefix=clip_prefix)
    for t in QUESTIONS:
        sel = [r for r in rows if r["type"] == t]
        if sel:
            em = exact_match_by_type({"type": r["qtype"], "prediction": r["prediction"], "answer": r["answer"]}
                                     for r in sel)
            for k, v in em.items():
                out[f"{t}/exact_match/{k}"] = v
    return out


class GenerationScores(RowMetric):
    """:func:`score_generations` as a torchmetrics ``Metric``: ``update(rows)`` with generation rows (JSON-able
    dicts, see :func:`score_generations`), gathered from every rank as text and de-padded by (subject, stimulus,
    type, question); ``compute()`` scores them. A task that also writes the rows calls :meth:`gather` and
    :meth:`score`."""

    def __init__(self, clip_teacher: Any = None, images: Callable[[int], np.ndarray] | None = None,
                 clip_prefix: str = "A photo depicts ", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.clip_teacher, self.images, self.clip_prefix = clip_teacher, images, clip_prefix

    def score(self, rows: list[dict[str, Any]]) -> dict[str, float | None]:
        return score_generations(rows, clip_teacher=self.clip_teacher, images=self.images,
                                 clip_prefix=self.clip_prefix)


__all__ = ["GenerationScores", "score_generations"]
