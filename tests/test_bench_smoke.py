"""Smoke test of benchmarks/bench_datamodule.py on the tiny phantom (structure only, never speed)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_datamodule.py"


def _load_bench(name: str = "bench_datamodule"):
    spec = importlib.util.spec_from_file_location(name, BENCH.with_name(f"{name}.py"))
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_datamodule_smoke(tmp_path: Path) -> None:
    bench = _load_bench()
    out_json = tmp_path / "results" / "datamodule.json"
    bench.main(["--preset", "tiny", "--n-train", "12", "--n-test", "4", "--workdir", str(tmp_path / "work"),
                "--workers", "0,2", "--cache-modes", "cold,warm", "--repeats", "1", "--no-global-drop", "--no-progress",
                "--json", str(out_json)])
    res = json.loads(out_json.read_text())
    for key in ("config", "machine", "store", "flat_file", "geometry", "bytes_per_trial", "cache", "results",
                "ratios", "runtime_s"):
        assert key in res, key
    assert res["config"]["preset"] == "tiny"
    assert "posix_fadvise" in res["cache"]["methods"]
    cells = {(r["cache"], r["workers"], r["reader"]) for r in res["results"]}
    for cache in ("cold", "warm"):
        for w in (0, 2):
            assert (cache, w, "datamodule") in cells and (cache, w, "pread_dataloader") in cells
            assert res["ratios"][f"{cache}/workers={w}"] > 0
        assert (cache, 0, "pread_loop") in cells and (cache, 0, "pread_loop_numpy") in cells
    for r in res["results"]:
        assert r["trials"] == res["config"]["trials_per_pass"] > 0
        for k in ("seconds", "volumes_per_s", "mb_per_s"):
            assert math.isfinite(r[k]) and r[k] > 0, (k, r)
    b = res["bytes_per_trial"]
    g = res["geometry"]
    assert b["stored_active_float16"] == g["active_patches"] * g["patch_size"] ** 3 * 2 > 0
    assert b["padded_grid_float32"] == 2 * b["padded_grid_float16"] >= 2 * b["grid_float16"] > 0
    assert 0 < g["active_patches"] <= g["total_patches"]
    assert res["flat_file"]["file_bytes"] == res["store"]["train_trials"] * b["stored_active_float16"]
    # a second run reuses the store and the flat file
    res2 = bench.main(["--preset", "tiny", "--n-train", "12", "--n-test", "4", "--workdir", str(tmp_path / "work"),
                       "--workers", "0", "--cache-modes", "warm", "--repeats", "1", "--no-numpy-diagnostic", "--no-progress",
                       "--json", str(out_json)])
    assert res2["store"]["reused"] and res2["flat_file"]["reused"]


def test_bench_stage1_smoke(tmp_path: Path) -> None:
    bench = _load_bench("bench_stage1")
    out_json = tmp_path / "stage1.json"
    res = bench.main(["--preset", "tiny", "--dim", "32", "--depth", "1", "--heads", "2", "--head-hidden", "32",
                      "--clip-dim", "16", "--batch-size", "2", "--steps", "2", "--warmup", "1", "--n-train", "8",
                      "--epoch-dim", "16", "--epoch-depth", "1", "--workdir", str(tmp_path), "--json", str(out_json),
                      "--no-progress"])
    assert json.loads(out_json.read_text())["config"]["preset"] == "tiny"
    tok = res["tokens"]
    assert tok["all"]["patches"] == 150 and tok["active"]["patches"] == 37  # the tiny phantom's grid
    assert tok["token_ratio"] == 151 / 38
    tgt = res["targets"]
    assert tgt["cached"]["samples"] == tgt["recomputed"]["samples"] == 4 * 8 * 3  # subjects x images x repeats
    assert tgt["cache_build_s"] > 0 and tgt["ratio_recomputed_over_cached"] > 0


def test_bench_stage2_smoke(tmp_path: Path) -> None:
    bench = _load_bench("bench_stage2")
    out = tmp_path / "s2.json"
    bench.main(["--config", "tiny", "--device", "cpu", "--batch-size", "2", "--steps", "1", "--out", str(out)])
    r = json.loads(out.read_text())
    assert r["params_trainable_M"] < r["params_total_M"]  # LoRA + projector only
    assert r["sequence_length"] == 64 - 1 + 76 + 1 and r["samples_per_s"] > 0 and r["peak_rss_MB"] > 0


def test_bench_encoding_smoke(tmp_path: Path) -> None:
    bench = _load_bench("bench_encoding")
    out_json = tmp_path / "encoding.json"
    bench.main(["--quick", "--json", str(out_json)])
    res = json.loads(out_json.read_text())
    assert res and out_json.stat().st_size > 0
    text = json.dumps(res)
    assert "sklearn" in text and "ratio" in text
