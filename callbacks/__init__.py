"""Lightning callbacks of neurovision (an installed package, so ``class_path: callbacks.X`` resolves)."""

from callbacks.concept_maps import ConceptMaps
from callbacks.latest_checkpoint import LatestCheckpoint
from callbacks.metrics_table import MetricsTable
from callbacks.predictions import JSONLPredictionWriter

__all__ = ["ConceptMaps", "JSONLPredictionWriter", "LatestCheckpoint", "MetricsTable"]
