"""LightningModules (tasks): a base class with small hooks, and the concrete experiments."""

from neurovision.tasks.alignment import AlignmentTask
from neurovision.tasks.base import BaseTask, DataSpec
from neurovision.tasks.linear import LinearDecoder

__all__ = ["AlignmentTask", "BaseTask", "DataSpec", "InstructTask", "LinearDecoder"]


def __getattr__(name: str):  # InstructTask imports transformers + peft: only when asked for
    if name == "InstructTask":
        from neurovision.tasks.instruct import InstructTask

        return InstructTask
    raise AttributeError(name)
