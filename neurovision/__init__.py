"""neurovision: a PyTorch Lightning framework for brain decoding and encoding experiments.

Importing the package has no side effect. Entry points (the ``neurovision`` command, ``python -m
neurovision.<tool>``, ``tests/conftest.py``) call :func:`setup_environment` once, first; a notebook or script that
imports lightning, torchmetrics, open_clip or torchvision does the same::

    import neurovision
    neurovision.setup_environment()
"""

__version__ = "0.1.0"


def setup_environment() -> bool:
    """Prepare this process for neurovision; call it before anything imports torchvision.

    Today that is one thing: where the installed torchvision's compiled ops cannot load against this torch (a
    CUDA torchvision on a CPU torch), define the op schemas its import needs (:mod:`neurovision.cli.environment`). Where
    torchvision loads normally it changes nothing. Idempotent; returns True when this call applied the fix.
    """
    from neurovision.cli.environment import patch_torchvision

    return patch_torchvision()
