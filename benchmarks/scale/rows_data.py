"""Rows of the scale rehearsal that touch data, stage 1 and encoding (issue 17).

``prepare``, ``teacher_cache``, ``stage1_train``, ``stage1_readout``, ``encoding_fit``, ``encoding_bootstrap``:
each runs the project's real code path at the real shapes and a bounded size on the CPU, and projects to the
full workload (:class:`~benchmarks.scale.common.Scale`) with its arithmetic. Heavy measurements run in a
spawned child (:func:`~benchmarks.scale.common.run_isolated`), so each peak RSS is that step's own.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .common import (
    GB,
    NODE,
    Row,
    Scale,
    count_flops,
    fmt_bytes,
    gpu_hours,
    h100_hours,
    max_rss_gb,
    peak_memory_meta,
    projected,
    run_isolated,
    scaling_exponent,
)

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / "experiments" / "models"


def _size(args: argparse.Namespace, smoke: Any, quick: Any, default: Any) -> Any:
    """The rehearsal size of a row: ``--smoke`` < ``--quick`` < default."""
    if getattr(args, "smoke", False):
        return smoke
    return quick if args.quick else default


# ============================================================================================ NSD geometry fake
def active_patch_coords(n: int = Scale.active_patches) -> list[tuple[int, int, int]]:
    """``n`` patch-grid coordinates of 14^3 patches lying inside the 81 x 104 x 83 grid, posterior (low y) and
    central first: the fake's stand-in for the patches NSD's nsdgeneral ROI touches."""
    p, xyz = Scale.patch, Scale.grid
    pg = [math.ceil(s / p) for s in xyz]
    inside = [(i, j, k) for i in range(pg[0]) for j in range(pg[1]) for k in range(pg[2])
              if all((c + 1) * p <= s for c, s in zip((i, j, k), xyz, strict=True))]
    inside.sort(key=lambda c: (c[1], abs(c[0] - pg[0] / 2), abs(c[2] - pg[2] / 2)))
    if len(inside) < n:
        raise ValueError(f"only {len(inside)} patches fit inside the grid, {n} requested")
    return inside[:n]


def make_nsd_geometry(root: Path, trials_per_session: int, n_sessions: int = 1, seed: int = 0,
                      active_patches: int = Scale.active_patches, roi_voxels: int = Scale.roi_voxels) -> dict[str, Any]:
    """An NSD-layout fake at the true geometry of subject 1 (func1pt8mm 81 x 104 x 83, int16 betas x 300).

    ``tests.fakes.nsd.make_fake_nsd`` writes the design, stimulus info and COCO captions (its volumes and
    16-px images are tiny); this wrapper then replaces subject 1's volumes by true-size ones: an nsdgeneral ROI
    of ``roi_voxels`` voxels spread over ``active_patches`` patches of 14^3 (posterior first, as in NSD), a
    brain mask around it, ``n_sessions`` betas files of ``trials_per_session`` trials (h5py order Z, Y, X), and a
    425 x 425 ``imgBrick`` holding the images subject 1 saw (the other rows are never allocated).
    """
    import h5py
    import nibabel as nib
    from scipy.io import loadmat

    from neurovision.sources import nsd
    from tests.fakes.nsd import _affine, make_fake_nsd

    root = Path(root)
    make_fake_nsd(root, subjects=(1,), n_sessions=n_sessions, trials_per_session=trials_per_session,
                  shapes={1: (4, 4, 4)}, seed=seed)
    rng = np.random.default_rng(seed + 1)
    xyz = Scale.grid
    p = Scale.patch
    affine = _affine(1, xyz)
    # ---- ROI: ~roi_voxels voxels scattered in the active patches
    roi = np.zeros(xyz, dtype=bool)
    per = max(1, roi_voxels // active_patches)
    for i, j, k in active_patch_coords(active_patches):
        local = rng.choice((p - 4) ** 3, per, replace=False)  # 2 voxels away from the patch faces
        a, b, c = np.unravel_index(local, (p - 4,) * 3)
        roi[i * p + 2 + a, j * p + 2 + b, k * p + 2 + c] = True
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in xyz], indexing="ij")
    brain = (sum(g ** 2 for g in grids) < 0.95) | roi
    labels = np.where(roi, 1, np.where(brain, 0, -1)).astype(np.int16)
    nib.save(nib.Nifti1Image(labels, affine), nsd.nsdgeneral_path(root, 1))
    nib.save(nib.Nifti1Image(brain.astype(np.int16), affine), nsd.brainmask_path(root, 1))
    # ---- betas: int16 % signal change x 300, (trials, Z, Y, X)
    brain_zyx = brain.transpose(2, 1, 0)
    for s in range(1, n_sessions + 1):
        path = nsd.betas_path(root, 1, s)
        path.unlink(missing_ok=True)
        with h5py.File(path, "w") as f:
            ds = f.create_dataset("betas", shape=(trials_per_session, *xyz[::-1]), dtype=np.int16, chunks=True)
            for b in range(0, trials_per_session, 50):
                e = min(b + 50, trials_per_session)
                ds[b:e] = rng.integers(-900, 900, (e - b, *xyz[::-1]), dtype=np.int16) * brain_zyx
    # ---- 425 px images of the stimuli subject 1 saw (chunked: unwritten rows take no disk)
    mat = loadmat(str(nsd.expdesign_path(root)))
    order = mat["masterordering"].reshape(-1).astype(np.int64) - 1
    subjectim = mat["subjectim"].astype(np.int64) - 1
    used = np.unique(subjectim[0, order[: n_sessions * trials_per_session]])
    stim = nsd.stimuli_path(root)
    with h5py.File(stim, "r") as f:
        n_images = f["imgBrick"].shape[0]
    stim.unlink()
    px = Scale.imgbrick_px
    with h5py.File(stim, "w") as f:
        ds = f.create_dataset("imgBrick", shape=(n_images, px, px, 3), dtype=np.uint8, chunks=(1, px, px, 3))
        for i in used:
            ds[int(i)] = rng.integers(0, 256, (px, px, 3), dtype=np.uint8)
    return {"roi_voxels": int(roi.sum()), "brain_voxels": int(brain.sum()), "used_images": int(len(used)),
            "trials_per_session": trials_per_session, "sessions": n_sessions}


def _prepare_store(root: Path, out: Path, sessions: int) -> dict[str, Any]:
    """Child: ``neurovision prepare nsd`` (the library function) on ``sessions`` session(s) of subject 1."""
    import h5py

    from neurovision.sources import nsd

    base = max_rss_gb()  # after the imports
    t0, c0 = time.perf_counter(), time.process_time()
    nsd.prepare(root, out, subjects=[1], sessions=sessions, force=True)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    with h5py.File(out, "r") as f:
        patches = f["trials/patches"]
        images = f["stimuli/images"]
        return {"seconds": seconds, "cpu_seconds": cpu_seconds, "base_rss_gb": base, "trials": int(patches.shape[0]), "active_patches": int(patches.shape[1]),
                "values_per_trial": int(patches.shape[1] * patches.shape[2]),
                "patch_bytes": int(patches.id.get_storage_size()), "images": int(images.shape[0]),
                "image_bytes": int(images.id.get_storage_size()), "file_bytes": int(out.stat().st_size),
                "grid": [int(x) for x in f["grid"].attrs["shape"]]}


def row_prepare(args: argparse.Namespace) -> Row:
    trials = _size(args, 16, 60, 750)
    root = args.workdir / f"nsd_geometry_{trials}"
    info, gen_s, _ = run_isolated(make_nsd_geometry, root, trials, 2, args.seed)
    runs = []
    for sessions in (1, 2):
        res, _, peak = run_isolated(_prepare_store, root, args.workdir / f"nsd_{trials}_{sessions}.h5", sessions)
        res.update(peak_rss_gb=peak)
        runs.append(res)
    one, two = runs
    s_per_trial = two["seconds"] / two["trials"]  # fixed costs (stimuli, captions, grid) included: an upper bound
    cpu_per_trial = two["cpu_seconds"] / two["trials"]  # core-seconds (every thread of the child)
    marginal = max(0.0, (two["seconds"] - one["seconds"]) / (two["trials"] - one["trials"]))  # the 2nd session
    patch_b = two["patch_bytes"] / two["trials"]
    img_b = two["image_bytes"] / two["images"]
    k_time = scaling_exponent(one["trials"], one["seconds"], two["trials"], two["seconds"])
    # the fit check uses CPU time (user + system of the child): wall time on a shared 2-core machine is noisy
    k_cpu = scaling_exponent(one["trials"], one["cpu_seconds"], two["trials"], two["cpu_seconds"])
    k_rss = scaling_exponent(one["trials"], one["peak_rss_gb"], two["trials"], two["peak_rss_gb"])
    # peak RSS: one session in memory at a time (its int16 read and float32 copy side by side); NSD sessions
    # have 750 trials whatever the rehearsal size, so add the trials the rehearsal's sessions did not hold
    voxels = math.prod(Scale.grid)
    missing = max(0, Scale.trials_per_session - trials) * voxels * (2 + 4) / GB
    rss_full = two["peak_rss_gb"] + missing
    core_h = cpu_per_trial * Scale.trials / 3600
    disk = (patch_b * Scale.trials + img_b * Scale.images) / GB
    measured = {"seconds": two["seconds"], "peak_rss_gb": two["peak_rss_gb"], "n_trials": two["trials"],
                "trials_per_session": trials, "sessions": 2, "grid": two["grid"],
                "active_patches": two["active_patches"], "values_per_trial": two["values_per_trial"],
                "roi_voxels": info["roi_voxels"], "ms_per_trial": 1e3 * s_per_trial,
                "ms_per_trial_marginal": 1e3 * marginal, "cpu_ms_per_trial": 1e3 * cpu_per_trial,
                "store_bytes_per_trial": patch_b, "image_bytes": img_b, "seconds_1_session": one["seconds"],
                "peak_rss_gb_1_session": one["peak_rss_gb"], "child_base_rss_gb": two["base_rss_gb"],
                "scaling_exponent": k_cpu, "time_exponent": k_time, "scaling_exponent_rss": k_rss,
                "cpu_seconds": [one["cpu_seconds"], two["cpu_seconds"]], "fake_generation_s": gen_s}
    arithmetic = [
        f"measured: prepare nsd of 1 subject x 2 sessions x {trials} trials at {tuple(two['grid'])}, "
        f"{two['active_patches']} active patches ({two['values_per_trial']:,} values/trial): "
        f"{two['seconds']:.1f} s = {1e3 * s_per_trial:.1f} ms/trial (1 session: {one['seconds']:.1f} s; "
        f"wall time ~ n^{k_time:.2f}, CPU time ~ n^{k_cpu:.2f}), peak RSS {two['peak_rss_gb']:.2f} GB (1 session {one['peak_rss_gb']:.2f} GB)",
        f"CPU: {1e3 * cpu_per_trial:.1f} core-ms/trial (CPU time of the child) x {Scale.trials:,} trials = "
        f"{core_h:.2f} core-hours (one process; wall {1e3 * s_per_trial:.1f} ms/trial here, the second session "
        f"alone {1e3 * marginal:.1f} ms/trial; fixed costs the rehearsal size does not amortise included)",
        f"RAM: one session in memory (does not grow with sessions: RSS ~ n^{k_rss:.2f}): measured "
        f"{two['peak_rss_gb']:.2f} GB + ({Scale.trials_per_session} - {trials}) trials x {voxels:,} voxels x "
        f"(2 B int16 read + 4 B float32) = {rss_full:.2f} GB",
        f"disk: {patch_b / 1e3:.0f} kB/trial (float16 patches) x {Scale.trials:,} + {img_b / 1e3:.0f} kB/image x "
        f"{Scale.images:,} images = {disk:.1f} GB",
    ]
    return Row("prepare", "neurovision.sources.nsd.prepare on an NSD-layout fake at the true geometry "
               "(tests.fakes.nsd + true-size volumes: int16 betas x 300, nsdgeneral ROI, 425 px imgBrick)",
               measured, projected(ram_gb=rss_full, disk_gb=disk, cpu_core_hours=core_h), arithmetic, True)


# ============================================================================================ teacher cache
# A100 peaks by precision: the teachers run in float32 outside autocast (cache fill in setup); PyTorch lets
# cuDNN convolutions use TF32 by default but not matmuls (torch.backends.cuda.matmul.allow_tf32 = False)
A100_FP32_TFLOPS = 19.5
A100_TF32_TFLOPS = 156.0
TEACHER_BATCH = {"clip": 64, "vae": 16}  # the teachers' default batch_size (TeacherCache uses it)


def _small_store(args: argparse.Namespace, n_images: int) -> Path:
    """A prepared NSD store (true geometry, 425 px images) holding ``n_images`` stimuli."""
    root = args.workdir / f"nsd_geometry_img{n_images}"
    out = args.workdir / f"nsd_img{n_images}.h5"
    run_isolated(_make_small_store, root, out, 3 * n_images, args.seed)
    return out


def _make_small_store(root: Path, out: Path, trials: int, seed: int) -> None:
    make_nsd_geometry(root, trials, 1, seed)
    _prepare_store(root, out, 1)


def _clip_teacher(device: str = "cpu") -> Any:
    from neurovision.pretrained.teachers import OpenCLIPImageTeacher

    return OpenCLIPImageTeacher(model_name=Scale.clip_model, checkpoint=None, device=device)  # random weights


def _vae_teacher(image_size: int, device: str = "cpu") -> Any:
    from neurovision.pretrained.teachers import VAETeacher

    return VAETeacher(config=str(MODELS / "sd21_vae.json"), image_size=image_size, device=device)


def _teacher_flops() -> dict[str, Any]:
    """Child: FLOPs per image of each teacher at its real input size and the VAE's activation memory at its
    default batch, counted on the meta device (architectures built there: no weights allocated)."""
    import json

    import open_clip
    import torch
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        clip = open_clip.create_model(Scale.clip_model, device="meta")
        vae = AutoencoderKL.from_config(json.loads((MODELS / "sd21_vae.json").read_text()))
    params = {"clip": sum(p.numel() for p in clip.visual.parameters()),
              "vae_encoder": sum(p.numel() for n, p in vae.named_parameters() if not n.startswith("decoder"))}
    with torch.no_grad():
        _, clip_f, clip_ops = count_flops(clip.encode_image, torch.empty(1, 3, Scale.clip_px, Scale.clip_px,
                                                                         device="meta"), per_op=True)
        _, vae_f, vae_ops = count_flops(vae.encode, torch.empty(1, 3, Scale.vae_px, Scale.vae_px, device="meta"),
                                        per_op=True)
        b = TEACHER_BATCH["vae"]
        _, vae_act = peak_memory_meta(lambda: vae.encode(torch.empty(b, 3, Scale.vae_px, Scale.vae_px,
                                                                     device="meta")).latent_dist.mean)
    return {"clip": clip_f, "clip_ops": clip_ops, "vae": vae_f, "vae_ops": vae_ops, "params": params,
            "vae_batch_activation_bytes": vae_act}


def _teacher_fill(store: Path, which: str, image_size: int, batch: int, progress: bool) -> dict[str, Any]:
    """Child: fill the teacher cache of ``store`` with one teacher (TeacherCache.get, float16 entries)."""
    import torch

    from neurovision.pretrained.teachers import TeacherCache

    torch.manual_seed(0)
    teacher = _clip_teacher() if which == "clip" else _vae_teacher(image_size)
    cache_path = Path(store).with_name(f"{Path(store).stem}.{which}{image_size}.teachers.h5")
    cache_path.unlink(missing_ok=True)
    base = max_rss_gb()
    t0 = time.perf_counter()
    out = TeacherCache(path=cache_path, dtype="float16", batch_size=batch, progress=progress).get(store, teacher)
    return {"seconds": time.perf_counter() - t0, "images": int(out.shape[0]), "row_shape": list(out.shape[1:]),
            "base_rss_gb": base, "cache_bytes": int(cache_path.stat().st_size), "teacher_id": teacher.id}


def _teacher_all(store: Path, vae_px: int, n_img: int, progress: bool) -> dict[str, Any]:
    """Child: the FLOP/memory counts on meta, then the CLIP fill, then the VAE fill (peak RSS after each)."""
    t0 = time.perf_counter()
    fl = _teacher_flops()
    flops_s = time.perf_counter() - t0
    clip = _teacher_fill(store, "clip", Scale.clip_px, n_img, progress)
    clip["peak_rss_gb"] = max_rss_gb()
    vae = _teacher_fill(store, "vae", vae_px, n_img, progress)
    return {"flops": fl, "flops_s": flops_s, "clip": clip, "vae": vae}


def _hours_by_op(ops: dict[str, int], n: float) -> tuple[float, float]:
    """(A100-hours, FLOPs) of ``n`` forwards: convolutions at TF32, the rest at FP32 (both at NODE efficiency)."""
    conv = sum(v for k, v in ops.items() if "convolution" in k)
    rest = sum(ops.values()) - conv
    eff = NODE["efficiency"]
    return (gpu_hours(conv * n, eff, A100_TF32_TFLOPS) + gpu_hours(rest * n, eff, A100_FP32_TFLOPS),
            float(sum(ops.values()) * n))


def row_teacher_cache(args: argparse.Namespace) -> Row:
    n_img = _size(args, 1, 1, 1)
    vae_px = _size(args, 64, 128, Scale.vae_px)
    store = _small_store(args, n_img)
    both, _, vae_peak = run_isolated(_teacher_all, store, vae_px, n_img, args.progress)
    fl, fl_s, clip, vae = both["flops"], both["flops_s"], both["clip"], both["vae"]
    clip_peak = clip["peak_rss_gb"]
    n = Scale.images
    clip_h, clip_flops = _hours_by_op(fl["clip_ops"], n)
    vae_h, vae_flops = _hours_by_op(fl["vae_ops"], n)
    work_h = clip_h + vae_h
    # AlignmentTask.setup fills the cache inside the DDP fit, every rank encoding its own shard of the stimuli
    # (TeacherCache.get under a process group): all GPUs of the node work, so node time = work, in 1/gpus the wall
    wall_h = work_h / NODE["gpus"]
    node_h = NODE["gpus"] * wall_h
    row_bytes = 2 * (Scale.clip_dim + math.prod(Scale.vae_latent))
    disk = row_bytes * n / GB
    # GPU memory of the fill: the teachers' float32 weights + the VAE's activations at its default batch
    weights_gb = 4 * (fl["params"]["clip"] + fl["params"]["vae_encoder"]) / GB
    act_gb = fl["vae_batch_activation_bytes"] / GB
    gpu_mem = weights_gb + act_gb
    clip_s_img = clip["seconds"] / clip["images"]
    vae_s_img = vae["seconds"] / vae["images"]
    measured = {"seconds": clip["seconds"] + vae["seconds"], "peak_rss_gb": max(clip_peak, vae_peak),
                "n_images": n_img, "clip_px": Scale.clip_px, "vae_px_timed": vae_px,
                "clip_s_per_image_cpu": clip_s_img, "vae_s_per_image_cpu": vae_s_img,
                "clip_gflops_per_image": fl["clip"] / 1e9, "vae_encoder_tflops_per_image_768px": fl["vae"] / 1e12,
                "clip_params_m": fl["params"]["clip"] / 1e6, "vae_encoder_params_m": fl["params"]["vae_encoder"] / 1e6,
                "cache_row_bytes_float16": row_bytes, "vae_latent": list(vae["row_shape"]),
                "flop_count_s": fl_s, "clip_peak_rss_gb": clip_peak, "vae_peak_rss_gb": vae_peak}
    arithmetic = [
        f"measured: TeacherCache.get (float16) on a prepared NSD-geometry store of {n_img} image(s) (425 px): "
        f"CLIP {Scale.clip_model} (open_clip config, random weights) {clip_s_img:.1f} s/image at {Scale.clip_px} px, "
        f"SD-2.1 VAE encoder (experiments/models/sd21_vae.json) {vae_s_img:.1f} s/image at {vae_px} px "
        f"(latent {tuple(vae['row_shape'])}) on CPU; peak RSS {max(clip_peak, vae_peak):.2f} GB",
        f"FLOPs (FlopCounterMode on the meta device): CLIP {fl['clip'] / 1e9:.0f} GFLOP/image at {Scale.clip_px} px, "
        f"VAE encoder {fl['vae'] / 1e12:.2f} TFLOP/image at {Scale.vae_px} px",
        f"GPU: {n:,} images x ({fl['clip'] / 1e9:.0f} G + {fl['vae'] / 1e12:.2f} T) = "
        f"{(clip_flops + vae_flops) / 1e15:.0f} PFLOP; float32 outside autocast: convolutions at TF32 "
        f"{A100_TF32_TFLOPS:.0f} TFLOPS, matmuls at FP32 {A100_FP32_TFLOPS} TFLOPS, x {NODE['efficiency']} -> "
        f"CLIP {clip_h:.2f} + VAE {vae_h:.2f} = {work_h:.2f} A100-hours of work",
        f"the fill runs inside the {NODE['gpus']}-GPU fit, sharded over the ranks (each encodes 1/{NODE['gpus']} "
        f"of the images; rank 0 gathers and writes): {work_h:.2f} / {NODE['gpus']} = {wall_h:.3f} h wall-clock "
        f"({wall_h * 60:.0f} min) x {NODE['gpus']} GPUs = {node_h:.2f} A100-hours of node time (counted; = the "
        f"work, no GPU idles)",
        f"disk: ({Scale.clip_dim} + {math.prod(Scale.vae_latent):,}) float16 values x {n:,} images = "
        f"{fmt_bytes(row_bytes * n)}",
        f"RAM: every rank builds both teachers on the CPU first: {NODE['gpus']} x {max(clip_peak, vae_peak):.1f} GB "
        f"(measured peak) = {NODE['gpus'] * max(clip_peak, vae_peak):.1f} GB",
        f"GPU memory: teachers' float32 weights {weights_gb:.1f} GB + VAE encoder activations at batch "
        f"{TEACHER_BATCH['vae']} x 768 px {act_gb:.1f} GB (peak of live tensors on the meta device) = "
        f"{gpu_mem:.1f} GB",
    ]
    return Row("teacher_cache", "TeacherCache fill with OpenCLIPImageTeacher (ViT-L/14) and VAETeacher (SD-2.1 VAE "
               "config, 768 px), random weights, timed on CPU; GPU-hours from FLOPs counted on the meta device",
               measured, projected(ram_gb=NODE["gpus"] * max(clip_peak, vae_peak),
                                   gpu_mem_gb=gpu_mem, disk_gb=disk, gpu_hours=node_h), arithmetic, True,
               notes=f"{work_h:.2f} A100-h of work, sharded over the {NODE['gpus']} ranks of the fit "
                     f"({wall_h * 60:.0f} min wall-clock): {node_h:.2f} counted; H100: "
                     f"{h100_hours(clip_flops + vae_flops):.2f} h at bf16 peak (if the teachers ran in bf16)")


# ============================================================================================ stage 1 training
ALPHA = 1 / 64  # stage1_vit3d.yaml: loss = MSE_clip + alpha MSE_vae
HEAD_HIDDEN = 1024
DROP_PATH = 0.1


def _stage1_model(device: str = "cpu") -> Any:
    """The stage-1 network of stage1_vit3d.yaml at NSD shapes: ViT3D 16 x 768 (12 heads) on 78 patches of 14^3
    plus AlignmentTask's MLP heads to CLIP (768) and the 768-px VAE latent (4 x 96 x 96)."""
    import torch

    from neurovision.models import ViT3D
    from neurovision.models.stage1 import MLPHead

    with torch.device(device):
        model = torch.nn.ModuleDict({
            "vit": ViT3D(patch_dim=Scale.patch_voxels, patch_coords=active_patch_coords(), dim=Scale.vit_dim,
                         depth=Scale.vit_depth, heads=Scale.vit_heads, drop_path=DROP_PATH),
            "clip_head": MLPHead(Scale.vit_dim, HEAD_HIDDEN, Scale.clip_dim),
            "vae_head": MLPHead(Scale.vit_dim, HEAD_HIDDEN, math.prod(Scale.vae_latent)),
        })
    model["vit"].check_inputs = False
    return model


