"""LightningModules (tasks): a base class with small hooks, and the concrete experiments."""

from neurovision.tasks.alignment import AlignmentTask
from neurovision.tasks.base import BaseTask, DataSpec
from neurovision.tasks.linear import LinearDecoder

__all__ = ["AlignmentTask", "BaseTask", "DataSpec", "LinearDecoder"]
