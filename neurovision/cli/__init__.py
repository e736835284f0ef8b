"""The ``neurovision`` command.

``neurovision fit|validate|test|predict -c experiments/<stage>.yaml`` is a :class:`NeuroVisionCLI`
(a LightningCLI in subclass mode for model and data, seed 0 by default, config.yaml saved with overwrite).
``neurovision prepare <source> ...`` converts a source into a store; ``neurovision inspect <store>`` prints
a store's summary; ``neurovision localize --ckpt A.ckpt ...`` writes concept maps (GradCAM) as NIfTI; ``neurovision sweep
<sweep.yaml>`` runs a resumable sweep (:mod:`neurovision.runs.sweep`); ``neurovision encode -c experiments/encoding.yaml``
fits encoding models and finds integration sites (:mod:`neurovision.encoding.pipeline`); ``neurovision report <dir>``
writes an HTML dashboard (:mod:`neurovision.runs.report`); ``neurovision tiny teachers|unclip|llm`` trains the demo's
stand-ins for pretrained networks. The tools' flags take argparse habits and jsonargparse values
alike (``--subjects 1 2`` or ``--subjects [1,2]``, ``--json`` or ``--json true``, ``--no_zscore`` or
``--zscore=false``): :mod:`neurovision.cli.habits`.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

import neurovision

TRAINER_COMMANDS = ("fit", "validate", "test", "predict")
TOOL_COMMANDS = {
    "prepare": "convert a data source (phantom, nsd; braintreebank, phantom_seeg for encoding) into a store",
    "inspect": "print a store's summary (subjects, trials, grid, active patches, splits, sizes)",
    "localize": "concept maps (GradCAM of CLIP text embeddings) of stage-1 checkpoints, as NIfTI + PNG + r",
    "sweep": "run a sweep YAML (base config + grid of overrides + seeds), resumable; tables of mean ± sd",
    "encode": "encoding models (ridge from network features to SEEG sites) and vision-language integration sites",
    "report": "a static HTML page (metric tables, curves, β sweeps, reconstructions, concept maps) of a run or sweep",
    "tiny": "train the demo's stand-ins for pretrained networks on a phantom store: teachers | unclip | llm",
}
# `neurovision tiny <model>`: the demo stand-ins (not the product: the real runs load pretrained networks)
TINY_COMMANDS = {
    "teachers": ("neurovision.tiny.teachers", "the tiny CLIP (open_clip) and VAE (diffusers) teachers"),
    "unclip": ("neurovision.tiny.unclip", "the tiny unCLIP img2img pipeline of stage 3"),
    "llm": ("neurovision.tiny.llm", "the tiny Llama and its tokenizer of stage 2"),
}


def _usage() -> str:
    lines = ["usage: neurovision <command> [options]", "", "training (LightningCLI; `neurovision fit --help`):"]
    lines += [f"  {c:<10} {c} a task with a YAML config: -c experiments/<stage>.yaml" for c in TRAINER_COMMANDS]
    lines += ["", "tools:"]
    lines += [f"  {c:<10} {h}" for c, h in TOOL_COMMANDS.items()]
    lines += ["", "A bad input (file, YAML key, flag) is one error line naming it, exit code 2; NEUROVISION_DEBUG=1 "
              "shows the traceback."]
    return "\n".join(lines)


class _ConsoleHandler(logging.Handler):
    """Messages as they are: INFO and below on stdout, warnings and errors on stderr. The stream is looked up
    at each record (as :data:`logging.lastResort` does), so a redirected or captured ``sys.stdout`` receives it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stdout if record.levelno < logging.WARNING else sys.stderr
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:
            self.handleError(record)


def configure_logging(level: int = logging.INFO) -> None:
    """Show neurovision's log messages on the console (once per process; the entry points call it)."""
    for name in ("neurovision", "data_modules", "callbacks"):
        logger = logging.getLogger(name)
        logger.setLevel(level)
        if not any(isinstance(h, _ConsoleHandler) for h in logger.handlers):
            handler = _ConsoleHandler()
            handler.setFormatter(logging.Formatter("%(message)s"))
            logger.addHandler(handler)