def _stage1_step(model: Any, opt: Any, batch: int, device: str = "cpu") -> None:
    import torch
    import torch.nn.functional as F

    x = torch.randn(batch, Scale.active_patches, Scale.patch_voxels, device=device)
    clip_t = torch.randn(batch, Scale.clip_dim, device=device)
    vae_t = torch.randn(batch, *Scale.vae_latent, device=device)
    cls = model["vit"](x).cls
    loss = F.mse_loss(model["clip_head"](cls), clip_t) + ALPHA * F.mse_loss(
        model["vae_head"](cls).view(-1, *Scale.vae_latent), vae_t)
    loss.backward()
    if opt is not None:
        opt.step()
        opt.zero_grad(set_to_none=True)


def _stage1_count() -> dict[str, Any]:
    """Child: FLOPs and peak activation bytes of one forward + backward at batch 32, on the meta device."""
    model = _stage1_model("meta")
    params = sum(p.numel() for p in model.parameters())
    _, flops = count_flops(_stage1_step, model, None, Scale.batch, "meta")
    model.zero_grad(set_to_none=True)
    _, act = peak_memory_meta(_stage1_step, model, None, Scale.batch, "meta")
    return {"flops_per_step": flops, "activation_bytes": act, "params": params,
            "params_by_part": {k: sum(p.numel() for p in m.parameters()) for k, m in model.items()}}


