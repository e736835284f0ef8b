"""Lightning callbacks of neurovision (an installed package, so ``class_path: callbacks.X`` resolves)."""

import neurovision  # noqa: F401  (applies the torchvision compatibility fix before lightning is imported)
from callbacks.metrics_table import MetricsTable

__all__ = ["MetricsTable"]
