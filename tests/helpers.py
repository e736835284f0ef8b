"""Helpers shared by the test modules (not fixtures)."""

from __future__ import annotations

from neurovision.cli import main


def run_cli(args: list[str]) -> int:
    """``neurovision <args>`` in-process; the exit code (LightningCLI/jsonargparse exit via SystemExit)."""
    try:
        return main(args)
    except SystemExit as e:
        return int(e.code or 0)