def _stage1_time(batch: int, steps: int, progress: bool) -> dict[str, Any]:
    """Child: ``steps`` AdamW training steps (forward + backward + step) at ``batch`` on the CPU (float32)."""
    import torch
    from tqdm.auto import tqdm

    torch.manual_seed(0)
    # built on meta and materialised with plain normal weights: ViT3D's trunc_normal init of 156 M parameters
    # takes longer than the steps on 2 cores, and the time of a step does not depend on the values
    model = _stage1_model("meta").to_empty(device="cpu")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1:
                p.normal_(0.0, 0.02)
            else:
                p.fill_(1.0 if "norm" in name or name.endswith(".0.weight") else 0.0)
        coords = model["vit"].patch_coords
        coords.copy_(torch.as_tensor(active_patch_coords(), dtype=coords.dtype))
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.05)
    _stage1_step(model, opt, 1)  # warm-up (allocates AdamW state)
    t0 = time.perf_counter()
    for _ in tqdm(range(steps), desc=f"stage 1 steps (batch {batch})", disable=not progress):
        _stage1_step(model, opt, batch)
    return {"seconds": time.perf_counter() - t0, "steps": steps, "batch": batch}


def _stage1_both(batch: int, steps: int, progress: bool) -> dict[str, Any]:
    """Child: :func:`_stage1_count` (meta) then :func:`_stage1_time` (CPU) in one process."""
    return {"count": _stage1_count(), "time": _stage1_time(batch, steps, progress)}


