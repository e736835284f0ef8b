"""LightningModules (tasks): a base class with small hooks, and the concrete experiments."""

from neurovision.tasks.alignment import AlignmentTask
from neurovision.tasks.base import BaseTask, DataSpec
from neurovision.tasks.features import FeatureExtractor
from neurovision.tasks.linear import LinearDecoder

__all__ = ["AlignmentTask", "BaseTask", "DataSpec", "FeatureExtractor", "InstructTask", "LinearDecoder",
           "ReconstructionTask"]


def __getattr__(name: str):  # InstructTask / ReconstructionTask import transformers, peft, diffusers: on demand
    if name == "InstructTask":
        from neurovision.tasks.instruct import InstructTask

        return InstructTask
    if name == "ReconstructionTask":
        from neurovision.tasks.reconstruct import ReconstructionTask

        return ReconstructionTask
    raise AttributeError(name)
