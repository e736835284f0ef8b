"""The package's layout rules (docs/api.md, ARCHITECTURE): one folder per layer, every import points down, the demo
stand-ins apart from the product, no private name used across modules, every module in the API reference.

Read from the source (``ast``, lazy imports inside functions included), so a rule broken anywhere fails here.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("neurovision", "data_modules", "callbacks")

# layer -> rank: a module may import its own layer or a lower-ranked one (the order of docs/api.md, bottom up)
RANK = {
    "neurovision.data": 0, "neurovision.metrics": 0,
    "neurovision.sources": 1, "neurovision.models": 1, "neurovision.pretrained": 1,
    "data_modules": 2,
    "neurovision.tasks": 3, "neurovision.localization": 3,
    "neurovision.encoding": 4, "callbacks": 4,
    "neurovision.runs": 5, "neurovision.tiny": 5,
    "neurovision.cli": 6,
}


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            parts = f.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            mods[name] = f
    return mods


MODULES = _modules()


def _layer(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "neurovision" else parts[0]


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, names, line) of every absolute import of our packages in ``path``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found = [(node.module, [a.name for a in node.names], node.lineno)]
        elif isinstance(node, ast.Import):
            found = [(a.name, [], node.lineno) for a in node.names]
        else:
            continue
        out += [f for f in found if f[0].split(".")[0] in PACKAGES]
    return out


def test_every_module_belongs_to_a_layer() -> None:
    loose = [m for m in MODULES if m.startswith("neurovision.") and m.count(".") == 1 and m not in RANK]
    assert not loose, f"modules outside every layer (put them in one): {loose}"
    unknown = {_layer(m) for m in MODULES if m != "neurovision"} - set(RANK)
    assert not unknown, f"packages missing from the layer table: {unknown}"


def test_imports_point_down() -> None:
    bad = []
    for mod, path in MODULES.items():
        if mod == "neurovision":  # the package root: its version and setup_environment()
            continue
        mine = _layer(mod)
        for target, names, line in _imports(path):
            if target == "neurovision":
                targets = [f"neurovision.{n}" for n in names if f"neurovision.{n}" in RANK]
            else:
                targets = [target]
            for t in targets:
                theirs = _layer(t)
                if theirs != mine and RANK.get(theirs, -1) >= RANK[mine]:
                    bad.append(f"{path.relative_to(ROOT)}:{line}: {mine} imports {t} ({theirs} is not below it)")
    assert not bad, "imports that point up or sideways:\n" + "\n".join(bad)


def test_the_product_never_imports_the_demo_stand_ins() -> None:
    bad = [f"{path.relative_to(ROOT)}:{line}: {t}" for mod, path in MODULES.items()
           if not mod.startswith(("neurovision.tiny", "neurovision.cli"))
           for t, _, line in _imports(path) if t.startswith("neurovision.tiny")]
    assert not bad, "library code importing neurovision.tiny:\n" + "\n".join(bad)


def test_no_private_name_is_imported_across_modules() -> None:
    bad = [f"{path.relative_to(ROOT)}:{line}: from {t} import {n}" for mod, path in MODULES.items()
           for t, names, line in _imports(path) if t != mod for n in names if n.startswith("_")]
    assert not bad, "private names used across modules (make them public in the right layer):\n" + "\n".join(bad)


def test_no_module_is_a_script() -> None:
    """The one entry point is the ``neurovision`` command (``python -m neurovision.cli``): no module runs itself."""
    bad = [str(p.relative_to(ROOT)) for m, p in MODULES.items()
           if m != "neurovision.cli.__main__" and re.search(r"^if __name__ == .__main__.:", p.read_text(), re.M)]
    assert not bad, f"modules with a __main__ block: {bad}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if not m.endswith("__main__")
                                          and not (MODULES[m].name == "__init__.py" and m.count(".") >= 1
                                                   and m.split(".")[0] == "neurovision" and m != "neurovision.cli")
                                          and m not in PACKAGES))
def test_every_module_is_in_the_api_reference(module: str) -> None:
    api = (ROOT / "docs" / "api.md").read_text()
    assert re.search(rf"^::: {re.escape(module)}$", api, re.M), f"docs/api.md lacks '::: {module}'"


def test_the_moved_table_is_true_and_documented() -> None:
    """`neurovision.cli.MOVED` (what a config naming an old module is told) points from modules that are gone to
    modules that exist, and docs/api.md lists every row."""
    import importlib.util

    from neurovision.cli import MOVED

    api = (ROOT / "docs" / "api.md").read_text()
    for old, new in MOVED.items():
        assert f"neurovision/{old.replace('.', '/')}.py" not in {str(p.relative_to(ROOT)) for p in MODULES.values()}
        assert importlib.util.find_spec(f"neurovision.{new}") is not None, new
        assert f"| `neurovision.{old}` | `neurovision.{new}` |" in api, old