def row_stage1_train(args: argparse.Namespace) -> Row:
    batch, steps = _size(args, (1, 1), (2, 1), (8, 2))
    both, _, peak = run_isolated(_stage1_both, batch, steps, args.progress)
    cnt, tm = both["count"], both["time"]
    s_per_sample = tm["seconds"] / (steps * batch)
    flops_sample = cnt["flops_per_step"] / Scale.batch
    samples = Scale.epochs * Scale.train_trials
    total_flops = flops_sample * samples
    hours = gpu_hours(total_flops)
    # eval: val/test forwards (1/3 of a training step each) over ~3% val + 982 x 4 x 2 test items per epoch
    eval_items = Scale.epochs * (Scale.val_fraction * Scale.trials + 2 * Scale.subjects * Scale.test_items)
    eval_hours = gpu_hours(flops_sample / 3 * eval_items)
    n_params = cnt["params"]
    state_gb = 16 * n_params / GB  # float32 weights + grads + AdamW (2 moments)
    ddp_gb = 4 * n_params / GB      # DDP gradient buckets
    act_gb = cnt["activation_bytes"] / GB
    targets_gb = 4 * Scale.images * (Scale.clip_dim + math.prod(Scale.vae_latent)) / GB  # float32 buffers
    gpu_mem = state_gb + ddp_gb + act_gb + targets_gb
    cache16_gb = targets_gb / 2
    ram = NODE["gpus"] * (peak + cache16_gb + targets_gb)
    measured = {"seconds": tm["seconds"], "peak_rss_gb": peak, "batch": batch, "steps": steps,
                "tokens": Scale.active_patches + 1, "patch_dim": Scale.patch_voxels,
                "params_m": n_params / 1e6, "params_m_by_part": {k: v / 1e6 for k, v in cnt["params_by_part"].items()},
                "cpu_s_per_sample_fp32": s_per_sample, "gflops_per_sample_fwd_bwd": flops_sample / 1e9,
                "activation_gb_batch32_fp32": act_gb}
    arithmetic = [
        f"measured: {steps} AdamW steps of ViT3D {Scale.vit_depth}x{Scale.vit_dim} ({Scale.vit_heads} heads, "
        f"{Scale.active_patches + 1} tokens of {Scale.patch_voxels}) + CLIP/VAE MLP heads "
        f"({n_params / 1e6:.0f} M params) at batch {batch} on CPU float32: {tm['seconds']:.1f} s "
        f"({1e3 * s_per_sample:.0f} ms/sample), peak RSS {peak:.2f} GB",
        f"FLOPs (meta device, forward + backward at batch {Scale.batch}): {flops_sample / 1e9:.1f} GFLOP/sample",
        f"GPU: {Scale.epochs} epochs x {Scale.train_trials:,} trials x {flops_sample / 1e9:.1f} GFLOP = "
        f"{total_flops / 1e15:.0f} PFLOP at {NODE['efficiency']:.0%} of {NODE['gpu_tflops_bf16']} TFLOPS (bf16) "
        f"= {hours:.2f} A100-hours; + evaluation {eval_hours:.2f} h "
        f"({eval_items:,.0f} forwards at 1/3 of a step)",
        f"GPU memory per rank: weights+grads+AdamW 16 B x {n_params / 1e6:.0f} M = {state_gb:.1f} GB + DDP buckets "
        f"{ddp_gb:.1f} GB + activations at batch {Scale.batch} {act_gb:.1f} GB (float32 upper bound; bf16 autocast "
        f"less) + teacher targets as float32 buffers {targets_gb:.1f} GB ({Scale.images:,} x "
        f"{Scale.clip_dim + math.prod(Scale.vae_latent):,}) = {gpu_mem:.1f} GB",
        f"RAM: {NODE['gpus']} ranks x (process {peak:.1f} GB + float16 cache read {cache16_gb:.1f} GB + float32 "
        f"targets {targets_gb:.1f} GB) = {ram:.0f} GB (+ the {Scale.train_trials * Scale.values_per_trial * 2 / GB:.0f} "
        "GB of training patches in the page cache)",
        f"the {NODE['efficiency']:.0%} utilisation is optimistic for a 768-wide model at {Scale.active_patches + 1} "
        f"tokens x batch {Scale.batch}: at 20% the stage takes {2 * (hours + eval_hours):.2f} A100-hours",
    ]
    return Row("stage1_train", "ViT3D 16x768 + AlignmentTask MLP heads (CLIP 768, VAE 4x96x96) at 78 patches of "
               "14^3: AdamW steps timed on CPU; FLOPs and activation memory counted on the meta device",
               measured, projected(ram_gb=ram, gpu_mem_gb=gpu_mem, gpu_hours=hours + eval_hours), arithmetic, True)


