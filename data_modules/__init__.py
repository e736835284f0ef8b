"""LightningDataModules of neurovision (an installed package, so ``class_path: data_modules.X`` resolves)."""

from data_modules.fmri import FMRIDataModule, FMRITrials, StoreDataModule
from data_modules.instruct import InstructionDataModule
from data_modules.stimuli import StimulusDataModule

__all__ = ["FMRIDataModule", "FMRITrials", "InstructionDataModule", "StimulusDataModule", "StoreDataModule"]