def setup_process() -> None:
    """What every entry point calls first: :func:`neurovision.setup_environment` and :func:`configure_logging`."""
    neurovision.setup_environment()
    configure_logging()


def check_out_file(out: str | os.PathLike[str], flag: str) -> Path:
    """Refuse an output file that cannot be written before any work: a folder, or a file in a folder that does
    not exist and cannot be created or is read-only (probed by creating a temp file there, which also covers a
    read-only file system and root, for whom permission bits do not say)."""
    import tempfile

    p = Path(out)
    if p.is_dir():
        raise IsADirectoryError(f"{flag} {p}: is a folder; give the path of the file to write (e.g. {p / 'x.h5'})")
    blocker = next((a for a in p.parents if a.exists() and not a.is_dir()), None)
    if blocker is not None:
        raise NotADirectoryError(f"{flag} {p}: {blocker} is a file, not a folder")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".probe", dir=p.parent)
    except OSError as e:
        raise PermissionError(f"{flag} {p}: cannot write in {p.parent} ({e.strerror or e})") from e
    os.close(fd)
    os.unlink(probe)
    return p


def prepare_parser(sources: dict[str, Any]) -> Any:
    """The parser of ``neurovision prepare``: a subcommand per source, its flags from the source's signature."""
    from neurovision.cli.habits import json_parser

    parser = json_parser(prog="neurovision prepare", description=TOOL_COMMANDS["prepare"])
    sub = parser.add_subcommands(dest="source")
    for name, fn in sources.items():
        p = json_parser(description=(fn.__doc__ or "").strip().splitlines()[0], exit_on_error=True)
        p.add_function_arguments(fn)
        sub.add_subcommand(name, p, help=(fn.__doc__ or "").strip().splitlines()[0])
    return parser


def prepare_main(args: list[str]) -> int:
    from neurovision.sources import registry

    sources = registry()
    cfg = prepare_parser(sources).parse_args(args)
    name = cfg.source
    kwargs = dict(cfg[name])
    kwargs.pop("__path__", None)
    if kwargs.get("out") is not None:
        check_out_file(kwargs["out"], "--out")
    try:
        out = sources[name](**kwargs)
    except OSError as e:  # a full disk while writing: name the flag (the temp file's name means nothing)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(e.errno, f"--out {kwargs.get('out')}: no space left on device (disk full) while writing "
                          "the store; nothing was written", kwargs.get("out")) from e
        raise
    print(f"store: {out}")
    return 0


def inspect_parser() -> Any:
    """The parser of ``neurovision inspect``."""
    from neurovision.cli.habits import json_parser

    parser = json_parser(prog="neurovision inspect", description=TOOL_COMMANDS["inspect"])
    parser.add_argument("store", type=str, help="path of the store file")
    parser.add_argument("--json", type=bool, default=False, help="print JSON instead of a table")
    parser.add_argument("--plot", type=str | None, default=None,
                        help="also write a PNG overview (stimuli, active patches, ROIs) to this path")
    parser.add_argument("--stimulus", type=int | None, default=None,
                        help="print this stimulus row's annotations (every kind, as JSON) instead of the summary")
    parser.add_argument("--export_instructions", type=str | None, default=None,
                        help="write the store's instruction data (descriptions, QA, dialogues, SD prompts) to this "
                             "JSON file in the LLaVA format `prepare nsd --instructions` imports")
    parser.add_argument("--verify", type=bool, default=False,
                        help="read every chunk and check its checksum; exit 1 naming the first bad trial")
    return parser


