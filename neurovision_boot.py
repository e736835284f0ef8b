"""Interpreter-start hook: apply neurovision's torchvision fix before *any* import of torchvision.

``import neurovision`` applies the fix itself; this hook covers processes that import lightning or
torchvision before neurovision, such as ``ddp_spawn`` ranks and spawned DataLoader workers, which unpickle
lightning objects first. ``make install`` runs :func:`install_pth`, which writes a one-line
``neurovision_boot.pth`` into site-packages; the hook costs nothing until torchvision is imported.
"""

from __future__ import annotations

import importlib.abc
import sys
import sysconfig
from pathlib import Path

PTH_NAME = "neurovision_boot.pth"


class _TorchvisionFirstImport(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):  # type: ignore[no-untyped-def]
        if fullname == "torchvision":
            sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _TorchvisionFirstImport)]
            from neurovision._compat import patch_torchvision

            patch_torchvision()
        return None  # let the normal finders locate torchvision


def install_hook() -> None:
    if "torchvision" not in sys.modules and not any(
        isinstance(f, _TorchvisionFirstImport) for f in sys.meta_path
    ):
        sys.meta_path.insert(0, _TorchvisionFirstImport())


def install_pth(site_packages: str | None = None) -> Path:
    """Write the ``.pth`` that installs the hook at interpreter start; returns its path."""
    target = Path(site_packages or sysconfig.get_paths()["purelib"]) / PTH_NAME
    tmp = target.with_suffix(".tmp")
    tmp.write_text("import neurovision_boot; neurovision_boot.install_hook()\n")
    tmp.replace(target)
    return target


if __name__ == "__main__":
    print(install_pth())
