"""The ``neurovision`` command.

``neurovision fit|validate|test|predict -c experiments/<stage>.yaml`` is a :class:`NeuroVisionCLI`
(a LightningCLI in subclass mode for model and data, seed 0 by default, config.yaml saved with overwrite).
``neurovision prepare <source> ...`` converts a source into a store; ``neurovision inspect <store>`` prints
a store's summary; ``neurovision localize --ckpt A.ckpt ...`` writes concept maps (GradCAM) as NIfTI; ``neurovision sweep
<sweep.yaml>`` runs a resumable sweep (:mod:`neurovision.sweep`); ``neurovision encode -c experiments/encoding.yaml``
fits encoding models and finds integration sites (:mod:`neurovision.encoding.pipeline`); ``neurovision report <dir>``
writes an HTML dashboard (:mod:`neurovision.report`).
"""

from __future__ import annotations

import json
import os
import sys

import neurovision  # noqa: F401  (torchvision fix first)

TRAINER_COMMANDS = ("fit", "validate", "test", "predict")
TOOL_COMMANDS = {
    "prepare": "convert a data source (phantom, nsd; braintreebank, phantom_seeg for encoding) into a store",
    "inspect": "print a store's summary (subjects, trials, grid, active patches, splits, sizes)",
    "localize": "concept maps (GradCAM of CLIP text embeddings) of stage-1 checkpoints, as NIfTI + PNG + r",
    "sweep": "run a sweep YAML (base config + grid of overrides + seeds), resumable; tables of mean ± sd",
    "encode": "encoding models (ridge from network features to SEEG sites) and vision-language integration sites",
    "report": "a static HTML page (metric tables, curves, β sweeps, reconstructions, concept maps) of a run or sweep",
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
    parser.add_argument("--stimulus", type=int | None, default=None,
                        help="print this stimulus row's annotations (every kind, as JSON) instead of the summary")
    parser.add_argument("--export_instructions", type=str | None, default=None,
                        help="write the store's instruction data (descriptions, QA, dialogues, SD prompts) to this "
                             "JSON file in the LLaVA format `prepare nsd --instructions` imports")
    cfg = parser.parse_args(args)
    s = Store(cfg.store)
    if cfg.export_instructions:
        from neurovision.sources.llava import export_instructions

        print(f"instructions: {export_instructions(s, cfg.export_instructions)}")
        return 0
    if cfg.stimulus is not None:
        n = len(s.stimulus_ids)
        if not 0 <= cfg.stimulus < n:
            raise ValueError(f"{cfg.store}: --stimulus {cfg.stimulus}: the store has stimulus rows 0..{n - 1}")
        ann = {"stimulus_id": int(s.stimulus_ids[cfg.stimulus]),
               **{k: s.annotations(k, cfg.stimulus) for k in s.annotation_kinds}}
        print(json.dumps(ann, indent=1))
        return 0
    summary = s.summary()
    if cfg.plot:
        from neurovision.plots import store_overview

        print(f"overview: {store_overview(s, cfg.plot)}", file=sys.stderr)
    if cfg.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(format_summary(summary))
    return 0


def _run_config(ckpt: str) -> str | None:
    """The run's saved ``config.yaml`` beside a checkpoint: ``<x>.config.yaml`` or ``<log_dir>/config.yaml``."""
    from pathlib import Path

    p = Path(ckpt)
    for c in (p.with_suffix(".config.yaml"), p.parent / "config.yaml", p.parent.parent / "config.yaml"):
        if c.is_file():
            return str(c)
    return None


def localize_main(args: list[str]) -> int:
    import argparse
    from pathlib import Path

    import yaml

    parser = argparse.ArgumentParser(
        prog="neurovision localize", description=TOOL_COMMANDS["localize"],
        epilog="The CLIP teacher is --clip-* when given, else the run's config.yaml (--run-config, or found beside "
               "the first checkpoint: <ckpt>.config.yaml, <log_dir>/config.yaml); --store likewise.")
    parser.add_argument("--ckpt", action="append", required=True, help="stage-1 checkpoint (repeat to ensemble)")
    parser.add_argument("--store", default=None, help="store file (default: the run config's data.init_args.store)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--run-config", default=None, help="the training run's config.yaml (for the CLIP teacher)")
    parser.add_argument("--clip-model-name", default=None, help="open_clip architecture name (e.g. tiny_clip)")
    parser.add_argument("--clip-config", default=None, help="open_clip model config JSON")
    parser.add_argument("--clip-checkpoint", default=None, help="open_clip checkpoint file")
    parser.add_argument("--concepts", nargs="+", default=None, help="concept words (default: the store's)")
    parser.add_argument("--subjects", nargs="+", default=None, help="subjects (default: all)")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"])
    parser.add_argument("--condition", default="average", choices=["average", "single"])
    parser.add_argument("--method", default="gradcam", choices=["gradcam", "pattern"])
    parser.add_argument("--aggregate", default="present", choices=["present", "contrast"])
    parser.add_argument("--upsample", default="trilinear", choices=["trilinear", "nearest"])
    parser.add_argument("--mask", default="roi", choices=["roi", "active"])
    parser.add_argument("--no-relu", action="store_true", help="signed GradCAM (no ReLU)")
    parser.add_argument("--layer", type=int, default=-1,
                        help="GradCAM at the hidden states entering this encoder block (-1: the last, the paper's "
                             "penultimate layer; 0: the token embeddings)")
    parser.add_argument("--target", default="relative", choices=["relative", "similarity"],
                        help="the explained score: the concept's CLIP similarity minus the mean similarity to the "
                             "store's concepts (relative) or the plain similarity (the paper's)")
    parser.add_argument("--prompt", default="{}", help="text template of a concept, e.g. 'a picture of a {}'")
    parser.add_argument("--png", default="glass", choices=["glass", "stat", "none"], help="PNG per map")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto",
                        help="where the models run (auto: cuda:<LOCAL_RANK> (index 0 when unset) when CUDA is "
                             "available, else cpu)")
    cfg = parser.parse_args(args)

    for c in cfg.ckpt:  # before loading anything
        if not Path(c).is_file():
            raise FileNotFoundError(f"{c}: stage-1 checkpoint does not exist (--ckpt)")
    run_cfg_path = cfg.run_config or _run_config(cfg.ckpt[0])
    if cfg.run_config and not Path(cfg.run_config).is_file():
        raise FileNotFoundError(f"{cfg.run_config}: run config does not exist (--run-config)")
    run_cfg = yaml.safe_load(Path(run_cfg_path).read_text()) if run_cfg_path else {}
    store = cfg.store or ((run_cfg.get("data") or {}).get("init_args") or {}).get("store")
    if not store:
        raise ValueError("no store: pass --store (the run config names none)")
    import torch

    from neurovision.teachers import OpenCLIPImageTeacher, default_device

    try:  # resolved here, explicitly (no Lightning rank to decide it)
        device = default_device() if cfg.device == "auto" else torch.device(cfg.device)
    except RuntimeError as e:
        raise ValueError(f"--device {cfg.device!r}: not a torch device (auto, cpu, cuda, cuda:1, ...)") from e
    if cfg.clip_config or cfg.clip_checkpoint or cfg.clip_model_name:
        kw = {"model_name": cfg.clip_model_name or "ViT-L-14", "model_config": cfg.clip_config,
              "checkpoint": cfg.clip_checkpoint}
    else:
        teacher = ((run_cfg.get("model") or {}).get("init_args") or {}).get("clip_teacher") or {}
        if not teacher:
            raise ValueError("no CLIP teacher: pass --clip-config/--clip-checkpoint/--clip-model-name or "
                             "--run-config (the training run's config.yaml)")
        kw = dict(teacher.get("init_args") or {})
    kw["device"] = device
    clip = OpenCLIPImageTeacher(**kw)

    from neurovision.interpretation import localize

    loc = localize(cfg.ckpt, store, clip, cfg.out, concepts=cfg.concepts, split=cfg.split, condition=cfg.condition,
                   method=cfg.method, aggregate_mode=cfg.aggregate, upsample=cfg.upsample, mask=cfg.mask,
                   relu=not cfg.no_relu, layer=cfg.layer, target=cfg.target, prompt=cfg.prompt, batch_size=cfg.batch_size,
                   device=device, subjects=cfg.subjects, png=cfg.png != "none", png_kind="stat" if cfg.png == "stat" else "glass")
    if loc.rows:
        import numpy as np

        print(f"{'concept':<12} {'r':>7} {'r_abs':>7}   (mean over subjects; mask: {loc.mask})")
        for c in loc.per_concept:
            rows = [r for r in loc.rows if r["concept"] == c]
            print(f"{c:<12} {np.nanmean([r['r'] for r in rows]):>7.3f} {np.nanmean([r['r_abs'] for r in rows]):>7.3f}")
        print(f"{'mean':<12} {loc.r_mean:>7.3f} {np.nanmean([r['r_abs'] for r in loc.rows]):>7.3f}")
        for m, rows in loc.rows_by_mask.items():
            if m != loc.mask:
                print(f"(mask {m}: mean r {np.nanmean([r['r'] for r in rows]):.3f}, "
                      f"r_abs {np.nanmean([r['r_abs'] for r in rows]):.3f})")
    print(f"maps: {cfg.out} ({len(loc.files)} files)")
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
        if cmd == "localize":
            return localize_main(argv[1:])
        if cmd == "sweep":
            from neurovision.sweep import main as sweep_main

            return sweep_main(argv[1:])
        if cmd == "encode":
            from neurovision.encoding.pipeline import main as encode_main

            return encode_main(argv[1:])
        if cmd == "report":
            from neurovision.report import main as report_main

            return report_main(argv[1:])
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
