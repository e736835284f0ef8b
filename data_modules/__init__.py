"""LightningDataModules of neurovision (an installed package, so ``class_path: data_modules.X`` resolves)."""

import neurovision  # noqa: F401  (applies the torchvision compatibility fix before lightning is imported)
from data_modules.fmri import FMRIDataModule, FMRITrials, StoreDataModule
from data_modules.instruct import InstructionDataModule

__all__ = ["FMRIDataModule", "FMRITrials", "InstructionDataModule", "StoreDataModule"]
