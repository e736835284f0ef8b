"""``neurovision encode -c experiments/encoding.yaml``: the encoding stage's command (the stage itself is
:mod:`neurovision.encoding.pipeline`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from neurovision.data.atomic import atomic_path
from neurovision.encoding.pipeline import (
    Encoder,
    Extraction,
    Integration,
    Pair,
    Regression,
    Statistics,
    instantiate_network,
)


def parser() -> Any:
    """The parser of ``neurovision encode`` (jsonargparse: YAML configs, dataclass groups)."""
    from jsonargparse import ActionConfigFile

    from neurovision.cli.habits import json_parser

    p = json_parser(prog="neurovision encode", description="fit encoding models and find integration sites")
    p.add_argument("-c", "--config", action=ActionConfigFile, help="YAML config (repeat to combine)")
    p.add_argument("--store", type=Path, required=True, help="the events store")
    p.add_argument("--models", type=dict[str, Any], required=True,
                   help="name -> {class_path, init_args} of a feature network")
    p.add_argument("--out", type=Path, default=Path("runs/encoding"))
    p.add_argument("--integration", type=Integration | None, default=None)
    p.add_argument("--pairs", type=list[Pair], default=[])
    p.add_argument("--event_sets", type=list[str], default=["language", "vision"])
    p.add_argument("--subjects", type=list[str] | None, default=None)
    p.add_argument("--cache", type=Path | None, default=None)
    p.add_argument("--regression", type=Regression, default=Regression())
    p.add_argument("--statistics", type=Statistics, default=Statistics())
    p.add_argument("--extraction", type=Extraction, default=Extraction())
    p.add_argument("--progress", type=bool, default=True)
    return p


def build(p: Any, cfg: Any) -> Encoder:
    """The :class:`Encoder` of a parsed config."""
    init = p.instantiate(cfg) if hasattr(p, "instantiate") else p.instantiate_classes(cfg)
    models = {name: instantiate_network(name, spec) for name, spec in init.models.items()}
    return Encoder(init.store, init.out, models, integration=init.integration, pairs=init.pairs,
                   event_sets=init.event_sets, subjects=init.subjects, cache=init.cache, regression=init.regression,
                   statistics=init.statistics, extraction=init.extraction, progress=init.progress)


def main(args: list[str]) -> int:
    """Run ``neurovision encode``; 0 on success, 2 (one error line naming the config file) on a bad config."""
    p = parser()
    try:
        cfg = p.parse_args(args)
    except Exception as e:  # name the config file that holds the bad key (each file alone must parse)
        configs = [args[i + 1] for i, a in enumerate(args[:-1]) if a in ("-c", "--config")]
        where = None
        for f in configs:
            try:
                parser().parse_args(["-c", f, "--store", "x", "--models", "{}"])
            except Exception:
                where = f
                break
        print(f"neurovision encode: error{f' in {where}' if where else ''}: {e}", file=sys.stderr)
        return 2
    enc = build(p, cfg)
    with atomic_path(enc.out / "config.yaml") as tmp:
        tmp.write_text(p.dump(cfg, skip_none=False))
    summary = enc.run()
    print(json.dumps({k: v for k, v in summary.items() if k in ("event_sets", "all")}, indent=2))
    print(f"encode: results in {enc.out} (sites.csv, layers.csv, summary.json, sites_brain.png, r_by_model.png)")
    return 0