# ============================================================================================ read-out fit
READOUT_RANK = 256             # the largest of the 64..256 components the recipes read
READOUT_CHUNK = min(1024, 2**25 // Scale.values_per_trial)  # alignment._group_mean_chunks: 156 patterns
READOUT_PASSES = 3             # principal_subspace: 1 + power_iters (2)
READOUT_OVERSAMPLE = 64
OLD_PATH_MULTIPLIER = 8.9      # issue 17: the old exact fit held ~8.9 x the float32 patterns
STORE_READ_GBPS = 2.0          # assumed page-cache/NVMe read rate of the 8 DataLoader workers (not measured)


class _PatternStream:
    """Re-iterable stream of ``n`` synthetic repeat-averaged patterns (a 32-dim signal + noise) in chunks of
    ``READOUT_CHUNK`` x 214,032 float32; each chunk regenerated from its own seed, never n x d in memory."""

    def __init__(self, n: int, seed: int) -> None:
        import torch

        self.n, self.seed = n, seed
        g = torch.Generator().manual_seed(seed)
        self.signal = torch.randn(32, Scale.values_per_trial, generator=g)

    def __iter__(self):  # noqa: ANN204
        import torch

        for c, s in enumerate(range(0, self.n, READOUT_CHUNK)):
            m = min(READOUT_CHUNK, self.n - s)
            g = torch.Generator().manual_seed(self.seed * 100_003 + c)
            z = torch.randn(m, 32, generator=g) * torch.linspace(3, 0.5, 32)
            yield z @ self.signal + torch.randn(m, Scale.values_per_trial, generator=g)


def _readout_fit(n: int, rank: int, seed: int, progress: bool) -> dict[str, Any]:
    """Child: the read-out's principal subspace (neurovision.models.readout.principal_subspace, the randomised
    path AlignmentTask takes at NSD size) of ``n`` streamed patterns; also times the stream alone."""
    import torch

    from neurovision.models.readout import principal_subspace

    stream = _PatternStream(n, seed)
    base = max_rss_gb()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(READOUT_PASSES):
        for _chunk in stream:
            pass
    gen_s, gen_cpu = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    sub = principal_subspace(stream, rank, n=n, dim=Scale.values_per_trial, seed=seed,
                             oversample=READOUT_OVERSAMPLE, exact_max=0, progress=progress,
                             desc=f"read-out subspace (n={n})")
    total, total_cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"seconds": total, "fit_seconds": max(total - gen_s, 1e-3), "stream_seconds": gen_s,
            "fit_cpu_seconds": max(total_cpu - gen_cpu, 1e-3),
            "base_rss_gb": base, "exact": bool(sub.exact), "explained_top32": float(sub.ratio[:32].sum()),
            "basis_shape": list(sub.basis.shape), "threads": torch.get_num_threads()}


def row_stage1_readout(args: argparse.Namespace) -> Row:
    n1, rank = _size(args, (READOUT_CHUNK, 16), (READOUT_CHUNK, 64), (1000, READOUT_RANK))
    n2 = 2 * n1
    r1, _, peak1 = run_isolated(_readout_fit, n1, rank, args.seed, args.progress)
    r2, _, peak2 = run_isolated(_readout_fit, n2, rank, args.seed, args.progress)
    d, k, p = Scale.values_per_trial, READOUT_RANK, READOUT_OVERSAMPLE
    N = Scale.train_patterns
    k_time = scaling_exponent(n1, r1["fit_seconds"], n2, r2["fit_seconds"])
    # the fit check uses CPU time (user + system of the child): wall time on a shared 2-core machine is noisy
    k_cpu = scaling_exponent(n1, r1["fit_cpu_seconds"], n2, r2["fit_cpu_seconds"])
    k_rss = scaling_exponent(n1, peak1 - r1["base_rss_gb"], n2, peak2 - r2["base_rss_gb"])
    # CPU: a fixed part (the d x (k+p) QR factorisations, ~2 d (k+p)^2 per pass) + a part linear in n
    per_n = max(0.0, (r2["fit_cpu_seconds"] - r1["fit_cpu_seconds"]) / (n2 - n1))
    fixed = max(0.0, r1["fit_cpu_seconds"] - per_n * n1)
    cpu_s_full = fixed + per_n * N
    flops_full = 4 * N * d * (k + p) * READOUT_PASSES
    gpu_s = flops_full / (NODE["efficiency"] * A100_FP32_TFLOPS * 1e12)
    io_gb = READOUT_PASSES * Scale.train_trials * Scale.values_per_trial * 2 / GB
    io_s = io_gb / STORE_READ_GBPS
    wall_h = (gpu_s + io_s) / 3600
    node_h = NODE["gpus"] * wall_h  # rank 0 fits, the other ranks wait for the broadcast
    fit_mem_gb = (5 * (k + p) * d + 3 * READOUT_CHUNK * d) * 4 / GB
    old_gb = OLD_PATH_MULTIPLIER * N * d * 4 / GB
    measured = {"seconds": r1["seconds"] + r2["seconds"], "peak_rss_gb": peak2, "n": [n1, n2], "d": d,
                "rank_measured": rank, "rank_projected": k,
                "oversample": p, "chunk": READOUT_CHUNK, "passes": READOUT_PASSES, "exact_path": r2["exact"],
                "fit_seconds": [r1["fit_seconds"], r2["fit_seconds"]],
                "stream_seconds": [r1["stream_seconds"], r2["stream_seconds"]], "peak_rss_gb_n1": peak1,
                "child_base_rss_gb": r2["base_rss_gb"], "scaling_exponent": k_cpu, "time_exponent": k_time,
                "fit_cpu_seconds": [r1["fit_cpu_seconds"], r2["fit_cpu_seconds"]], "scaling_exponent_rss": k_rss,
                "explained_top32": r2["explained_top32"]}
    arithmetic = [
        f"measured: principal_subspace (randomised path, k={rank}, p={p}, {READOUT_PASSES} passes, chunks of "
        f"{READOUT_CHUNK} x {d:,}) on n={n1:,} and {n2:,} streamed patterns on CPU: fit {r1['fit_seconds']:.1f} s and "
        f"{r2['fit_seconds']:.1f} s after subtracting the synthetic stream (wall ~ n^{k_time:.2f}, CPU time ~ "
        f"n^{k_cpu:.2f}); peak RSS "
        f"{peak1:.2f} / {peak2:.2f} GB (growth over the imports ~ n^{k_rss:.2f}: bounded)",
        f"CPU (not the shipped path) at k={rank}: {fixed:.1f} core-s fixed + {1e3 * per_n:.1f} core-ms/pattern x "
        f"{N:,} = {cpu_s_full / 3600:.2f} core-hours",
        f"GPU (rank 0, device=self.device) at k={k}: 4 n d (k+p) x {READOUT_PASSES} passes = {flops_full / 1e12:.0f} TFLOP at "
        f"FP32 {A100_FP32_TFLOPS} TFLOPS x {NODE['efficiency']} = {gpu_s:.0f} s, + reading the training trials "
        f"{READOUT_PASSES} times ({io_gb:.0f} GB float16) at an assumed {STORE_READ_GBPS} GB/s = {io_s:.0f} s",
        f"node time: once, on rank 0, before the first epoch; {NODE['gpus'] - 1} ranks wait for the broadcast: "
        f"{NODE['gpus']} x {wall_h * 3600:.0f} s = {node_h:.3f} A100-hours (not recomputed on resume)",
        f"memory of the fit: 5 (k+p) d + 3 chunk d float32 = {fit_mem_gb:.2f} GB, independent of n",
        f"old path (exact, every rank): {OLD_PATH_MULTIPLIER} x {N:,} x {d:,} x 4 B = {old_gb:.0f} GB per rank, "
        f"{NODE['gpus'] * old_gb / 1e3:.1f} TB for 8 ranks (did not fit)",
    ]
    return Row("stage1_readout", "neurovision.models.readout.principal_subspace (AlignmentTask's read-out fit: "
               "streamed randomised PCA, rank 0 only) on synthetic streamed patterns at d = 214,032",
               measured, projected(ram_gb=max(peak2, fit_mem_gb + r2["base_rss_gb"]), gpu_mem_gb=fit_mem_gb,
                                   gpu_hours=node_h, cpu_core_hours=0.0), arithmetic, True,
               notes=f"old exact path: {old_gb:.0f} GB per rank")


