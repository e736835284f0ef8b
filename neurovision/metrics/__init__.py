"""Evaluation metrics (pure torch; each tested against an independent computation)."""

from neurovision.metrics.retrieval import retrieval_top1, two_way_identification

__all__ = ["retrieval_top1", "two_way_identification"]
