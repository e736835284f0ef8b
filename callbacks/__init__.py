"""Lightning callbacks of neurovision (an installed package, so ``class_path: callbacks.X`` resolves)."""

from callbacks.concept_maps import ConceptMaps
from callbacks.metrics_table import MetricsTable
from callbacks.predictions import JSONLPredictionWriter

__all__ = ["ConceptMaps", "JSONLPredictionWriter", "MetricsTable"]
