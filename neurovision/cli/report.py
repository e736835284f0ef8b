"""``neurovision report <run-or-sweep-dir> [--out report.html]``: the command of :mod:`neurovision.runs.report`."""

from __future__ import annotations

import argparse
import logging
import sys

from neurovision.runs.report import ReportError, write_report


def parser() -> argparse.ArgumentParser:
    """The parser of ``neurovision report``."""
    from neurovision.cli.habits import argparse_parser

    parser = argparse_parser(
        prog="neurovision report",
        description="a static, self-contained HTML dashboard of a run or sweep directory: a headline table of the "
                    "chain's numbers and the key figures first, then each stage's runs (final metrics, validation "
                    "curves, configs), sweeps, concept maps, encoding, generated text, and a run index")
    parser.add_argument("dir", help="run or sweep directory (scanned recursively)")
    parser.add_argument("--out", default=None, help="output HTML file (default: <dir>/report.html)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or log lines")
    return parser


def main(args: list[str]) -> int:
    """``neurovision report <dir> [--out report.html]``; 0 on success, 1 (one error line) on bad input."""
    cfg = parser().parse_args(args)
    package = logging.getLogger("neurovision")
    level = package.level
    if cfg.quiet:  # warnings still show
        package.setLevel(max(level, logging.WARNING))
    try:
        out = write_report(cfg.dir, cfg.out, progress=False if cfg.quiet else None)
    except (FileNotFoundError, ReportError) as e:
        print(f"neurovision report: error: {e}", file=sys.stderr)
        return 1
    finally:
        package.setLevel(level)
    print(f"report: {out}")
    return 0
