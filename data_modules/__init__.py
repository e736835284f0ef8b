"""LightningDataModules of neurovision (an installed package, so ``class_path: data_modules.X`` resolves)."""

import neurovision  # noqa: F401  (applies the torchvision compatibility fix before lightning is imported)
from data_modules.fmri import FMRIDataModule, FMRITrials, StoreDataModule

__all__ = ["FMRIDataModule", "FMRITrials", "StoreDataModule"]
