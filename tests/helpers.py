"""Helpers shared by the test modules (not fixtures)."""

from __future__ import annotations

from neurovision.cli import main

TINY_CLIP = {  # a random-weight open_clip model config (nothing downloaded)
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def run_dirs(d) -> list[str]:
    """CLI options sending a run's logs and checkpoints under ``d`` (no progress bar, no model summary)."""
    return [f"--trainer.default_root_dir={d}", f"--trainer.logger.init_args.save_dir={d}",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def last_version(d):
    """The newest ``<d>/tb/version_N`` folder."""
    return sorted((d / "tb").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))[-1]


def run_cli(args: list[str]) -> int:
    """``neurovision <args>`` in-process; the exit code (LightningCLI/jsonargparse exit via SystemExit)."""
    try:
        return main(args)
    except SystemExit as e:
        return int(e.code or 0)


def np_two_way(p, t) -> float:
    """Two-way identification by a plain double loop over numpy arrays (the reference of the metric tests)."""
    import numpy as np

    n = len(p)
    wins = []
    for i in range(n):
        r_ii = np.corrcoef(p[i], t[i])[0, 1]
        wins.append(np.mean([r_ii > np.corrcoef(p[i], t[j])[0, 1] for j in range(n) if j != i]))
    return float(np.mean(wins))
