"""Networks shared by the tasks."""

from neurovision.models.readout import VoxelReadout, with_readout
from neurovision.models.vit3d import ViT3D, ViT3DOutput

__all__ = ["ViT3D", "ViT3DOutput", "VoxelReadout", "with_readout"]
