"""The headline numbers of a `make demo` chain, read from the files its runs wrote (printed at the end of the demo).

    python benchmarks/demo_headline.py [--root runs/demo] [--teachers teachers/phantom_demo]

Every number comes from a file the chain wrote; a number whose file is absent is printed as "not run" (never
estimated or carried over from an earlier run), and a file that exists but cannot be read is named with the
reason. Where each number comes from (the Makefile's `demo` recipe):

- teachers: ``<teachers>/tiny_clip_metrics.json`` / ``tiny_vae_metrics.json`` / ``tiny_unclip_metrics.json`` /
  ``tiny_llm/pretrain_metrics.json`` (steps run, of the planned step budget; test scores where evaluated);
- stage 1: test rows ``test/<cond>/retrieval_fmri2img`` (and ``retrieval_chance``) of the newest
  ``metrics_table.csv`` under ``<root>/stage1`` that has them;
- stage 2: ``test/<cond>/caption/CIDEr`` (the brief-caption task) from ``<root>/stage2``; the shuffled control
  from a sibling run folder ``<root>/stage2*shuffled*``, "not run" when there is none;
- stage 3: the best mean CLIP two-way identification (metric ``clip``) of ``<root>/beta_sweep/beta_table.csv``
  (written by ``neurovision.runs.beta_figures.figures``), with its β, condition and prompt setting;
- encoding: precision/recall/F1 of the integration-site calls, ``<root>/encoding/summary.json``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from neurovision.runs.report import (  # noqa: E402
    Unreadable,
    best_beta,
    encoding_scores,
    finite_float,
    last_test_metrics,
    read_json_object,
)

NOT_RUN = "not run"


def _fmt(v: Any, pct: bool = False, digits: int = 3) -> str:
    f = finite_float(v)
    if f is None:
        return NOT_RUN
    return f"{100 * f:.1f} %" if pct else f"{f:.{digits}f}"


def teacher_lines(teachers: Path) -> list[str]:
    """Steps each tiny model ran (of its budget) and its own test score, from its metrics file."""
    out = []
    specs = [("tiny CLIP", teachers / "tiny_clip_metrics.json",
              lambda m: f"test image->caption top-1 {_fmt((m.get('test') or {}).get('i2t_top1'), pct=True)}"),
             ("tiny VAE", teachers / "tiny_vae_metrics.json",
              lambda m: f"test PSNR {_fmt((m.get('test') or {}).get('psnr_mean'), digits=1)} dB"),
             ("tiny unCLIP", teachers / "tiny_unclip_metrics.json", lambda m: ""),
             ("tiny LLM", teachers / "tiny_llm" / "pretrain_metrics.json",
              lambda m: f"final loss {_fmt(m.get('final_loss'))}")]
    for name, path, score in specs:
        try:
            m = read_json_object(path)
        except Unreadable as e:
            out.append(f"{name}: unreadable ({e})")
            continue
        if m is None:
            out.append(f"{name}: {NOT_RUN} ({path} absent)")
            continue
        planned = m.get("planned_steps")
        steps = f"{m.get('steps')} steps" + (f" of {planned}" if planned is not None else "")
        threads = f", {m['torch_threads']} thread(s)" if "torch_threads" in m else ""
        extra = score(m)
        out.append(f"{name}: {steps}{threads}" + (f"; {extra}" if extra else ""))
    return out


def stage1_line(run: Path) -> str:
    names = [f"test/{c}/{k}" for c in ("average", "single") for k in ("retrieval_fmri2img", "retrieval_chance")]
    try:
        m, table = last_test_metrics(run, names)
    except Unreadable as e:
        return f"stage 1 test retrieval: unreadable ({e})"
    if not m:
        return f"stage 1 test retrieval: {NOT_RUN}"
    chance = m.get("test/average/retrieval_chance") or m.get("test/single/retrieval_chance")
    among = f" among {round(1 / chance)}" if chance else ""
    return (f"stage 1 test retrieval{among}: averaged {_fmt(m.get('test/average/retrieval_fmri2img'), pct=True)}, "
            f"single {_fmt(m.get('test/single/retrieval_fmri2img'), pct=True)}  [{table}]")


def stage2_line(run: Path) -> str:
    names = [f"test/{c}/caption/CIDEr" for c in ("average", "single")]

    def cider(run: Path) -> str:
        m, table = last_test_metrics(run, names)
        if not m:
            return NOT_RUN
        return (f"averaged {_fmt(m.get(names[0]))}, single {_fmt(m.get(names[1]))}  [{table}]")

    try:
        main = cider(run)
        parent = run.parent
        shuffled_runs = sorted(p for p in parent.glob(f"{run.name}*shuffled*") if p.is_dir()) if parent.is_dir() else []
        shuffled = cider(shuffled_runs[0]) if shuffled_runs else NOT_RUN
    except Unreadable as e:
        return f"stage 2 brief-caption CIDEr: unreadable ({e})"
    return f"stage 2 brief-caption CIDEr: {main}\n    shuffled-fMRI control: {shuffled}"


def stage3_line(sweep: Path) -> str:
    path = sweep / "beta_table.csv"
    if not path.is_file():
        return f"stage 3 β sweep, best CLIP two-way identification: {NOT_RUN}"
    try:
        best, _ = best_beta(path)
    except Unreadable as e:
        return f"stage 3 β sweep: unreadable ({e})"
    if best is None:
        return f"stage 3 β sweep, best CLIP two-way identification: {NOT_RUN} (no 'clip' rows in {path})"
    return (f"stage 3 β sweep, best CLIP two-way identification: {_fmt(best['mean'])} at β = {best.get('beta')} "
            f"({best.get('condition')}, {best.get('prompt')}; n = {best.get('n')})  [{path}]")


def encoding_line(run: Path) -> str:
    path = run / "summary.json"
    try:
        f1 = encoding_scores(path)
    except Unreadable as e:
        return f"encoding: unreadable ({e})"
    if f1 is None:
        return f"encoding integration-site F1: {NOT_RUN}"
    parts = [f"{name} {_fmt(v, digits=2)}" for name, v in f1.items()]
    return f"encoding integration-site F1: {', '.join(parts) if parts else NOT_RUN}  [{path}]"


def headline(root: Path, teachers: Path, stage1: Path | None = None, stage2: Path | None = None,
             sweep: Path | None = None, encoding: Path | None = None) -> str:
    """The demo's headline block (a string, so tests can check it without capturing stdout). The run folders
    default to `make demo`'s layout under ``root``."""
    lines = [f"demo headline numbers ({root}, teachers {teachers}):"]
    lines += ["  " + t for t in teacher_lines(teachers)]
    lines += ["  " + stage1_line(stage1 or root / "stage1"), "  " + stage2_line(stage2 or root / "stage2"),
              "  " + stage3_line(sweep or root / "beta_sweep"), "  " + encoding_line(encoding or root / "encoding")]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/demo_headline.py", description=__doc__.splitlines()[0])
    p.add_argument("--root", default="runs/demo", help="the demo's run folder (the Makefile's D)")
    p.add_argument("--teachers", default="teachers/phantom_demo", help="the demo's teacher folder")
    p.add_argument("--stage1", type=Path, default=None, help="stage-1 run folder (default <root>/stage1)")
    p.add_argument("--stage2", type=Path, default=None,
                   help="stage-2 run folder (default <root>/stage2; its shuffled control: a sibling <name>*shuffled*)")
    p.add_argument("--sweep", type=Path, default=None, help="β sweep folder (default <root>/beta_sweep)")
    p.add_argument("--encoding", type=Path, default=None, help="encoding output folder (default <root>/encoding)")
    a = p.parse_args(argv)
    print(headline(Path(a.root), Path(a.teachers), a.stage1, a.stage2, a.sweep, a.encoding))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
