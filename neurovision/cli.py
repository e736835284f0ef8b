"""The ``neurovision`` command.

``neurovision fit|validate|test|predict -c experiments/<stage>.yaml`` is a :class:`NeuroVisionCLI`
(a LightningCLI in subclass mode for model and data, seed 0 by default, config.yaml saved with overwrite).
``neurovision prepare <source> ...`` converts a source into a store; ``neurovision inspect <store>`` prints
a store's summary.
"""

from __future__ import annotations

import json
import os
import sys

import neurovision  # noqa: F401  (torchvision fix first)

TRAINER_COMMANDS = ("fit", "validate", "test", "predict")
TOOL_COMMANDS = {
    "prepare": "convert a data source (phantom, nsd) into a neurovision store",
    "inspect": "print a store's summary (subjects, trials, grid, active patches, splits, sizes)",
}


def _usage() -> str:
    lines = ["usage: neurovision <command> [options]", "", "training (LightningCLI; `neurovision fit --help`):"]
    lines += [f"  {c:<10} {c} a task with a YAML config: -c experiments/<stage>.yaml" for c in TRAINER_COMMANDS]
    lines += ["", "tools:"]
    lines += [f"  {c:<10} {h}" for c, h in TOOL_COMMANDS.items()]
    return "\n".join(lines)


def prepare_main(args: list[str]) -> int:
    from jsonargparse import ArgumentParser

    from neurovision.sources import registry

    parser = ArgumentParser(prog="neurovision prepare", description=TOOL_COMMANDS["prepare"])
    sub = parser.add_subcommands(dest="source")
    sources = registry()
    for name, fn in sources.items():
        p = ArgumentParser(description=(fn.__doc__ or "").strip().splitlines()[0])
        p.add_function_arguments(fn)
        sub.add_subcommand(name, p, help=(fn.__doc__ or "").strip().splitlines()[0])
    cfg = parser.parse_args(args)
    name = cfg.source
    kwargs = dict(cfg[name])
    kwargs.pop("__path__", None)
    out = sources[name](**kwargs)
    print(f"store: {out}")
    return 0


def inspect_main(args: list[str]) -> int:
    from jsonargparse import ArgumentParser

    from neurovision.store import Store

    parser = ArgumentParser(prog="neurovision inspect", description=TOOL_COMMANDS["inspect"])
    parser.add_argument("store", type=str, help="path of the store file")
    parser.add_argument("--json", type=bool, default=False, help="print JSON instead of a table")
    parser.add_argument("--plot", type=str | None, default=None,
                        help="also write a PNG overview (stimuli, active patches, ROIs) to this path")
    cfg = parser.parse_args(args)
    s = Store(cfg.store)
    summary = s.summary()
    if cfg.plot:
        from neurovision.plots import store_overview

        print(f"overview: {store_overview(s, cfg.plot)}", file=sys.stderr)
    if cfg.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(format_summary(summary))
    return 0


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def format_summary(s: dict) -> str:
    out = [
        f"store        {s['file']}",
        f"source       {s['source']} (converter {s['converter_version']}, schema v{s['schema_version']}, "
        f"created {s['created']})",
        f"grid         {'x'.join(map(str, s['grid']))} (padded {'x'.join(map(str, s['padded_grid']))}), "
        f"patch {s['patch_size']}^3",
        f"patches      {s['active_patches']} active of {s['total_patches']} "
        f"({100 * s['active_patches'] / s['total_patches']:.1f} %)",
        f"trials       {s['trials']}  " + "  ".join(f"{k}={v}" for k, v in s["splits"].items()),
        f"stimuli      {s['stimuli']} images {'x'.join(map(str, s['image_shape']))} uint8",
        f"per trial    {_mb(s['bytes_per_trial_stored'])} stored (active patches, float16) vs "
        f"{_mb(s['bytes_per_trial_full_grid_float16'])} full grid "
        f"({s['bytes_per_trial_full_grid_float16'] / s['bytes_per_trial_stored']:.2f}x)",
        f"file size    {_mb(s['file_bytes'])}",
        f"annotations  {', '.join(s['annotations']) or '-'}",
        f"extras       {', '.join(s['extras']) or '-'}",
        "",
        f"{'subject':<10} {'shape':<14} {'images':>7} {'train':>7} {'val':>6} {'test':>6}",
    ]
    for name, d in s["subjects"].items():
        shape = "x".join(map(str, d["original_shape"]))
        out.append(f"{name:<10} {shape:<14} {d['images']:>7} {d['train']:>7} {d['val']:>6} {d['test']:>6}")
    return "\n".join(out)


def main(args: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if args is None else args)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    cmd = argv[0]
    try:
        if cmd == "prepare":
            return prepare_main(argv[1:])
        if cmd == "inspect":
            return inspect_main(argv[1:])
    except (FileNotFoundError, ValueError, KeyError) as e:  # one clear line, not a traceback
        print(f"neurovision {cmd}: error: {e}", file=sys.stderr)
        return 1
    if cmd in TRAINER_COMMANDS or cmd.startswith("-"):
        from neurovision.lightning_cli import NeuroVisionCLI
        from neurovision.store import StoreError

        try:
            NeuroVisionCLI(args=None if args is None else argv)
        except (FileNotFoundError, StoreError) as e:  # bad input: one line (NEUROVISION_TRACEBACK=1: full)
            if os.environ.get("NEUROVISION_TRACEBACK"):
                raise
            print(f"neurovision {cmd}: error: {e}", file=sys.stderr)
            return 1
        return 0
    print(f"neurovision: unknown command {cmd!r}\n\n{_usage()}", file=sys.stderr)
    return 2


def cli_entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli_entry()