# ============================================================================================ encoding
ENC_MODELS = 6           # experiments/encoding.yaml: vision, language, multimodal and their random twins
ENC_BANDED_ITERS = 20    # the linear baseline: banded ridge, n_iter 20 plain-ridge fits on [vision, language]
ENC_SETS = 2             # event sets: language, vision
ENC_FOLDS, ENC_INNER, ENC_ALPHAS = 5, 5, 7
ENC_FEATURES = 768       # features per layer after the sparse JL projection (<= 495 at 30k items; 768 bounds it)
ENC_STORED_MODELS = 7    # predictions kept: the 6 compared models' first layer + the linear baseline
A100_FP64_TFLOPS = 19.5  # the bootstrap's float64 products (tensor-core FP64)


def _enc_data(events: int, features: int, targets: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((events, features), dtype=np.float32)
    w = rng.standard_normal((features, targets), dtype=np.float32) / np.sqrt(features)
    y = 0.3 * (x @ w) + rng.standard_normal((events, targets), dtype=np.float32)
    return x, y


def _fold_sizes(events: int) -> list[tuple[int, list[int]]]:
    """(training events, inner block sizes) of each outer fold, as ridge.blocked_folds splits them."""
    out = []
    for test in np.array_split(np.arange(events), ENC_FOLDS):
        n = events - len(test)
        out.append((n, [len(b) for b in np.array_split(np.arange(n), ENC_INNER)]))
    return out


def _downdate_flops(events: int, features: int) -> tuple[float, float, float, float]:
    """FLOPs of one ``cross_validated_ridge`` fit (default ``inner_cv="downdate"``, ridge._ridge_cv_downdate):
    (fixed, per target) of the matmuls FlopCounterMode counts, then (fixed, per target) of the work it does not
    count: eigendecompositions (~9 r³ each, ENC_INNER + 1 per fold), the SVDs of X (p > n) and of each held-out
    block's (n_b x r) projection when n_b > r (~4 m r² + 22 r³), and the numpy predictions (2 n_test p)."""
    fixed = per_t = unc_fixed = unc_per_t = 0.0
    p = features
    for n, blocks in _fold_sizes(events):
        r = min(n, p)
        fixed += 2 * n * r * r + sum(4 * nb * r * r for nb in blocks)  # Gram; X_bᵀX_b and (X_b - μ) Q_b
        per_t += 2 * n * r + 4 * r * r + 2 * r  # Xᵀy by block; the refit (Qᵀ C, Q (d z), μ w)
        per_t += (2 * p * r) if p > n else 0.0  # weights back from the row space
        unc_fixed += (ENC_INNER + 1) * 9 * r ** 3 + ((4 * n * n * p + 22 * n ** 3) if p > n else 0.0)
        unc_per_t += 2 * (events - n) * p
        for nb in blocks:
            # Qᵀ C_b; the (k x r) @ (r x α·t) product of every α; the squared errors (an einsum, counted)
            per_t += 2 * r * r + 2 * ENC_ALPHAS * min(nb, r) * r + 2 * ENC_ALPHAS * min(nb, r)
            if nb > r:
                per_t += 2 * nb * r  # Lᵀ (y_b - ν)
                unc_fixed += 4 * nb * r * r + 22 * r ** 3
    return fixed, per_t, unc_fixed, unc_per_t


def _refit_flops(events: int, features: int) -> tuple[float, float]:
    """(fixed, per target) FLOPs of himalaya's inner CV that refits every inner fold (``inner_cv="refit"``, and
    each of ``GroupRidgeCV``'s random-search iterations): per inner fold the (α, p, n_in) resolution matrices,
    the (α, n_b, n_in) test products and predictions; the refit on all rows. An upper bound (every α refit)."""
    fixed = per_t = 0.0
    a, p = ENC_ALPHAS, features
    for n, blocks in _fold_sizes(events):
        for nb in blocks:
            n_in = n - nb
            fixed += 2 * a * p * min(n_in, p) * n_in + 2 * a * nb * p * n_in
            per_t += 2 * a * nb * n_in
        fixed += 2 * a * p * min(n, p) * n
        per_t += 2 * a * p * n + 2 * (events - n) * p
    return fixed, per_t


def _fit_ram_gb(events: int, features: int, targets: int) -> float:
    """RAM of one fit beyond the interpreter: Y, its scaled training copy and the kept predictions (float32
    E x T each) + one test fold's float64 predictions; X and its scaled copies (3 x E x p float32); the
    solver's eigenvectors ((ENC_INNER + 1) r²), held-out block products (ENC_INNER r²) and projections (E x r);
    its target batch temporaries, at most ~1 GiB (ridge._MEMORY_BUDGET)."""
    n = events - events // ENC_FOLDS
    r = min(n, features)
    per_t = 4 * (n + (ENC_INNER + 3) * r + 2 * n // ENC_INNER)
    total = (12 * events + 8 * (events // ENC_FOLDS)) * targets + 4 * (3 * events * features
                                                                        + (2 * ENC_INNER + 1) * r * r + events * r)
    return (total + min(per_t * targets, 2 ** 30)) / GB


def _encoding_fit(events: int, features: int, targets: int, seed: int) -> dict[str, Any]:
    """Child: neurovision.encoding.ridge.cross_validated_ridge (default exact blocked inner CV, himalaya torch
    backend, float32, 7 alphas, 5 x 5 blocked folds) under FlopCounterMode; out-of-fold predictions kept as
    the pipeline keeps them."""
    import torch

    from neurovision.encoding.ridge import cross_validated_ridge

    x, y = _enc_data(events, features, targets, seed)
    cross_validated_ridge(x[:50, :8], y[:50, :4], folds=2, inner_folds=2, backend="torch")  # imports, warm-up
    a = torch.randn(1024, 1024)
    t0 = time.perf_counter()
    for _ in range(8):
        a @ a
    blas = 8 * 2 * 1024 ** 3 / (time.perf_counter() - t0)
    base = max_rss_gb()
    t0 = time.perf_counter()
    res, flops = count_flops(cross_validated_ridge, x, y, folds=ENC_FOLDS, inner_folds=ENC_INNER,
                             alphas=np.logspace(-1, 5, ENC_ALPHAS), backend="torch", return_predictions=True)
    return {"seconds": time.perf_counter() - t0, "flops": flops, "base_rss_gb": base, "blas_flops_per_s": blas,
            "mean_r": float(np.mean(res.r)), "threads": torch.get_num_threads()}


def _encoding_fit_pair(events: int, features: int, targets: tuple[int, int], seed: int) -> dict[str, Any]:
    """Child: :func:`_encoding_fit` at two target counts in one process (the second, larger, sets the peak),
    after one untimed fit at the first count (first-call costs made the smaller fit look the slower)."""
    _encoding_fit(events, features, targets[0], seed)
    return {"runs": [_encoding_fit(events, features, t, seed) for t in targets]}


def row_encoding_fit(args: argparse.Namespace) -> Row:
    # the default size is one subject's real events and features with a slice of its targets: the per-target
    # cost is then measured in the regime of the full fit (held-out blocks of 4,800 events > 768 features)
    E, F, T1 = _size(args, (200, 32, 32), (3000, 128, 64), (Scale.bt_events_per_subject, ENC_FEATURES, 256))
    T2 = 2 * T1
    both, _, p2 = run_isolated(_encoding_fit_pair, E, F, (T1, T2), args.seed)
    r1, r2 = both["runs"]
    k_time = scaling_exponent(T1, r1["seconds"], T2, r2["seconds"])
    k_flops = scaling_exponent(T1, r1["flops"], T2, r2["flops"])  # deterministic (time is noisy on shared cores)
    # counted FLOPs = fixed (Grams, projections) + per target; the cost model must reproduce them
    per_t = max(0.0, (r2["flops"] - r1["flops"]) / (T2 - T1))
    fixed = max(0.0, r1["flops"] - per_t * T1)
    m_fixed, m_per_t, m_unc_fixed, m_unc_per_t = _downdate_flops(E, F)
    c_fixed, c_per_t = fixed / max(m_fixed, 1.0), per_t / max(m_per_t, 1.0)  # measured / model (~1)
    Ef, Tf = Scale.bt_events_per_subject, Scale.bt_targets_per_subject
    f_lo, f_hi = ENC_FEATURES, Scale.bt_feature_dims[1]

    def fit_flops(features: int) -> tuple[float, float]:
        """(counted-model FLOPs scaled by the measured ratios, uncounted FLOPs) of one subject's fit."""
        fx, pt, ufx, upt = _downdate_flops(Ef, features)
        return fx * c_fixed + pt * c_per_t * Tf, ufx + upt * Tf

    (cnt_lo, unc_lo), (cnt_hi, unc_hi) = fit_flops(f_lo), fit_flops(f_hi)
    plain, plain_hi = cnt_lo + unc_lo, cnt_hi + unc_hi
    b_fixed, b_per_t = _refit_flops(Ef, 2 * f_lo)
    banded = ENC_BANDED_ITERS * (b_fixed + b_per_t * Tf)
    o_fixed, o_per_t = _refit_flops(Ef, f_lo)
    old_plain = o_fixed + o_per_t * Tf
    jobs = Scale.bt_subjects * ENC_SETS
    total = jobs * (ENC_MODELS * plain + banded)
    hours = gpu_hours(total, tflops=A100_FP32_TFLOPS)
    # this CPU: the effective rate of the measured fit (all its work, counted or not, over its wall time)
    meas_work = m_fixed * c_fixed + m_per_t * c_per_t * T2 + m_unc_fixed + m_unc_per_t * T2
    rate = meas_work / r2["seconds"]
    cpu_core_h = total / rate * r2["threads"] / 3600
    subj_cpu_h, subj_cpu_h_hi = plain / rate / 3600, plain_hi / rate / 3600
    subj_gpu_s = gpu_hours(plain, tflops=A100_FP32_TFLOPS) * 3600
    subj_gpu_s_hi = gpu_hours(plain_hi, tflops=A100_FP32_TFLOPS) * 3600
    base = r2["base_rss_gb"]
    ram_meas_model = base + _fit_ram_gb(E, F, T2)
    ram, ram_hi = base + _fit_ram_gb(Ef, f_lo, Tf), base + _fit_ram_gb(Ef, f_hi, Tf)
    disk = jobs * ENC_STORED_MODELS * Ef * Tf * 2 / GB
    measured = {"seconds": r1["seconds"] + r2["seconds"], "peak_rss_gb": p2, "events": E, "features": F,
                "targets": [T1, T2], "seconds_by_targets": [r1["seconds"], r2["seconds"]],
                "gflops_counted": [r1["flops"] / 1e9, r2["flops"] / 1e9], "scaling_exponent": k_flops,
                "time_exponent": k_time, "model_ratio_fixed": c_fixed, "model_ratio_per_target": c_per_t,
                "ram_model_gb": ram_meas_model, "cpu_effective_gflops_per_s": rate / 1e9,
                "cpu_blas_gflops_per_s": r2["blas_flops_per_s"] / 1e9, "threads": r2["threads"],
                "mean_r": r2["mean_r"]}
    arithmetic = [
        f"measured: cross_validated_ridge (exact blocked inner CV from Gram downdates, himalaya torch backend, "
        f"float32, {ENC_ALPHAS} alphas, {ENC_FOLDS} x {ENC_INNER} blocked folds, predictions kept) at {E:,} events x "
        f"{F} features x {T1:,} / {T2:,} targets on CPU: {r1['seconds']:.1f} s / {r2['seconds']:.1f} s (time ~ "
        f"T^{k_time:.2f}, FLOPs ~ T^{k_flops:.2f}), peak RSS {p2:.2f} GB (memory model: {ram_meas_model:.2f} GB)",
        f"FLOPs counted (FlopCounterMode): {r1['flops'] / 1e9:.1f} / {r2['flops'] / 1e9:.1f} G -> {fixed / 1e9:.2f} G "
        f"fixed + {per_t / 1e6:.2f} M per target; the cost model (_downdate_flops: Gram 2nr², downdates and "
        f"projections 4nr², per target 2nr + {ENC_INNER} x (2r² + {ENC_ALPHAS} x 2 min(n_b, r) (r + 1)) + 4r² "
        f"[+ 2 n_b r when n_b > r]) gives x {c_fixed:.3f} / x {c_per_t:.3f} of that",
        f"one subject, one model layer: {Ef:,} events x {Tf:,} targets ({Scale.bt_electrodes // Scale.bt_subjects} "
        f"electrodes x {Scale.bt_bins} bins): {f_lo} features {cnt_lo / 1e12:.1f} TFLOP counted + "
        f"{unc_lo / 1e12:.1f} T uncounted (eigh/SVD ~9r³ / 4mr²+22r³, numpy predictions) = {plain / 1e12:.1f} TFLOP; "
        f"{f_hi:,} features {plain_hi / 1e12:.0f} TFLOP (the inner CV before issue 22 at {f_lo}: "
        f"{old_plain / 1e12:.0f} TFLOP)",
        f"time per subject and model layer: {f_lo} features {subj_cpu_h:.2f} h on this CPU (effective "
        f"{rate / 1e9:.0f} GFLOP/s on {r2['threads']} threads, measured) or {subj_gpu_s:.0f} s on an A100 (FP32 "
        f"{A100_FP32_TFLOPS} TFLOPS x {NODE['efficiency']}); {f_hi:,} features {subj_cpu_h_hi:.1f} h / "
        f"{subj_gpu_s_hi:.0f} s",
        f"banded baseline (himalaya GroupRidgeCV, every inner fold refit; upper bound): {ENC_BANDED_ITERS} x "
        f"{2 * f_lo} features = {banded / 1e12:.0f} TFLOP per subject and set",
        f"all: {Scale.bt_subjects} subjects x {ENC_SETS} event sets x ({ENC_MODELS} models x 1 layer at {f_lo} + "
        f"banded) = {total / 1e15:.2f} PFLOP -> {hours:.2f} A100-hours (each extra {f_lo}-feature layer: + "
        f"{jobs * plain / 1e15:.3f} PFLOP, a {f_hi:,}-feature one + {jobs * plain_hi / 1e15:.2f} PFLOP); CPU "
        f"alternative >= {cpu_core_h:,.0f} core-hours",
        f"RAM per fit (_fit_ram_gb): Y, its scaled copy, predictions (3 x {Ef:,} x {Tf:,} float32 = "
        f"{3 * 4 * Ef * Tf / GB:.1f} GB) + a fold's float64 predictions + X and copies + eigenvectors and block "
        f"projections + <= 1 GiB target-batch temporaries = {ram:.1f} GB at {f_lo} features, {ram_hi:.1f} GB at "
        f"{f_hi:,}",
        f"disk: predictions float16 for the {ENC_STORED_MODELS} compared fits per (subject, set): {jobs} x "
        f"{ENC_STORED_MODELS} x {Ef:,} x {Tf:,} x 2 B = {disk:.0f} GB (other layers keep r and alpha only)",
    ]
    return Row("encoding_fit", "neurovision.encoding.ridge.cross_validated_ridge on generated data at one Brain "
               "Treebank subject's events and feature width with a slice of its targets, FLOPs counted, modelled "
               "and scaled to 10 subjects x 30k events x 25.8k targets", measured,
               projected(ram_gb=max(ram, ram_hi), gpu_mem_gb=max(ram, ram_hi) - base, disk_gb=disk,
                         gpu_hours=hours),
               arithmetic, True, notes=f"CPU-only alternative: {cpu_core_h:,.0f} core-hours")


def _encoding_bootstrap(events: int, sites: int, n_boot: int, seed: int) -> dict[str, Any]:
    """Child: bootstrap_indices (block 20) + integration_sites (multimodal vs vision, language, linear) on
    generated targets and predictions of ``sites`` x 161 bins."""
    import torch

    from neurovision.encoding.stats import bootstrap_indices, integration_sites

    rng = np.random.default_rng(seed)
    t = sites * Scale.bt_bins
    y = rng.standard_normal((events, t), dtype=np.float32)
    preds = {k: (0.2 * y + rng.standard_normal((events, t), dtype=np.float32)).astype(np.float32)
             for k in ("multimodal", "vision", "language", "linear")}
    base = max_rss_gb()
    t0 = time.perf_counter()
    idx = bootstrap_indices(events, n_boot=n_boot, seed=seed, block=20)
    df = integration_sites(y, preds, idx, n_bins=Scale.bt_bins, min_bins=3)
    return {"seconds": time.perf_counter() - t0, "base_rss_gb": base, "sites": int(len(df)),
            "threads": torch.get_num_threads()}


def _boot_flops(events: float, targets: float, n_boot: float, models: int) -> float:
    """stats._boot_r_many: (n_boot x events) counts @ (events x (2 + 3 m) targets) moments, float64."""
    return 2.0 * n_boot * events * (2 + 3 * models) * targets


def row_encoding_bootstrap(args: argparse.Namespace) -> Row:
    E1, sites, n_boot = _size(args, (400, 2, 100), (1000, 4, 500), (2500, 12, 1000))
    E2 = 2 * E1
    r1, _, p1 = run_isolated(_encoding_bootstrap, E1, sites, n_boot, args.seed)
    r2, _, p2 = run_isolated(_encoding_bootstrap, E2, sites, n_boot, args.seed)
    k_time = scaling_exponent(E1, r1["seconds"], E2, r2["seconds"])
    T = sites * Scale.bt_bins
    meas_flops = _boot_flops(E2, T, n_boot, 4)
    rate = meas_flops / r2["seconds"]
    Ef, Tf, B = Scale.bt_events_per_subject, Scale.bt_targets_per_subject, Scale.bt_bootstraps
    jobs = Scale.bt_subjects * ENC_SETS
    per_job = _boot_flops(Ef, Tf, B, 4) + 3 * _boot_flops(Ef, Tf, B, 2)  # integration + 3 pairs
    total = jobs * per_job
    hours = gpu_hours(total, tflops=A100_FP64_TFLOPS)
    cpu_core_h = total / rate * r2["threads"] / 3600
    # memory: what Encoder.run holds at the statistics step: y, its fold-centred copy and the decoded float32
    # predictions of every compared fit (6 models + the linear baseline), + the float64 moment chunks and counts
    data_gb = (2 + ENC_STORED_MODELS) * 4 * Ef * Tf / GB
    idx_gb = B * Ef * (4 + 8) / GB  # int32 indices + a float64 counts batch bound
    boots_gb = 4 * B * Tf * 8 / GB  # integration_sites holds each model's (n_boot, targets) float64 r
    ram = r2["base_rss_gb"] + data_gb + idx_gb + boots_gb + 1.0
    subj_cpu_h = per_job / rate / 3600  # one subject and event set on this CPU
    subj_gpu_s = gpu_hours(per_job, tflops=A100_FP64_TFLOPS) * 3600
    measured = {"seconds": r1["seconds"] + r2["seconds"], "peak_rss_gb": p2, "events": [E1, E2], "sites": sites,
                "bins": Scale.bt_bins, "targets": T, "n_boot": n_boot,
                "seconds_by_events": [r1["seconds"], r2["seconds"]], "scaling_exponent": k_time,
                "cpu_gflops_per_s_fp64": rate / 1e9, "threads": r2["threads"]}
    arithmetic = [
        f"measured: bootstrap_indices (block 20) + integration_sites (multimodal vs vision, language, linear; "
        f"BH-FDR, min 3 bins) at {E1:,} / {E2:,} events x {T:,} targets ({sites} sites x {Scale.bt_bins} bins) x "
        f"{n_boot} resamples: {r1['seconds']:.1f} s / {r2['seconds']:.1f} s (time ~ events^{k_time:.2f}), peak RSS "
        f"{p2:.2f} GB",
        f"FLOPs: 2 n_boot E (2 + 3 m) T float64 per comparison set (m models): per (subject, set) integration "
        f"(m=4) + 3 pairs (m=2) at {Ef:,} x {Tf:,} x {B}: {per_job / 1e12:.0f} TFLOP; x {jobs} = "
        f"{total / 1e15:.2f} PFLOP",
        f"GPU (stats on the regression's CUDA device): FP64 {A100_FP64_TFLOPS} TFLOPS x {NODE['efficiency']} = "
        f"{hours:.2f} A100-hours; CPU alternative at the measured {rate / 1e9:.1f} GFLOP/s on {r2['threads']} "
        f"threads: {cpu_core_h:,.0f} core-hours",
        f"time per subject and event set ({Ef:,} events x {Tf:,} targets, {B} resamples): {subj_cpu_h:.1f} h on "
        f"this CPU ({r2['threads']} threads) or {subj_gpu_s:.0f} s on an A100 (FP64)",
        f"RAM: y, fold-centred y and {ENC_STORED_MODELS} compared fits' predictions as float32 ({data_gb:.1f} GB) "
        f"+ indices/counts ({idx_gb:.2f} GB) + 4 models' bootstrap r (4 x {B} x {Tf:,} float64 = "
        f"{boots_gb:.2f} GB) + ~1 GB moment chunks (targets in chunks of stats._TARGET_BUDGET) = {ram:.1f} GB",
    ]
    return Row("encoding_bootstrap", "neurovision.encoding.stats bootstrap_indices + integration_sites on "
               "generated targets/predictions at Brain Treebank widths (bounded events)", measured,
               projected(ram_gb=ram, gpu_mem_gb=1.0 + idx_gb, gpu_hours=hours), arithmetic, True,
               notes=f"CPU-only alternative: {cpu_core_h:,.0f} core-hours")


# ============================================================================================ registry
ROWS: dict[str, Callable[[argparse.Namespace], Row]] = {
    "prepare": row_prepare,
    "teacher_cache": row_teacher_cache,
    "stage1_train": row_stage1_train,
    "stage1_readout": row_stage1_readout,
    "encoding_fit": row_encoding_fit,
    "encoding_bootstrap": row_encoding_bootstrap,
}
