#!/usr/bin/env python
"""Benchmark stage 1: ViT3D on active patches vs all patches, and cached vs recomputed teacher targets.

1. ``tokens``: training steps/s (forward + backward + AdamW step of ViT3D + the CLIP head, MSE loss) at the
   ``nsd`` phantom geometry (83x104x81 grid, patch 14: 288 patches, of which the active ones cover the ROIs),
   once with the active patches as tokens and once with every patch of the padded grid. The inputs are random
   tensors of the right shape (the model's cost does not depend on the values); the expected speed-up is about
   the token ratio (more where attention's quadratic term matters).
2. ``targets``: one training epoch of :class:`~neurovision.tasks.AlignmentTask` (its forward, loss and AdamW
   step, batches from ``FMRIDataModule``) with the CLIP + VAE targets looked up in the teacher cache, versus
   the same epoch computing them from each batch's images with the teachers. The one-off cost of filling the
   cache is reported too. Teachers default to the tiny configs the CPU presets use (random weights: the cost
   does not depend on them); pass ``--clip-*``/``--vae-*`` for real checkpoints.

Usage::

    python benchmarks/bench_stage1.py [--device cpu|cuda] [--dim 256 --depth 4 --batch-size 8] [--paper]

``--paper`` uses the paper's 16 x 768 model (GPU). Results: a table on stdout and JSON at
``benchmarks/results/stage1.json``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import neurovision

neurovision.setup_environment()  # the torchvision fix, before lightning (data_modules) imports torchvision

from data_modules.fmri import FMRIDataModule  # noqa: E402
from neurovision.data.atomic import atomic_path  # noqa: E402
from neurovision.data.preprocessing import patch_grid_shape  # noqa: E402
from neurovision.models import ViT3D  # noqa: E402
from neurovision.models.stage1 import MLPHead  # noqa: E402
from neurovision.pretrained.teachers import OpenCLIPImageTeacher, TeacherCache, VAETeacher  # noqa: E402
from neurovision.sources import phantom  # noqa: E402
from neurovision.tasks import AlignmentTask  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_JSON = REPO / "benchmarks" / "results" / "stage1.json"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_tokens(coords: np.ndarray, patch_dim: int, args: argparse.Namespace, device: torch.device,
                 label: str) -> dict[str, Any]:
    """Steps/s of ViT3D + CLIP head training on ``len(coords)`` tokens per sample."""
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({
        "vit": ViT3D(patch_dim=patch_dim, patch_coords=coords, dim=args.dim, depth=args.depth, heads=args.heads,
                     gradient_checkpointing=args.gradient_checkpointing),
        "head": MLPHead(args.dim, args.head_hidden, args.clip_dim),
    }).to(device)
    model["vit"].check_inputs = False
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(args.batch_size, len(coords), patch_dim, device=device)
    y = torch.randn(args.batch_size, args.clip_dim, device=device)
    dtype = torch.bfloat16 if args.precision == "bf16" else None

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.mse_loss(model["head"](model["vit"](x).cls).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(args.warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in tqdm(range(args.steps), desc=f"ViT3D {label} ({len(coords)} tokens)", disable=args.no_progress):
        step()
    _sync(device)
    dt = time.perf_counter() - t0
    out = {"tokens": len(coords) + 1, "patches": len(coords), "steps": args.steps, "seconds": dt,
           "steps_per_s": args.steps / dt, "samples_per_s": args.steps * args.batch_size / dt}
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def _teachers(args: argparse.Namespace) -> tuple[OpenCLIPImageTeacher, VAETeacher]:
    clip = OpenCLIPImageTeacher(model_name=args.clip_model, model_config=args.clip_config,
                                checkpoint=args.clip_checkpoint, device=args.device)
    if args.vae_path:
        vae = VAETeacher(path=args.vae_path, image_size=args.vae_image_size, device=args.device)
    else:
        vae = VAETeacher(path=None, config="tiny", image_size=args.vae_image_size, device=args.device)
    return clip, vae


def bench_targets(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """One AlignmentTask training epoch with cached vs recomputed teacher targets."""
    store = Path(args.store) if args.store else phantom.prepare(
        preset="tiny", out=workdir / "bench_stage1_tiny.h5", n_train=args.n_train, n_test=4)
    device = torch.device(args.device)
    clip, vae = _teachers(args)
    cache_file = workdir / "bench_stage1.teachers.h5"
    cache_file.unlink(missing_ok=True)
    dm = FMRIDataModule(store=str(store), batch_size=args.epoch_batch_size, num_workers=0, return_images=True,
                        eval_conditions=["average"], seed=0)
    dm.setup("fit")
    t0 = time.perf_counter()
    cache = TeacherCache(path=cache_file, progress=not args.no_progress)
    cached = {"clip": torch.from_numpy(np.asarray(cache.get(dm.store, clip))).float(),
              "vae": torch.from_numpy(np.asarray(cache.get(dm.store, vae))).float()}
    cache_build = time.perf_counter() - t0

    results: dict[str, Any] = {"store": str(store), "n_stimuli": len(cached["clip"]), "cache_build_s": cache_build,
                               "clip_teacher": clip.id, "vae_teacher": vae.id}
    for mode in ("cached", "recomputed"):
        torch.manual_seed(0)
        task = AlignmentTask(data_spec=dm.spec, clip_teacher=clip, vae_teacher=vae, dim=args.epoch_dim,
                             depth=args.epoch_depth, heads=4, head_hidden=256, drop_path=0.0).to(device)
        task.encoder.check_inputs = False
        task.vae_targets = cached["vae"].to(device)  # what setup() would load from the cache
        task.clip_targets = cached["clip"].to(device)
        opt = torch.optim.AdamW(task.parameters(), lr=1e-4)
        loader = dm.train_dataloader()
        n = 0
        _sync(device)
        t0 = time.perf_counter()
        for batch in tqdm(loader, desc=f"epoch, {mode} targets", disable=args.no_progress):
            patches = batch["patches"].to(device)
            if mode == "cached":
                tgt = task._targets(batch["stimulus"].to(device))
            else:
                tgt = {"clip": clip.encode(batch["image"]).to(device), "vae": vae.encode(batch["image"]).to(device)}
            losses = task._losses(task(patches), tgt)
            opt.zero_grad(set_to_none=True)
            losses["loss"].backward()
            opt.step()
            n += len(patches)
        _sync(device)
        results[mode] = {"seconds": time.perf_counter() - t0, "samples": n}
    results["ratio_recomputed_over_cached"] = results["recomputed"]["seconds"] / results["cached"]["seconds"]
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--parts", default="tokens,targets", help="comma list of tokens,targets")
    p.add_argument("--preset", default="nsd", choices=sorted(phantom.PRESETS), help="geometry of the tokens part")
    p.add_argument("--paper", action="store_true", help="paper-size ViT3D (16 x 768, heads 12, batch 32, bf16)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-hidden", type=int, default=1024)
    p.add_argument("--clip-dim", type=int, default=768)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--precision", choices=("32", "bf16"), default="32")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--store", default=None, help="store of the targets part (default: a tiny phantom in workdir)")
    p.add_argument("--n-train", type=int, default=120, help="training images per subject of the default store")
    p.add_argument("--epoch-batch-size", type=int, default=32)
    p.add_argument("--epoch-dim", type=int, default=64)
    p.add_argument("--epoch-depth", type=int, default=2)
    p.add_argument("--clip-model", default="tiny_clip")
    p.add_argument("--clip-config", default=str(REPO / "experiments" / "teachers" / "tiny_clip.json"))
    p.add_argument("--clip-checkpoint", default=None)
    p.add_argument("--vae-path", default=None, help="diffusers AutoencoderKL folder (default: tiny config)")
    p.add_argument("--vae-image-size", type=int, default=64)
    p.add_argument("--workdir", default=str(REPO / ".bench"))
    p.add_argument("--json", default=str(DEFAULT_JSON))
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.paper:
        args.dim, args.depth, args.heads, args.batch_size, args.precision = 768, 16, 12, 32, "bf16"
    parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    unknown = set(parts) - {"tokens", "targets"}
    if unknown:
        p.error(f"--parts: unknown {sorted(unknown)}")
    device = torch.device(args.device)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    res: dict[str, Any] = {
        "config": dict(vars(args)),
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
                    "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                    "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"},
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(),
    }
    print(f"stage-1 benchmark on {res['machine']['device_name']}, torch {torch.__version__}")
    if "tokens" in parts:
        spec = phantom.geometry(args.preset)
        grid = patch_grid_shape(spec.shape, spec.patch_size)
        all_coords = np.stack(np.unravel_index(np.arange(int(np.prod(grid))), grid), axis=1)
        active = all_coords[spec.active_index]
        patch_dim = spec.patch_size**3
        a = bench_tokens(active, patch_dim, args, device, "active")
        b = bench_tokens(all_coords, patch_dim, args, device, "all")
        res["tokens"] = {"grid": list(spec.shape), "patch_size": spec.patch_size, "active": a, "all": b,
                         "speedup_active_over_all": a["steps_per_s"] / b["steps_per_s"],
                         "token_ratio": b["tokens"] / a["tokens"]}
        t = res["tokens"]
        print(f"\nViT3D {args.dim}x{args.depth} batch {args.batch_size} ({args.precision}), grid {spec.shape} "
              f"patch {spec.patch_size}")
        print(f"{'tokens':>8} {'steps/s':>9} {'samples/s':>10}" + ("  peak GiB" if device.type == "cuda" else ""))
        for name in ("active", "all"):
            r = t[name]
            mem = f"  {r['peak_memory_gib']:8.2f}" if "peak_memory_gib" in r else ""
            print(f"{r['tokens']:>8} {r['steps_per_s']:9.3f} {r['samples_per_s']:10.2f}{mem}   ({name})")
        print(f"speed-up active/all = {t['speedup_active_over_all']:.2f}x  (token ratio {t['token_ratio']:.2f}x)")
    if "targets" in parts:
        t = res["targets"] = bench_targets(args, workdir)
        print(f"\nAlignmentTask epoch on {t['store']} ({t['cached']['samples']} training samples)")
        print(f"  cache fill (once): {t['cache_build_s']:.2f} s for {t['n_stimuli']} stimuli")
        print(f"  epoch, cached targets:     {t['cached']['seconds']:.2f} s")
        print(f"  epoch, recomputed targets: {t['recomputed']['seconds']:.2f} s")
        print(f"  recomputed / cached = {t['ratio_recomputed_over_cached']:.2f}x")
    res["runtime_s"] = time.perf_counter() - t_start
    out = Path(args.json)
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(res, indent=2, default=str))
    print(f"\nresults: {out}")
    return res


if __name__ == "__main__":
    main()
