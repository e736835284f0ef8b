"""Evaluation metrics, each tested against an independent computation; torchmetrics ``Metric`` classes (DDP
gathering and de-padding in :mod:`neurovision.metrics.items`) wrap the functional ones."""

from neurovision.metrics.captions import (
    CaptionScores,
    caption_metrics,
    clip_score,
    clip_score_from_teacher,
    exact_match,
    exact_match_by_type,
    python_ptb_tokenize,
    unavailable_metrics,
)
from neurovision.metrics.correlation import pearson_r
from neurovision.metrics.images import ImageMetrics
from neurovision.metrics.items import ItemMean, ItemMetric, RowMetric, first_occurrences
from neurovision.metrics.retrieval import (
    RetrievalTop1,
    TwoWayIdentification,
    retrieval_top1,
    two_way_identification,
)

__all__ = [
    "CaptionScores",
    "ImageMetrics",
    "ItemMean",
    "ItemMetric",
    "RetrievalTop1",
    "RowMetric",
    "TwoWayIdentification",
    "caption_metrics",
    "clip_score",
    "clip_score_from_teacher",
    "exact_match",
    "exact_match_by_type",
    "first_occurrences",
    "pearson_r",
    "python_ptb_tokenize",
    "retrieval_top1",
    "two_way_identification",
    "unavailable_metrics",
]
