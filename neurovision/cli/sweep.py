"""``neurovision sweep <sweep.yaml>``: the command of :mod:`neurovision.runs.sweep` (sweep file format: docs/sweeps.md)."""

from __future__ import annotations

import argparse
import sys

from neurovision.runs.sweep import SweepError, execute


def parser() -> argparse.ArgumentParser:
    """The parser of ``neurovision sweep``."""
    from neurovision.cli.habits import argparse_parser

    p = argparse_parser(prog="neurovision sweep", description="reproducible ablation sweeps of "
                        "LightningCLI runs: grid x runs x seeds, resumable, aggregated to CSV, here or on SLURM",
                        epilog="The sweep file format: see `python -c 'import neurovision.runs.sweep as s; "
                        "help(s)'` or docs/sweeps.md.")
    p.add_argument("sweep", help="sweep YAML")
    p.add_argument("--out", default=None, help="output folder (default: the sweep's out, else runs/sweeps/<stem>)")
    p.add_argument("--parallel", type=int, default=1, help="local launcher: runs at once (default 1); with CUDA "
                   "GPUs each gets its own CUDA_VISIBLE_DEVICES, round robin (with the sweep's devices_per_run: n "
                   "GPUs each)")
    p.add_argument("--dry_run", "--dry-run", action="store_true", help="list the runs and their state (slurm: and "
                   "the sbatch scripts); run nothing")
    p.add_argument("--aggregate_only", "--aggregate-only", action="store_true", help="only rebuild the tables")
    return p


def main(args: list[str] | None = None) -> int:
    """Run ``neurovision sweep``; 2 (one error line) when the sweep is not valid."""
    ns = parser().parse_args(sys.argv[1:] if args is None else args)
    try:
        return execute(ns.sweep, ns.out, ns.parallel, ns.dry_run, ns.aggregate_only)
    except SweepError as e:
        from neurovision.cli import moved_hint

        print(f"neurovision sweep: error: {moved_hint(str(e))}", file=sys.stderr)
        return 2
