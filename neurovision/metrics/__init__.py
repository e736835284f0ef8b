"""Evaluation metrics, each tested against an independent computation."""

from neurovision.metrics.captions import (
    caption_metrics,
    clip_score,
    clip_score_from_teacher,
    exact_match,
    exact_match_by_type,
    python_ptb_tokenize,
    unavailable_metrics,
)
from neurovision.metrics.retrieval import retrieval_top1, two_way_identification

__all__ = [
    "caption_metrics",
    "clip_score",
    "clip_score_from_teacher",
    "exact_match",
    "exact_match_by_type",
    "python_ptb_tokenize",
    "retrieval_top1",
    "two_way_identification",
    "unavailable_metrics",
]
