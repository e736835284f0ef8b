"""neurovision: a PyTorch Lightning framework for brain decoding and encoding experiments."""

from neurovision._compat import patch_torchvision as _patch_torchvision

_patch_torchvision()  # must run before anything imports torchvision (lightning, torchmetrics, peft, ...)

__version__ = "0.1.0"
