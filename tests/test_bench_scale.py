"""The scale rehearsal (benchmarks/bench_scale.py, issue 17): JSON schema of a smoke run, projections that follow
the measurements, the node-fit rule and the measuring helpers. Structure and arithmetic only, never speed."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from benchmarks.scale import common, rows_data
from benchmarks.scale.common import PROJECTED_KEYS, Row, Scale

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_scale.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_scale", BENCH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _check_schema(res: dict, stages: list[str]) -> None:
    assert res["node"]["gpus"] == 8 and res["node"]["gpu_mem_gb"] == 80 and res["node"]["ram_gb"] == 512
    assert [r["stage"] for r in res["rows"]] == stages
    for r in res["rows"]:
        assert set(r["projected"]) == set(PROJECTED_KEYS), r["stage"]
        assert all(isinstance(v, float) and math.isfinite(v) and v >= 0 for v in r["projected"].values())
        assert r["measured"]["seconds"] > 0 and r["measured"]["peak_rss_gb"] > 0
        assert isinstance(r["fits_node"], bool) and isinstance(r["what"], str) and r["what"]
        assert r["arithmetic"] and all(isinstance(s, str) and s for s in r["arithmetic"])
    t = res["total"]
    assert t["decoding_gpu_hours"] == pytest.approx(sum(r["projected"]["gpu_hours"] for r in res["rows"]
                                                        if r["stage"] in t["decoding_rows"]))


def test_bench_scale_smoke(tmp_path: Path) -> None:
    """prepare + the encoding bootstrap at the smoke size: the real code paths, the JSON the issue specifies."""
    out = tmp_path / "results" / "scale.json"
    _bench().main(["--smoke", "--rows", "prepare,encoding_bootstrap", "--workdir", str(tmp_path / "work"),
                   "--json", str(out), "--no-progress"])
    res = json.loads(out.read_text())
    _check_schema(res, ["prepare", "encoding_bootstrap"])
    assert res["config"]["size"] == "smoke" and res["not_built"] == [] and res["failed"] == {}
    assert res["total"]["decoding_rows"] == ["prepare"] and not res["total"]["decoding_complete"]
    assert not res["total"]["decoding_within_target"]  # never claimed on a partial table
    prep = res["rows"][0]
    m, p = prep["measured"], prep["projected"]
    # the true geometry went through prepare nsd
    assert m["grid"] == list(Scale.grid) and m["active_patches"] == Scale.active_patches
    assert m["values_per_trial"] == 78 * 14**3 == Scale.values_per_trial
    assert m["store_bytes_per_trial"] == pytest.approx(Scale.values_per_trial * 2 + 4)  # float16 + fletcher32, a chunk a trial
    assert m["image_bytes"] == 425 * 425 * 3 + 4  # + its fletcher32 checksum
    assert abs(m["roi_voxels"] - Scale.roi_voxels) < 200
    # projections from those measurements
    assert p["cpu_core_hours"] == pytest.approx(m["cpu_ms_per_trial"] / 1e3 * Scale.trials / 3600)
    assert p["disk_gb"] == pytest.approx((m["store_bytes_per_trial"] * Scale.trials
                                         + m["image_bytes"] * Scale.images) / 1e9)
    assert p["ram_gb"] > m["peak_rss_gb"]  # + the trials of a 750-trial session the smoke size did not hold
    boot = res["rows"][1]
    assert boot["measured"]["targets"] == boot["measured"]["sites"] * Scale.bt_bins
    assert boot["projected"]["gpu_hours"] > 0


def _fake_isolated(results: dict[str, list[dict]]):
    """run_isolated stand-in: canned (result, seconds, peak RSS) by the called function's name, in call order."""
    queues = {k: list(v) for k, v in results.items()}

    def run(fn, *args, **kwargs):
        q = queues[fn.__name__]
        res = dict(q.pop(0) if len(q) > 1 else q[0])
        return res, 1.0, res.pop("_peak", 1.0)

    return run


