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
import pytest

from neurovision.runs.report import ReportError, main, write_report

CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))  # headless browser for the render test
BETAS = [0.0, 0.25, 0.5, 0.75, 1.0]
PROMPTS = ["on", "off"]
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
    rows: list[list[object]] = []
    for b in BETAS:
        for p in PROMPTS:
            for s in SEEDS:
                run = f"beta{b}_prompt{p}_seed{s}"
                clip = 0.8 - 0.4 * b + (0.05 if p == "on" else 0.0) + rng.normal(0, 0.02)
                ssim = 0.2 + 0.3 * b + rng.normal(0, 0.02)
                rows += [[run, s, b, p, "clip_score", clip], [run, s, b, p, "ssim", ssim]]
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
    _write_csv(sweep / "results.csv", ["run", "seed", "beta", "prompt", "metric", "value"], _sweep_results(rng))
    _summary_from_results(sweep / "results.csv", sweep / "summary.csv")
    _png(sweep / "beta0.5_prompton_seed0" / "recon_grid.png", 2, kind="grid")
    return root


def _summary_from_results(results: Path, out: Path) -> None:
    groups: dict[tuple[str, str, str], list[float]] = {}
    with open(results, newline="") as f:
        for r in csv.DictReader(f):
            groups.setdefault((r["beta"], r["prompt"], r["metric"]), []).append(float(r["value"]))
    _write_csv(out, ["beta", "prompt", "metric", "mean", "sd", "n"],
               [[*k, float(np.mean(v)), float(np.std(v, ddof=1)), len(v)] for k, v in groups.items()])


def _expected_cell(results: Path, beta: float, prompt: str, metric: str) -> str:
    """``mean ± sd (n)`` computed here, independently of the report code."""
    with open(results, newline="") as f:
        v = [float(r["value"]) for r in csv.DictReader(f)
             if float(r["beta"]) == beta and r["prompt"] == prompt and r["metric"] == metric]
    return f"{np.mean(v):.4g} ± {np.std(v, ddof=1):.4g} ({len(v)})"


def _images(text: str) -> list[tuple[str, bytes]]:
    return [(mime, base64.b64decode(b64)) for mime, b64 in IMG_RE.findall(text)]


def test_report_contents(project: Path) -> None:
    from PIL import Image

    out = write_report(project, progress=False)
    assert out == project / "report.html"
    assert not list(project.glob(".report.html.*"))  # atomic write: no temp left
    text = out.read_text(encoding="utf-8")
    assert "<h1>neurovision report: project</h1>" in text and "created 20" in text
    assert '<nav class="toc">' in text and 'href="#sweep"' in text and 'href="#run"' in text

    # sweep summary table: mean ± sd (n) as computed here, and one β curve per metric
    for metric in ("clip_score", "ssim"):
        for beta, prompt in ((0.0, "on"), (0.75, "off")):
            assert html.escape(_expected_cell(project / "sweep" / "results.csv", beta, prompt, metric)) in text
    beta_figs = re.findall(r'<figure class="fig beta-curve" data-metric="([^"]+)"><img src="data:image/png;base64,',
                           text)
    assert sorted(beta_figs) == ["clip_score", "ssim"]

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

    # everything escaped: neither the config's nor the metric name's markup is raw
    assert "<script" not in text.lower()
    assert html.escape(EVIL) in text
    assert "a<b>&c" not in text and "a&lt;b&gt;&amp;c" in text
    assert "<b>dog" not in text

    # every embedded image decodes; 2 β curves + 3 val figures + 1 concept map + 1 grid
    imgs = _images(text)
    assert len(imgs) == len(re.findall(r"<img ", text)) == 7
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
    assert html.escape(_expected_cell(sweep / "results.csv", 0.25, "on", "clip_score")) in text
    assert "results.csv (summarised here" in text
    assert len(re.findall(r'class="fig beta-curve"', text)) == 2
    assert "Run" not in re.findall(r"<h2[^>]*>([^<]+)</h2>", text)
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

# Set after the load event (all images decoded or failed): per image complete, natural size and page rect.
PROBE = """<script>
window.addEventListener('load', function () {
  var r = Array.prototype.map.call(document.images, function (im) {
    var b = im.getBoundingClientRect();
    return {ok: im.complete && im.naturalWidth > 0, w: im.naturalWidth, h: im.naturalHeight,
            x: b.left + window.scrollX, y: b.top + window.scrollY, cw: b.width, ch: b.height};
  });
  var pre = document.createElement('pre');
  pre.id = 'probe';
  pre.textContent = JSON.stringify(r);
  document.body.appendChild(pre);
});
</script>"""


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

    report = write_report(project, progress=False)
    text = report.read_text(encoding="utf-8")
    embedded = []
    for _, data in _images(text):
        with Image.open(io.BytesIO(data)) as im:
            embedded.append(im.convert("RGB"))

    # 1. the browser decoded every image at its real size (a probe script added to a copy of the page)
    probe_page = tmp_path / "probe.html"
    probe_page.write_text(text.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    dom = _chromium(tmp_path, "--virtual-time-budget=10000", "--dump-dom", probe_page.as_uri()).stdout
    m = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert m is not None, f"probe did not run; DOM tail: {dom[-500:]!r}"
    probe = json.loads(html.unescape(m.group(1)))
    assert len(probe) == len(embedded) == 7
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
        ref = np.asarray(im.resize((x1 - x0, y1 - y0), Image.BILINEAR), dtype=np.float32)[2:-2, 2:-2]
        assert (crop < 200).any(axis=-1).mean() > 0.01  # not a white box
        r = np.corrcoef(crop.ravel(), ref.ravel())[0, 1]
        assert r > 0.8, (p, r)
        checked += 1
    assert checked >= 2  # at least the β curves are in the first 2400 px
