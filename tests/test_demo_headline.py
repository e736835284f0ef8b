"""`make demo`'s closing headline: numbers read from the files the chain wrote, "not run" where one is absent."""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import demo_headline  # noqa: E402


def _table(path: Path, rows: list[tuple[str, str, float]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "step", "stage", "metric", "value"])
        for stage, metric, value in rows:
            w.writerow([0, 0, stage, metric, value])


def _demo_tree(tmp: Path) -> tuple[Path, Path]:
    root, teachers = tmp / "runs" / "demo", tmp / "teachers"
    fit = root / "stage1" / "tb" / "version_0" / "metrics_table.csv"
    _table(fit, [("val", "val/average/retrieval_fmri2img", 0.9)])
    test = root / "stage1" / "tb" / "version_1" / "metrics_table.csv"
    _table(test, [("test", "test/average/retrieval_fmri2img", 0.396), ("test", "test/single/retrieval_fmri2img", 0.35),
                  ("test", "test/average/retrieval_chance", 1 / 300)])
    os.utime(fit, (1, 1))  # the fit's table is the older one
    _table(root / "stage2" / "tb" / "version_2" / "metrics_table.csv",
           [("test", "test/average/caption/CIDEr", 0.4321), ("test", "test/single/caption/CIDEr", 0.3)])
    (root / "beta_sweep").mkdir(parents=True)
    with open(root / "beta_sweep" / "beta_table.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["beta", "prompt", "condition", "metric", "mean", "sd", "n"])
        w.writerows([[0.0, "no prompt", "average", "clip", 0.525, "", 1],
                     [0.3, "no prompt", "single", "clip", 0.85, "", 1],
                     [0.3, "no prompt", "average", "pixcorr", 0.95, "", 1]])
    (root / "encoding").mkdir(parents=True)
    (root / "encoding" / "summary.json").write_text(json.dumps(
        {"event_sets": {"language": {"f1": 0.94}, "vision": {"f1": 0.22}}, "all": {"f1": 0.6}}))
    teachers.mkdir()
    (teachers / "tiny_clip_metrics.json").write_text(json.dumps(
        {"steps": 300, "planned_steps": 300, "torch_threads": 2, "test": {"i2t_top1": 0.84}}))
    (teachers / "tiny_vae_metrics.json").write_text(json.dumps({"steps": 1800, "planned_steps": 1800,
                                                                "test": {"psnr_mean": 37.4}}))
    return root, teachers


def test_headline_reads_every_number_from_its_file(tmp_path: Path) -> None:
    root, teachers = _demo_tree(tmp_path)
    text = demo_headline.headline(root, teachers)
    assert "stage 1 test retrieval among 300: averaged 39.6 %, single 35.0 %" in text
    assert "version_1" in text  # the test command's table, not the fit's
    assert "brief-caption CIDEr: averaged 0.432, single 0.300" in text
    assert "shuffled-fMRI control: not run" in text
    assert "best CLIP two-way identification: 0.850 at β = 0.3 (single, no prompt" in text  # not pixcorr's 0.95
    assert "F1: language 0.94, vision 0.22, all 0.60" in text
    assert "tiny CLIP: 300 steps of 300, 2 thread(s); test image->caption top-1 84.0 %" in text
    assert "tiny VAE: 1800 steps of 1800; test PSNR 37.4 dB" in text
    assert "tiny unCLIP: not run" in text and "tiny LLM: not run" in text


def test_shuffled_control_is_read_when_run(tmp_path: Path) -> None:
    root, teachers = _demo_tree(tmp_path)
    _table(root / "stage2_shuffled" / "tb" / "version_0" / "metrics_table.csv",
           [("test", "test/average/caption/CIDEr", 0.05)])
    assert "shuffled-fMRI control: averaged 0.050, single not run" in demo_headline.headline(root, teachers)


def test_nothing_run_prints_not_run_and_a_bad_file_is_named(tmp_path: Path, capsys) -> None:
    assert demo_headline.main(["--root", str(tmp_path / "none"), "--teachers", str(tmp_path / "none")]) == 0
    out = capsys.readouterr().out
    assert out.count("not run") == 9 and "%" not in out
    root, teachers = _demo_tree(tmp_path)
    (root / "encoding" / "summary.json").write_text("{not json")
    text = demo_headline.headline(root, teachers)
    assert "encoding: unreadable (" in text and "summary.json" in text
    assert "averaged 39.6 %" in text  # the other numbers still print


def test_the_report_headline_shows_the_same_numbers(tmp_path: Path) -> None:
    """`make demo` prints these numbers and its report opens with them: one set of readers, one set of numbers."""
    import html
    import re

    from neurovision.runs.report import build_report

    root, teachers = _demo_tree(tmp_path)
    (root / "encoding" / "sites.csv").write_text("subject,electrode,integration\n1,a,true\n")  # `encode` writes it
    text = demo_headline.headline(root, teachers)
    page = build_report(root, progress=False)
    table = re.search(r'<table class="headline">(.*?)</table>', page, re.S)
    assert table is not None and page.index("<table") == page.index('<table class="headline">')
    rows = [[html.unescape(c) for c in re.findall(r"<td>(.*?)</td>", r)] for r in re.findall(r"<tr>(.*?)</tr>",
                                                                                              table.group(1), re.S)]
    values = {(r[0], r[2]): r[3] for r in rows if r}
    assert values[("stage 1", "test retrieval fMRI → image among 300 (average trials)")] == "39.6 %"
    assert values[("stage 1", "test retrieval fMRI → image among 300 (single trials)")] == "35.0 %"
    assert "averaged 39.6 %, single 35.0 %" in text
    assert values[("stage 2", "caption CIDEr (averaged / single)")] == "0.432 / 0.300"
    assert "CIDEr: averaged 0.432, single 0.300" in text
    best = next(v for (s, m), v in values.items() if s == "stage 3" and m.startswith("best β"))
    assert best == "β = 0.3" and "0.850 at β = 0.3" in text
    assert values[("stage 3", "scores at β = 0.3")] == "clip 0.850"  # the best setting's rows (single, no prompt)
    assert values[("encoding", "integration-site F1")] == "language 0.94, vision 0.22, all 0.60"
    assert "F1: language 0.94, vision 0.22, all 0.60" in text