def _prepare_results(seconds: float, patch_bytes: int, peak: float) -> dict[str, list[dict]]:
    one = {"seconds": seconds / 2, "cpu_seconds": seconds / 2, "base_rss_gb": 0.3, "trials": 10, "active_patches": 78, "values_per_trial": 214032,
           "patch_bytes": patch_bytes // 2, "images": 4, "image_bytes": 4 * 1000, "file_bytes": 1,
           "grid": [81, 104, 83], "_peak": peak}
    two = {**one, "seconds": seconds, "cpu_seconds": seconds, "trials": 20, "patch_bytes": patch_bytes}
    return {"make_nsd_geometry": [{"roi_voxels": 15000}], "_prepare_store": [one, two]}


def test_prepare_projection_follows_measurement(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    args = SimpleNamespace(quick=True, smoke=True, workdir=tmp_path, seed=0, progress=False)
    rows = []
    for seconds, nbytes, peak in ((2.0, 20 * 400_000, 1.0), (4.0, 20 * 800_000, 2.0)):
        monkeypatch.setattr(rows_data, "run_isolated", _fake_isolated(_prepare_results(seconds, nbytes, peak)))
        rows.append(rows_data.row_prepare(args))
    a, b = rows
    assert a.measured["ms_per_trial"] == pytest.approx(100.0)
    assert a.projected["cpu_core_hours"] == pytest.approx(0.1 * Scale.trials / 3600)
    assert b.projected["cpu_core_hours"] == pytest.approx(2 * a.projected["cpu_core_hours"])  # twice the time
    image_gb = 1000 * Scale.images / 1e9
    assert b.projected["disk_gb"] - image_gb == pytest.approx(2 * (a.projected["disk_gb"] - image_gb))
    assert b.projected["ram_gb"] - a.projected["ram_gb"] == pytest.approx(1.0)  # the peak moved by 1 GB
    assert a.measured["scaling_exponent"] == pytest.approx(1.0)


def test_encoding_fit_projection_follows_counted_flops(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    args = SimpleNamespace(quick=True, smoke=True, workdir=tmp_path, seed=0, progress=False)

    def canned(scale: float) -> dict[str, list[dict]]:
        run = {"seconds": 1.0, "flops": scale * 1e9, "base_rss_gb": 0.3, "blas_flops_per_s": 1e10, "mean_r": 0.1,
               "threads": 2}
        return {"_encoding_fit_pair": [{"runs": [run, {**run, "seconds": 2.0, "flops": scale * 1.5e9}]}]}

    rows = []
    for scale in (1.0, 2.0):
        monkeypatch.setattr(rows_data, "run_isolated", _fake_isolated(canned(scale)))
        rows.append(rows_data.row_encoding_fit(args))
    a, b = rows
    # twice the counted FLOPs: the cost model's counted part of the projection doubles (it is scaled by the
    # measured / model ratios); the uncounted decompositions and the banded baseline (analytic) do not move
    assert b.measured["model_ratio_fixed"] == pytest.approx(2 * a.measured["model_ratio_fixed"])
    assert b.measured["model_ratio_per_target"] == pytest.approx(2 * a.measured["model_ratio_per_target"])
    fx, pt, _, _ = rows_data._downdate_flops(Scale.bt_events_per_subject, rows_data.ENC_FEATURES)
    counted = (fx * a.measured["model_ratio_fixed"] + pt * a.measured["model_ratio_per_target"]
               * Scale.bt_targets_per_subject)
    jobs = Scale.bt_subjects * rows_data.ENC_SETS * rows_data.ENC_MODELS
    assert b.projected["gpu_hours"] - a.projected["gpu_hours"] == pytest.approx(
        common.gpu_hours(jobs * counted, tflops=rows_data.A100_FP32_TFLOPS))
    assert a.measured["scaling_exponent"] == pytest.approx(math.log(1.5) / math.log(2))  # from the FLOPs
    assert a.measured["time_exponent"] == pytest.approx(1.0)


def test_encoding_fit_cost_model_matches_counted_flops() -> None:
    """The cost model of the default inner CV (which the projection scales) equals the FLOPs FlopCounterMode
    counts, in both regimes (held-out blocks smaller and larger than the feature count; p > n)."""
    import numpy as np

    from neurovision.encoding.ridge import cross_validated_ridge

    rng = np.random.default_rng(0)
    for events, features in ((400, 16), (200, 64), (60, 80)):
        x = rng.standard_normal((events, features), dtype=np.float32)
        counted = []
        for targets in (4, 8):
            y = rng.standard_normal((events, targets), dtype=np.float32)
            counted.append(common.count_flops(cross_validated_ridge, x, y, folds=rows_data.ENC_FOLDS,
                                              inner_folds=rows_data.ENC_INNER, backend="torch")[1])
        fixed, per_t, _, _ = rows_data._downdate_flops(events, features)
        assert counted[1] - counted[0] == pytest.approx(4 * per_t)
        assert counted[0] == pytest.approx(fixed + 4 * per_t)


def test_fits_rule() -> None:
    ok = Row("x", "y", {"seconds": 1.0, "peak_rss_gb": 1.0}, common.projected(ram_gb=500, gpu_mem_gb=80,
                                                                              disk_gb=2000), [], True)
    assert common.fits(ok) and common.misfits(ok) == []
    for kw, word in ((dict(ram_gb=513), "RAM"), (dict(gpu_mem_gb=81), "GPU memory"), (dict(disk_gb=2001), "disk")):
        r = Row("x", "y", {"seconds": 1.0, "peak_rss_gb": 1.0}, common.projected(**kw), [], True)
        assert not common.fits(r) and word in common.misfits(r)[0]
    steep = Row("x", "y", {"seconds": 1.0, "peak_rss_gb": 1.0, "scaling_exponent": 1.3}, common.projected(), [], True)
    assert not common.fits(steep) and "scaling_exponent" in common.misfits(steep)[0]
    with pytest.raises(ValueError, match="projected keys"):
        Row("x", "y", {"seconds": 1.0, "peak_rss_gb": 1.0}, {"ram_gb": 1.0}, [], True)
    with pytest.raises(ValueError, match="peak_rss_gb"):
        Row("x", "y", {"seconds": 1.0}, common.projected(), [], True)
    assert common.scaling_exponent(10, 3.0, 20, 6.0) == pytest.approx(1.0)
    # 1 PFLOP at 40% of 312 TFLOPS
    assert common.gpu_hours(1e15) == pytest.approx(1e15 / (0.4 * 312e12) / 3600)


def test_count_flops_and_peak_memory_on_meta() -> None:
    import torch

    a = torch.empty(64, 32, device="meta")
    b = torch.empty(32, 16, device="meta")
    _, flops = common.count_flops(torch.matmul, a, b)
    assert flops == 2 * 64 * 32 * 16

    def two_temporaries():
        x = a @ b            # 64 x 16 float32: 4096 B, freed at return
        y = x.relu()         # another 4096 B
        return y.sum()

    _, peak = common.peak_memory_meta(two_temporaries)
    assert peak == 2 * 64 * 16 * 4 + 4  # both alive at once, + the scalar
    _, peak_view = common.peak_memory_meta(lambda: (a @ b).view(-1))
    assert peak_view == 64 * 16 * 4  # a view adds nothing


def test_driver_reports_unbuilt_rows_without_numbers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    bench = _bench()
    monkeypatch.setattr(bench, "load_rows", lambda: ({}, {"rows_models": "ImportError: absent"}))
    out = tmp_path / "scale.json"
    res = bench.main(["--rows", "stage2_train,stage3_sweep", "--workdir", str(tmp_path), "--json", str(out)])
    assert res["rows"] == [] and res["not_built"] == ["stage2_train", "stage3_sweep"]
    assert res["total"]["decoding_gpu_hours"] == 0 and not res["total"]["all_fit"]
    assert json.loads(out.read_text())["not_built"] == ["stage2_train", "stage3_sweep"]
    with pytest.raises(SystemExit, match="unknown row"):
        bench.main(["--rows", "stage9", "--workdir", str(tmp_path), "--json", str(out)])


@pytest.mark.slow
def test_bench_scale_quick(tmp_path: Path) -> None:
    """Every row at the --quick size (minutes): all present (or reported as not built), the schema holds."""
    out = tmp_path / "scale.json"
    res = _bench().main(["--quick", "--workdir", str(tmp_path / "work"), "--json", str(out), "--no-progress"])
    built = [r["stage"] for r in res["rows"]]
    assert sorted(built + res["not_built"]) == sorted(_bench().ROW_NAMES) and res["failed"] == {}
    _check_schema(res, built)
