"""``neurovision report``: a self-contained HTML dashboard of a run or sweep directory (synthetic inputs)."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from neurovision.cli.report import main
from neurovision.runs.report import ReportError, write_report

CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))  # headless browser for the render test
BETAS = [0.0, 0.25, 0.5, 0.75, 1.0]
PROMPTS = ["null", "p.jsonl"]  # no prompt / the LLM's prompts file
HEADLINE_RETRIEVAL = {"average": 0.396, "single": 0.35}
SEEDS = [0, 1]
EVIL = "<script>alert('x')</script>"
IMG_RE = re.compile(r'<img src="data:(image/[a-z]+);base64,([A-Za-z0-9+/=]+)"')


def _png(path: Path, seed: int, kind: str = "plot") -> Path:
    from matplotlib.figure import Figure

    rng = np.random.default_rng(seed)
    fig = Figure(figsize=(3, 2))
    ax = fig.subplots()
    if kind == "grid":
        ax.imshow(rng.random((8, 16, 3)))
        ax.axis("off")
    else:
        ax.imshow(rng.normal(size=(10, 10)), cmap="RdBu_r")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=60)
    return path


def _write_csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def _sweep_results(rng: np.random.Generator) -> list[list[object]]:
    """A stage-3 β sweep's results.csv rows (run, seed, beta, prompts, metric, value), as `neurovision sweep`
    writes them for one-β-per-run runs."""
    rows: list[list[object]] = []
    for b in BETAS:
        for p in PROMPTS:
            for s in SEEDS:
                run = f"beta={b}__prompts={p}__seed={s}"
                clip = 0.8 - 0.4 * (b - 0.25) ** 2 + (0.05 if p != "null" else 0.0) + rng.normal(0, 0.02)
                ssim = 0.2 + 0.3 * b + rng.normal(0, 0.02)
                rows += [[run, s, b, p, "test/average/clip", clip], [run, s, b, p, "test/average/ssim", ssim]]
    return rows


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """``project/run`` (a LightningCLI run) and ``project/sweep`` (a β sweep), synthetic."""
    rng = np.random.default_rng(0)
    root = tmp_path / "project"
    run = root / "run" / "tb" / "version_0"
    rows: list[list[object]] = []
    for epoch in range(4):
        step = 10 * (epoch + 1)
        rows.append([epoch, step, "val", "lr-AdamW", 1e-3])
        rows.append([epoch, step, "val", "train/loss", 1.0 / (epoch + 1)])
        for g in ("average", "average/sub-01", "average/sub-02"):
            rows.append([epoch, step, "val", f"val/{g}/retrieval_fmri2img", 0.2 + 0.1 * epoch + rng.normal(0, 0.01)])
            rows.append([epoch, step, "val", f"val/{g}/retrieval_chance", 0.05])
            rows.append([epoch, step, "val", f"val/{g}/clip_cosine", 0.5 + 0.05 * epoch])
    for sub, base in (("sub-01", 0.61), ("sub-02", 0.73)):
        rows.append([3, 40, "test", f"test/{sub}/retrieval_fmri2img", base - 0.5])  # superseded below
        rows.append([3, 40, "test", f"test/{sub}/retrieval_fmri2img", base])
        rows.append([3, 40, "test", f"test/{sub}/clip_cosine", base / 2])
    rows.append([3, 40, "test", "test/single/a<b>&c", 0.125])
    for cond, v in HEADLINE_RETRIEVAL.items():
        rows.append([3, 40, "test", f"test/{cond}/retrieval_fmri2img", v])
        rows.append([3, 40, "test", f"test/{cond}/retrieval_chance", 1 / 300])
    _write_csv(run / "metrics_table.csv", ["epoch", "step", "stage", "metric", "value"], rows)
    (run / "config.yaml").write_text(f"seed_everything: 0\nmodel:\n  note: \"{EVIL}\"\n  lr: 0.001\n")
    cm = run / "concept_maps"
    _png(cm / "sub-01" / "dog.png", 1)
    _write_csv(cm / "concept_r.csv", ["subject", "concept", "r", "r_abs"],
               [["sub-01", "dog", 0.5, 0.5], ["sub-02", "dog", 0.25, 0.3], ["sub-01", "car", -0.1, 0.2]])
    gens = [{"subject_name": "sub-01", "prompt": "Describe the image.", "prediction": f"a <b>dog</b> #{i}",
             "references": ["a dog", "a puppy"]} for i in range(12)]
    (run / "test_generations_average.jsonl").write_text("".join(json.dumps(g) + "\n" for g in gens))

    sweep = root / "sweep"
    _write_csv(sweep / "results.csv", ["run", "seed", "beta", "prompts", "metric", "value"], _sweep_results(rng))
    _summary_from_results(sweep / "results.csv", sweep / "summary.csv")
    for r in {row[0] for row in _sweep_results(np.random.default_rng(0))}:
        (sweep / str(r)).mkdir(parents=True, exist_ok=True)
        (sweep / str(r) / "status.json").write_text(json.dumps({"state": "done"}))
    from neurovision.runs.beta_figures import figures

    figures(sweep)  # the stage's own figures (beta_table.csv, beta_curves.png): the report embeds them
    _png(root / "recon" / "recon_grid.png", 2, kind="grid")
    return root


def _summary_from_results(results: Path, out: Path) -> None:
    groups: dict[tuple[str, str, str], list[float]] = {}
    with open(results, newline="") as f:
        for r in csv.DictReader(f):
            groups.setdefault((r["beta"], r["prompts"], r["metric"]), []).append(float(r["value"]))
    _write_csv(out, ["beta", "prompts", "metric", "mean", "sd", "n"],
               [[*k, float(np.mean(v)), float(np.std(v, ddof=1)), len(v)] for k, v in groups.items()])


def _expected_cell(results: Path, beta: float, prompt: str, metric: str) -> str:
    """``mean ± sd (n)`` computed here, independently of the report code."""
    with open(results, newline="") as f:
        v = [float(r["value"]) for r in csv.DictReader(f)
             if float(r["beta"]) == beta and r["prompts"] == prompt and r["metric"] == metric]
    return f"{np.mean(v):.4g} ± {np.std(v, ddof=1):.4g} ({len(v)})"


def _images(text: str) -> list[tuple[str, bytes]]:
    return [(mime, base64.b64decode(b64)) for mime, b64 in IMG_RE.findall(text)]


def _headline(text: str) -> list[list[str]]:
    m = re.search(r'<table class="headline">(.*?)</table>', text, re.S)
    assert m is not None
    return [[html.unescape(c) for c in re.findall(r"<t[dh]>(.*?)</t[dh]>", row)]
            for row in re.findall(r"<tr>(.*?)</tr>", m.group(1), re.S)]


def _h2(text: str) -> list[str]:
    return [html.unescape(t) for t in re.findall(r"<h2[^>]*>([^<]+)</h2>", text)]


def test_report_contents(project: Path) -> None:
    from PIL import Image

    out = write_report(project, progress=False)
    assert out == project / "report.html"
    assert not list(project.glob(".report.html.*"))  # atomic write: no temp left
    text = out.read_text(encoding="utf-8")
    assert "<h1>neurovision report: project</h1>" in text and "created 20" in text

    # summary first: the headline is the page's first table, then the key figures, the stages, the run index
    assert text.index("<table") == text.index('<table class="headline">')
    assert text.index('<table class="headline">') < text.index('<nav class="toc">') < text.index("<h2 id=\"stage-1")
    assert _h2(text)[0] == "Headline" and _h2(text)[-1] == "Run index"
    assert _h2(text).index("Stage 1: fMRI → CLIP / VAE alignment") < _h2(text).index("Stage 3: reconstruction (β sweep)")
    rows = {(r[0], r[2]): r for r in _headline(text)[1:]}
    for cond, v in HEADLINE_RETRIEVAL.items():
        r = rows[("stage 1", f"test retrieval fMRI → image among 300 ({cond} trials)")]
        assert r[1] == "run" and r[3] == f"{100 * v:.1f} %" and r[4] == "run/tb/version_0/metrics_table.csv"
    # stage 3: the best β by mean CLIP identification over seeds, computed here from results.csv
    res = pd.read_csv(project / "sweep" / "results.csv")
    clip = res[res.metric == "test/average/clip"].groupby(["beta", "prompts"]).value.mean()
    (beta, prompt), best = clip.idxmax(), clip.max()
    stage3 = [r for r in _headline(text) if r[0] == "stage 3"]
    setting = "no prompt" if prompt == "null" else "LLM prompt"
    assert stage3[0][3] == f"β = {beta}" and f"(average, {setting}; n = 2)" in stage3[0][2]
    assert f"clip {best:.3f}" in stage3[1][3]
    r_mean = float(np.mean([0.5, 0.25, -0.1]))  # concept_r.csv's r column
    assert rows[("localisation", "concept-map r (mean of 3 maps)")][3] == f"{r_mean:.3f}"

    # key figures: the stage's own PNGs, embedded byte for byte (not redrawn)
    curves = re.search(r'<figure class="fig key-figure" data-file="sweep/beta_curves.png"><img src="data:image/png;'
                       r'base64,([^"]+)"', text)
    assert curves is not None
    assert base64.b64decode(curves.group(1)) == (project / "sweep" / "beta_curves.png").read_bytes()
    assert text.index("sweep/beta_curves.png") < text.index("<h2 id=\"stage-1")
    assert text.count('data-file="sweep/beta_curves.png"') == 1  # once

    # the sweep's summary.csv as it is: mean ± sd (n) computed here, independently of the sweep and the report
    for metric in ("test/average/clip", "test/average/ssim"):
        for beta, prompt in ((0.0, PROMPTS[0]), (0.75, PROMPTS[1])):
            assert html.escape(_expected_cell(project / "sweep" / "results.csv", beta, prompt, metric)) in text

    # run: final test metrics (the last value of a repeated metric), pivoted subject x metric; val curves
    final = re.search(r'<table class="final-test">.*?</table>', text, re.S)
    assert final is not None
    t = final.group(0)
    assert "<th>sub-01</th><td>0.61</td><td>0.305</td>" in t and "<th>sub-02</th><td>0.73</td><td>0.365</td>" in t
    assert "0.11" not in t  # the superseded value
    val = set(re.findall(r'<figure class="fig val-curve" data-metric="([^"]+)"><img', text))
    assert val == {"val/retrieval_fmri2img", "val/clip_cosine", "train"}  # retrieval_chance folded into retrieval

    # config (collapsible), concept r table, images, generations
    assert '<details class="config"><summary>run/tb/version_0/config.yaml</summary>' in text
    assert "seed_everything: 0" in text
    assert re.search(r"<th>dog</th><td>0.5</td><td>0.25</td><td>0.375</td>", text)
    assert 'data-file="run/tb/version_0/concept_maps/sub-01/dog.png"' in text
    assert 'class="fig file-concepts"' in text and 'class="fig file-grids"' in text
    assert "(first 10 of 12 rows)" in text and "a &lt;b&gt;dog&lt;/b&gt; #9" in text and "#10" not in text
    assert "a dog | a puppy" in text

    # run index: every run folder with its stage and tables; the sweep's per-run table
    index = text[text.index('<h2 id="run-index">'):]
    assert "<td>run</td><td>Stage 1</td>" in index.replace("<th>run</th>", "<td>run</td>")
    assert "sweep/results.csv: per-run results (20 runs, 20 rows)" in index

    # everything escaped: neither the config's nor the metric name's markup is raw
    assert "<script" not in text.lower()
    assert EVIL not in text and EVIL in html.unescape(text)  # shown, as text
    assert "a<b>&c" not in text and "a&lt;b&gt;&amp;c" in text
    assert "<b>dog" not in text

    # every embedded image decodes: 1 key figure (the β curves; no β grid: the fixture has no reconstructions)
    # + 3 val figures + 1 concept map + 1 grid
    imgs = _images(text)
    assert len(imgs) == len(re.findall(r"<img ", text)) == 6
    for mime, data in imgs:
        assert mime == "image/png"
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            assert im.width > 50 and im.height > 50


def test_sweep_without_summary_and_cli(project: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sweep = project / "sweep"
    (sweep / "summary.csv").unlink()
    out = tmp_path / "elsewhere" / "sweep.html"
    assert main([str(sweep), "--out", str(out), "--quiet"]) == 0
    assert str(out) in capsys.readouterr().out
    text = out.read_text(encoding="utf-8")
    assert "no summary.csv: the per-run results.csv only" in text  # not re-aggregated here
    assert "± " not in text
    assert '<table class="sweep-runs">' in text and "beta=0.25__prompts=p.jsonl__seed=1" in text
    assert text.index("<table") == text.index('<table class="headline">')
    assert _headline(text)[1][0] == "stage 3"  # from the β sweep's beta_table.csv
    assert text.count('class="fig key-figure"') == 1
    assert "Run" not in _h2(text) and "Stage 1: fMRI → CLIP / VAE alignment" not in _h2(text)
    assert not (sweep / "report.html").exists()


def test_unreadable_input_is_a_note(tmp_path: Path) -> None:
    run = tmp_path / "broken_run"
    run.mkdir()
    (run / "metrics_table.csv").write_text("")  # e.g. a run killed before its first validation
    (run / "config.yaml").write_text("trainer:\n  max_epochs: 3\n")
    (run / "test_generations_single.jsonl").write_text('{"prediction": "ok"}\nnot json\n')
    text = write_report(run, progress=False).read_text(encoding="utf-8")
    assert "run: broken_run" in text  # the root's own name, not "."
    assert 'class="note error">could not read metrics_table.csv: EmptyDataError' in text
    assert "max_epochs: 3" in text
    assert "(first 2 of 2 rows)" in text and "not json" in text


def test_empty_dir_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty_dir"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "notes.txt").write_text("nothing here")
    with pytest.raises(ReportError, match=r"empty_dir: nothing to report"):
        write_report(empty, progress=False)
    assert not (empty / "report.html").exists() and not list(empty.glob(".report.html*"))
    assert main([str(empty), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("neurovision report: error: ") and str(empty) in err
    assert main([str(tmp_path / "missing"), "--quiet"]) == 1
    assert "no such directory" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- headless Chromium

# Set after the load event (all images decoded or failed): per image complete, natural size and page rect; per
# table (document order) its class and its top on the page.
PROBE = """<script>
window.addEventListener('load', function () {
  var r = Array.prototype.map.call(document.images, function (im) {
    var b = im.getBoundingClientRect();
    return {ok: im.complete && im.naturalWidth > 0, w: im.naturalWidth, h: im.naturalHeight,
            x: b.left + window.scrollX, y: b.top + window.scrollY, cw: b.width, ch: b.height};
  });
  var t = Array.prototype.map.call(document.querySelectorAll('table'), function (tb) {
    var b = tb.getBoundingClientRect();
    return {cls: tb.className, y: b.top + window.scrollY, h: b.height, rows: tb.rows.length};
  });
  var pre = document.createElement('pre');
  pre.id = 'probe';
  pre.textContent = JSON.stringify({images: r, tables: t});
  document.body.appendChild(pre);
});
</script>"""
SCREENSHOT = os.environ.get("NEUROVISION_REPORT_SCREENSHOT")  # opt-in: keep the screenshot (docs/img/report.png)
SCREENSHOT_OF = os.environ.get("NEUROVISION_REPORT_DIR")  # ... of this run folder's report (default: the fixture's)


def _chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    profile = tmp / f"profile{len(list(tmp.glob('profile*')))}"
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", "--hide-scrollbars", "--force-device-scale-factor=1",
           f"--user-data-dir={profile}", "--window-size=1200,2400", *args]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)
    finally:
        shutil.rmtree(profile, ignore_errors=True)


@pytest.mark.skipif(not CHROMIUM.exists(), reason=f"needs headless Chromium at {CHROMIUM}: "
                    "`apt-get install -y chromium` (Debian; CI's .ci/run installs it)")
@pytest.mark.timeout(300)
def test_report_renders_in_chromium(project: Path, tmp_path: Path) -> None:
    from PIL import Image

    source = Path(SCREENSHOT_OF) if SCREENSHOT_OF else project
    report = write_report(source, tmp_path / "report.html", progress=False)
    text = report.read_text(encoding="utf-8")
    embedded: list[Image.Image] = []
    for _, data in _images(text):
        with Image.open(io.BytesIO(data)) as png:
            embedded.append(png.convert("RGB"))

    # 1. the browser decoded every image at its real size (a probe script added to a copy of the page)
    probe_page = tmp_path / "probe.html"
    probe_page.write_text(text.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    dom = _chromium(tmp_path, "--virtual-time-budget=10000", "--dump-dom", probe_page.as_uri()).stdout
    m = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert m is not None, f"probe did not run; DOM tail: {dom[-500:]!r}"
    found = json.loads(html.unescape(m.group(1)))
    probe, tables = found["images"], found["tables"]
    assert len(probe) == len(embedded) == len(re.findall(r"<img ", text)) >= (6 if source == project else 1)
    # the headline table is the first table of the rendered page, and the topmost, with one row per number
    assert tables[0]["cls"] == "headline" and tables[0]["rows"] == len(_headline(text)) >= 2
    assert all(t["y"] > tables[0]["y"] + tables[0]["h"] for t in tables[1:])
    for p, im in zip(probe, embedded, strict=True):
        assert p["ok"] and (p["w"], p["h"]) == im.size, p
        assert p["cw"] > 50 and p["ch"] > 30, p  # laid out with a visible size

    # 2. a screenshot of the report itself (no probe): not blank, and where the probe saw the images the
    #    pixels are those images (correlation with the embedded PNG scaled to the on-screen box)
    shot = tmp_path / "shot.png"
    _chromium(tmp_path, f"--screenshot={shot}", report.as_uri())
    assert shot.is_file() and shot.stat().st_size > 10_000
    with Image.open(shot) as s:
        page = np.asarray(s.convert("RGB"), dtype=np.float32)
    assert page.shape[:2] == (2400, 1200)
    assert page.std() > 10
    checked = 0
    for p, im in zip(probe, embedded, strict=True):
        x0, y0, x1, y1 = (round(v) for v in (p["x"], p["y"], p["x"] + p["cw"], p["y"] + p["ch"]))
        if y1 > page.shape[0] - 2 or x1 > page.shape[1] - 2:
            continue  # below the screenshot's window
        crop = page[y0 + 2:y1 - 2, x0 + 2:x1 - 2]
        ref = np.asarray(im.resize((x1 - x0, y1 - y0), Image.Resampling.BILINEAR), dtype=np.float32)[2:-2, 2:-2]
        assert (crop < 200).any(axis=-1).mean() > 0.01  # not a white box
        r = np.corrcoef(crop.ravel(), ref.ravel())[0, 1]
        assert r > 0.8, (p, r)
        checked += 1
    assert checked >= (2 if source == project else 1)  # at least the key figures are in the first 2400 px
    if SCREENSHOT:
        _save_screenshot(shot, Path(SCREENSHOT))


def _save_screenshot(shot: Path, dest: Path, height: int = 1500, colours: int = 128) -> None:
    """The top of the page (headline, key figures), quantised to a palette so the PNG stays small for the docs."""
    from PIL import Image

    with Image.open(shot) as page:
        top = page.convert("RGB").crop((0, 0, page.width, min(height, page.height)))
    dest.parent.mkdir(parents=True, exist_ok=True)
    top.quantize(colors=colours, method=Image.Quantize.MEDIANCUT).save(dest, optimize=True)
