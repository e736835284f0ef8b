"""Interpreter-start hook for the one case an explicit call cannot reach: ``spawn``-started processes.

:func:`neurovision.setup_environment` applies the torchvision fix in the process that calls it (the entry points
do). A process started with ``spawn`` (Lightning's ``ddp_spawn``, ``DDPStrategy(start_method="spawn")``,
``multiprocessing.get_context("spawn")``, DataLoader workers with a spawn context) is a fresh interpreter that
unpickles lightning objects, and so imports torchvision, before any neurovision code runs. Where (and only where)
the installed torchvision's compiled ops do not load, ``make install`` runs :func:`install_pth`, which writes a
one-line ``neurovision_boot.pth`` into site-packages: it puts a finder on ``sys.meta_path`` that applies the fix
when torchvision is first imported, then removes itself. Where torchvision loads normally, no ``.pth`` is
written (and a stale one is removed).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import sysconfig
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

PTH_NAME = "neurovision_boot.pth"


class _TorchvisionFirstImport(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname == "torchvision":
            sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _TorchvisionFirstImport)]
            from neurovision.cli.environment import patch_torchvision

            patch_torchvision()
        return None  # let the normal finders locate torchvision


def install_hook() -> None:
    if "torchvision" not in sys.modules and not any(
        isinstance(f, _TorchvisionFirstImport) for f in sys.meta_path
    ):
        sys.meta_path.insert(0, _TorchvisionFirstImport())


def install_pth(site_packages: str | None = None) -> Path | None:
    """Write the ``.pth`` that installs the hook at interpreter start where torchvision's ops do not load;
    elsewhere remove a stale one. Returns the path written, or None."""
    from neurovision.cli.environment import torchvision_ops_loadable

    target = Path(site_packages or sysconfig.get_paths()["purelib"]) / PTH_NAME
    if torchvision_ops_loadable():
        target.unlink(missing_ok=True)
        return None
    tmp = target.with_suffix(".tmp")
    tmp.write_text("import neurovision_boot; neurovision_boot.install_hook()\n")
    tmp.replace(target)
    return target


if __name__ == "__main__":
    written = install_pth()
    sys.stdout.write(f"{written}: torchvision's compiled ops do not load here; spawned processes get the fix\n"
                     if written else f"{PTH_NAME}: not needed (torchvision's compiled ops load)\n")