def inspect_main(args: list[str]) -> int:
    from neurovision.data.store import Store

    cfg = inspect_parser().parse_args(args)
    if cfg.verify:  # before opening as a Store: events stores verify too
        from neurovision.data.store import StoreError, verify

        try:
            n = verify(cfg.store)
        except StoreError as e:
            print(f"neurovision inspect: {e}", file=sys.stderr)
            return 1
        print(f"{cfg.store}: {n} trials (events) verified, every chunk intact")
        return 0
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
        from neurovision.data.overview import store_overview

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


def localize_parser() -> Any:
    """The parser of ``neurovision localize``."""
    from neurovision.cli.habits import argparse_parser
    from neurovision.localization.options import LocalizationOptions

    parser = argparse_parser(
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
    parser.add_argument("--subjects", nargs="+", default=None, help="subjects (default: all)")
    LocalizationOptions.add_arguments(parser)  # the options shared with callbacks.ConceptMaps, stated once
    parser.add_argument("--png", default="glass", choices=["glass", "stat", "none"], help="PNG per map")
    parser.add_argument("--device", default="auto",
                        help="where the models run (auto: cuda:<LOCAL_RANK> (index 0 when unset) when CUDA is "
                             "available, else cpu)")
    return parser


def localize_main(args: list[str]) -> int:
    import yaml

    cfg = localize_parser().parse_args(args)

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

    from neurovision.pretrained.teachers import OpenCLIPImageTeacher, default_device

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

    from neurovision.localization.maps import localize
    from neurovision.localization.options import LocalizationOptions

    loc = localize(cfg.ckpt, store, clip, cfg.out, device=device, subjects=cfg.subjects, png=cfg.png != "none",
                   png_kind="stat" if cfg.png == "stat" else "glass",
                   **LocalizationOptions.from_namespace(cfg).localize_kwargs())
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


# --------------------------------------------------------------------------------------------- user errors
USER_ERROR_EXIT = 2
#: the exceptions that mean "the input (a file, a YAML key, a flag) is wrong", not "the program is": one short
#: message, exit 2. StoreError is a ValueError.
USER_ERROR_TYPES: tuple[type[BaseException], ...] = (
    FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError, ValueError, KeyError)
#: errnos of OSErrors that are the machine's state rather than a bug: disk full, quota, read-only file system
_USER_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES)
MAX_ERROR_LINES = 3  # "neurovision <cmd>: error: ..." included


def _debug() -> bool:
    """Full tracebacks instead of one-line errors (``NEUROVISION_TRACEBACK`` is the older name)."""
    return any(os.environ.get(k, "") not in ("", "0") for k in ("NEUROVISION_DEBUG", "NEUROVISION_TRACEBACK"))


