"""Where a command line set a key: the flag, or the ``-c`` YAML file holding it (for errors that name it).

Light (yaml only): the command's error path uses it without importing Lightning.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def config_files(argv: list[str]) -> list[str]:
    """The ``-c`` / ``--config`` files of ``argv``, in order."""
    out = []
    for i, a in enumerate(argv):
        if a in ("-c", "--config") and i + 1 < len(argv):
            out.append(argv[i + 1])
        elif a.startswith("--config="):
            out.append(a.split("=", 1)[1])
    return out


def where_given(key: str, argv: list[str]) -> str:
    """Where the user set ``key`` (dotted): the flag when one sets it, else the last ``-c`` YAML file holding it."""
    if any(a == f"--{key}" or a.startswith(f"--{key}=") for a in argv):
        return f"flag --{key}"
    import yaml

    for f in reversed(config_files(argv)):
        try:
            node: Any = yaml.safe_load(Path(f).read_text())
        except (OSError, yaml.YAMLError):
            continue
        for part in key.split("."):
            node = node.get(part, _MISSING) if isinstance(node, dict) else _MISSING
        if node is not _MISSING:
            return f"in {f}"
    return ""


_MISSING = object()