def _raised_in_jsonargparse(e: BaseException) -> bool:
    """jsonargparse re-raises an exception from a class's ``__init__`` as ``ValueError("Does not validate against
    any of the Union subtypes ... Given value: Namespace(...)")`` from it: a wrapper, never the message to show."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and f"{os.sep}jsonargparse{os.sep}" in tb.tb_frame.f_code.co_filename


def _is_user_error(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno in _USER_ERRNOS:
        return True
    return isinstance(e, USER_ERROR_TYPES) and not _raised_in_jsonargparse(e)


def _text(e: BaseException) -> str:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        if e.strerror and "disk full" in e.strerror:  # already says which file and flag
            return e.strerror
        return f"{e.filename or '(the output)'}: no space left on device (disk full)"
    if isinstance(e, OSError) and e.errno in _USER_ERRNOS and e.filename and e.filename not in str(e):
        return f"{e.filename}: {e.strerror or e}"
    if isinstance(e, KeyError) and len(e.args) == 1:
        return str(e.args[0])  # not repr'd
    return str(e) or type(e).__name__


_NOISE = ("Does not validate against any of the Union subtypes", "Subtypes:", "Errors:", "Given value",
          "- Expected a <class 'NoneType'>", "tip:")


def _condense_parse_error(message: str, argv: list[str]) -> str:
    """One line of a jsonargparse error: the dotted key (``Parser key`` components, ``init_args`` for a class) and
    the first concrete problem, instead of a usage screen and a nested report ending in ``Given value: ...``."""
    if message.startswith("Problems parsing config"):  # a YAML syntax error: which -c file (jsonargparse says none)
        import yaml

        from neurovision.runs.argv import config_files

        for f in config_files(argv):
            try:
                yaml.safe_load(Path(f).read_text())
            except yaml.YAMLError as e:
                mark = getattr(e, "problem_mark", None)
                at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
                return f"{f}: not valid YAML: {getattr(e, 'problem', None) or e}{at}"
            except OSError:
                continue
    m = re.match(r'Parser key "config": (.*)', message)
    if m:
        return f"-c/--config: {m.group(1)}"
    keys: list[str] = []
    for line in message.splitlines():
        t = line.strip().lstrip("- ").strip()
        if not t or any(line.strip().startswith(n) for n in _NOISE):
            continue
        m = re.fullmatch(r'Parser key "([^"]+)":', t)
        if m:
            keys.append(m.group(1))
            continue
        m = re.fullmatch(r"Problem with given class_path '([^']+)':", t)
        if m:
            keys.append("init_args")
            continue
        m = re.search(r"Option '([^']+)' is not accepted", t)
        if m:
            keys.append(m.group(1))
        key = ".".join(keys).removesuffix(".init_args")
        from neurovision.runs.argv import where_given

        where = where_given(key, argv) if key else ""
        return f"{key}: {t}" + (f" ({where})" if where else "") if key else t
    return message.strip().splitlines()[0] if message.strip() else "invalid arguments"


def _short(message: str) -> str:
    """At most :data:`MAX_ERROR_LINES` lines in all."""
    lines = [ln.rstrip() for ln in message.strip().splitlines() if ln.strip()]
    if len(lines) > MAX_ERROR_LINES:
        lines = [*lines[:MAX_ERROR_LINES - 1], f"... ({len(lines) - MAX_ERROR_LINES + 1} more lines: "
                                               "NEUROVISION_DEBUG=1 shows them and the traceback)"]
    return "\n".join(lines)


def _is_problem_list(e: BaseException) -> bool:
    """A report of an input file's bad entries, one line each (``prepare nsd --instructions``): shown whole, since
    its lines are the answer (which entries to fix), not noise."""
    from neurovision.sources.llava import InstructionFileError

    return isinstance(e, InstructionFileError)


# modules that moved when the package was organised by layer (0.1 -> 0.2): a YAML or script naming the old path
# gets told the new one
MOVED = {
    "store": "data.store", "atomic": "data.atomic", "preprocessing": "data.preprocessing",
    "instructions": "data.instructions", "plots": "data.overview", "encoding.events": "data.events",
    "teachers": "pretrained.teachers", "reconstruction": "pretrained.unclip", "llm": "pretrained.llm",
    "interpretation": "localization.maps", "teacher_training": "tiny.teachers", "unclip_training": "tiny.unclip",
    "sweep": "runs.sweep", "report": "runs.report", "beta_sweep": "runs.beta_figures",
    "checkpoints": "runs.checkpoints", "lightning_cli": "runs.lightning", "checked_cli": "runs.lightning",
    "cli_habits": "cli.habits", "_compat": "cli.environment",
}
_MOVED_RE = re.compile(r"(?:neurovision\.([\w.]+)|module 'neurovision' has no attribute '(\w+)')")


def moved_hint(message: str) -> str:
    """``message`` plus where a module it names that no longer exists moved to (docs/api.md has the layout)."""
    import importlib.util

    for m in _MOVED_RE.finditer(message):
        name = m.group(1) or m.group(2)
        for old in sorted(MOVED, key=len, reverse=True):
            if (name == old or name.startswith(old + ".")) and MOVED[old] != old:
                try:
                    if importlib.util.find_spec(f"neurovision.{old}") is not None:
                        break  # still there (a package that kept its name)
                except (ImportError, ValueError):
                    pass
                return (f"{message} (neurovision.{old} moved to neurovision.{MOVED[old]}: the package is organised "
                        "by layer, see docs/api.md)")
    return message


def user_error(e: BaseException, argv: list[str]) -> str | None:
    """The short message of a user error (a bad file, YAML key or flag; a full disk), or None when ``e`` is not
    one (a bug: the caller keeps its traceback).

    jsonargparse re-raises an error of a class's ``__init__`` (a missing teacher checkpoint, say) as a ValueError
    from it, twice or more: those wrappers are looked through (``__cause__``), so the class's own message shows.
    """
    from argparse import ArgumentError

    if isinstance(e, ArgumentError):  # jsonargparse parse errors (exit_on_error=False: see runs.lightning.CheckedCLI)
        return moved_hint(_short(_condense_parse_error(e.message, argv)))
    x: BaseException | None = e
    for _ in range(32):  # a cause chain is short; a cycle must not hang the error report
        if x is None:
            return None
        if _is_user_error(x):
            return moved_hint(_text(x) if _is_problem_list(x) else _short(_text(x)))
        if not _raised_in_jsonargparse(x):
            return None
        x = x.__cause__
    return None


def tiny_main(argv: list[str]) -> int:
    """``neurovision tiny teachers|unclip|llm [options]``: the demo stand-ins' trainers (``--help`` on each)."""
    if argv and argv[0] not in TINY_COMMANDS and argv[0] not in ("-h", "--help"):
        print(f"neurovision tiny: error: unknown model {argv[0]!r} (choose from {', '.join(TINY_COMMANDS)})",
              file=sys.stderr)
        return USER_ERROR_EXIT
    if not argv or argv[0] in ("-h", "--help"):
        lines = ["usage: neurovision tiny {" + ",".join(TINY_COMMANDS) + "} [options]", "",
                 "demo stand-ins for pretrained networks, trained on a phantom store (budgets in steps):"]
        lines += [f"  {c:<10} {h}" for c, (_, h) in TINY_COMMANDS.items()]
        print("\n".join(lines))
        return 0 if argv else 2
    import importlib

    module = importlib.import_module(TINY_COMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


def main(args: list[str] | None = None) -> int:
    """Run one ``neurovision`` command; a user error (see :func:`user_error`) ends it with exit code 2 and at most
    3 lines on stderr naming the file and the YAML key or flag, ``NEUROVISION_DEBUG=1`` (or the older
    ``NEUROVISION_TRACEBACK=1``) re-raises it with its traceback. Other failures keep Python's traceback, exit 1."""
    setup_process()
    argv = list(sys.argv[1:] if args is None else args)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    cmd = argv[0]
    tools = {"prepare": prepare_main, "inspect": inspect_main, "localize": localize_main, "tiny": tiny_main}
    try:
        if cmd in tools:
            return tools[cmd](argv[1:])
        if cmd == "sweep":
            from neurovision.cli.sweep import main as sweep_main

            return sweep_main(argv[1:])
        if cmd == "encode":
            from neurovision.cli.encode import main as encode_main

            return encode_main(argv[1:])
        if cmd == "report":
            from neurovision.cli.report import main as report_main

            return report_main(argv[1:])
        if cmd in TRAINER_COMMANDS or cmd.startswith("-"):
            from neurovision.runs.lightning import CheckedCLI

            CheckedCLI(args=None if args is None else argv)
            return 0
    except Exception as e:
        message = user_error(e, argv)
        if message is None or _debug():
            raise
        print(f"neurovision {cmd}: error: {message}", file=sys.stderr)
        return USER_ERROR_EXIT
    print(f"neurovision: unknown command {cmd!r}\n\n{_usage()}", file=sys.stderr)
    return 2


def cli_entry() -> None:
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:  # `neurovision ... | head`: the reader left; no traceback (Python's documented recipe)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    sys.exit(code)

