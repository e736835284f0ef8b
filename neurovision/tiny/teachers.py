"""Train tiny, meaningful teachers on a phantom store (real open_clip / diffusers classes, CPU minutes).

The full-size teachers (CLIP ViT-L/14, the SD-2.1 VAE) are downloaded by the user and loaded from local
paths; for CPU runs and the demo chain we train tiny ones on the store's own *train and val* stimuli:

- :func:`train_tiny_clip`: a tiny open_clip ``CLIP`` (by default a ``ModifiedResNet`` image tower, the CLIP
  RN50 family, and a text transformer with open_clip's offline ``SimpleTokenizer``), contrastive (open_clip's
  ``ClipLoss``, learnable temperature) on (image, one of its five captions at random) pairs. Captions name
  every object's size, colour, shape and position, so embeddings separate individual scenes, not only their
  classes. Writes ``tiny_clip.json`` (an open_clip model config) and ``tiny_clip.pt`` (state dict), which load
  as ``OpenCLIPImageTeacher(model_name="tiny_clip", model_config=".../tiny_clip.json",
  checkpoint=".../tiny_clip.pt")``.
- :func:`train_tiny_vae`: a tiny ``AutoencoderKL`` (MSE reconstruction + a small KL), its ``scaling_factor``
  then set to 1 / std of the latents (as SD did); saved with ``save_pretrained`` to ``tiny_vae/``, which
  loads as ``VAETeacher(path=".../tiny_vae", image_size=64)``.

Each writes a ``*_metrics.json`` with the loss curve, wall time and test-set scores (the 300 shared test
images of the demo store): image<->caption retrieval, embedding uniqueness and simulated noisy retrieval
(CLIP), reconstruction PSNR (VAE).

Why a ResNet image tower for the tiny CLIP (the real teacher is a ViT): with the same 10 epochs (~4 CPU
minutes) on the demo store, a ViT tower (width 128, 4 layers, patch 8) reached 25 % image->caption top-1
among the 300 test images, its errors mostly object positions and shapes; the ResNet tower reached 84 %.
Both are open_clip's own classes, chosen by the config JSON (``tiny_clip_config(tower=...)``).

``neurovision tiny teachers --store data/phantom_demo.h5 --out teachers/phantom_demo`` trains
both, skipping what already exists (``--force`` retrains).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from neurovision.data.atomic import atomic_dir, atomic_path, shared_mode, write_json
from neurovision.data.store import SPLITS, Store
from neurovision.tiny.loop import (
    PassBatches,
    StepModule,
    deprecated_max_minutes,
    fit,
    resolve_steps,
    set_threads,
    warmup_cosine,
)

log = logging.getLogger(__name__)

CLIP_NAME = "tiny_clip"
VAE_DIR = "tiny_vae"


# --------------------------------------------------------------------------------------------- helpers
def tiny_clip_config(
    image_size: int = 64,
    tower: Literal["resnet", "vit"] = "resnet",
    embed_dim: int = 128,
    width: int | None = None,
    layers: int | None = None,
    patch_size: int = 8,
    text_width: int = 128,
    text_layers: int = 2,
    context_length: int = 32,
) -> dict[str, Any]:
    """An open_clip model config (the ``model_configs/*.json`` form) for a tiny CLIP.

    ``tower="resnet"`` (default) is open_clip's ``ModifiedResNet`` (the CLIP RN50 family: conv stages +
    attention pooling) with one bottleneck per stage, width 32; ``"vit"`` its ``VisionTransformer`` (width
    128, 4 layers, patch 8). On the phantom demo (10 epochs, ~4 CPU minutes) the ResNet reaches 84 %
    image->caption top-1 among 300 test images, the ViT 25 %: the ViT lacks the locality prior to learn
    small shapes and positions from 2,560 images (see the module notes).
    """
    if tower == "resnet":
        vision: dict[str, Any] = {"image_size": image_size, "layers": [1, 1, 1, 1] if layers is None
                                  else [layers] * 4, "width": width or 32, "head_width": 32}
        if image_size % 32:
            raise ValueError(f"a ResNet tower needs image_size divisible by 32, got {image_size}")
    elif tower == "vit":
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        w = width or 128
        vision = {"image_size": image_size, "layers": layers or 4, "width": w, "head_width": min(32, w),
                  "patch_size": patch_size}
    else:
        raise ValueError(f"tower must be 'resnet' or 'vit', got {tower!r}")
    return {
        "embed_dim": embed_dim,
        "vision_cfg": vision,
        "text_cfg": {"context_length": context_length, "vocab_size": 49408, "width": text_width,
                     "heads": max(1, text_width // 32), "layers": text_layers},
    }


def stimuli_of(store: Store, splits: Sequence[str]) -> np.ndarray:
    """Sorted unique stimulus rows shown in trials of the given splits."""
    mask = np.isin(store.trials["split"], [SPLITS.index(s) for s in splits])
    return np.unique(store.trials["stimulus"][mask])


def load_images(store: Store, index: np.ndarray) -> torch.Tensor:
    """uint8 (N, 3, H, W) images of the given (sorted) stimulus rows."""
    return torch.from_numpy(store.images(np.sort(index))).permute(0, 3, 1, 2).contiguous()


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name in ("logit_scale", "logit_bias"):
            continue  # a group of their own
        (no_decay if p.ndim < 2 or "embedding" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# --------------------------------------------------------------------------------------------- CLIP
def train_tiny_clip(
    store: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 0.1,
    logit_scale_lr: float = 0.05,
    seed: int = 0,
    config: dict[str, Any] | None = None,
    max_minutes: float | None = None,
    evaluate: bool = True,
    progress: bool = True,
    steps: int | None = None,
) -> Path:
    """Contrastively train a tiny open_clip CLIP on the store's train+val (image, caption) pairs.

    Args:
        store: a phantom (or any captioned) store.
        out_dir: receives ``tiny_clip.json``, ``tiny_clip.pt`` and ``tiny_clip_metrics.json``.
        epochs: passes over the train+val images (each time with a fresh random caption per image); the step
            budget is ``epochs`` x (images // ``batch_size``) unless ``steps`` is given.
        batch_size: pairs per step (the contrastive negatives).
        lr: peak AdamW learning rate (linear warm-up over 5 % of the steps, cosine decay).
        weight_decay: AdamW weight decay (not on gains, biases, embeddings or the temperature).
        logit_scale_lr: learning rate of the (learnable) log inverse temperature: open_clip trains it at the
            model's rate over ~1e5 steps; in a few hundred it needs a faster one to leave its initial 1/0.07.
        seed: initialisation, order and caption choice.
        config: an open_clip model config; default :func:`tiny_clip_config` at the store's image size.
        max_minutes: deprecated and ignored (was a wall-clock budget; see :func:`neurovision.tiny.loop.deprecated_max_minutes`).
        evaluate: score the saved model on the store's test images (written to the metrics file).
        progress: show a tqdm bar.
        steps: the budget in optimiser steps (overrides ``epochs``; passes continue with fresh permutations).
            The schedule follows the step, so the same seed gives the same weights on any load.

    Returns:
        ``out_dir``.
    """
    from open_clip import ClipLoss

    from neurovision.pretrained.teachers import OpenCLIPImageTeacher

    deprecated_max_minutes(max_minutes, "train_tiny_clip")
    t_start = time.time()
    out = Path(out_dir)
    st = Store(store)
    h, w = st.image_shape[:2]
    cfg = config if config is not None else tiny_clip_config(image_size=int(h))
    cfg_path = out / f"{CLIP_NAME}.json"
    write_json(cfg_path, cfg)

    torch.manual_seed(seed)
    order_rng, rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    teacher = OpenCLIPImageTeacher(model_name=CLIP_NAME, model_config=str(cfg_path), seed=seed, device="cpu")
    model = teacher.model
    idx = stimuli_of(st, ("train", "val"))
    images = load_images(st, idx)
    captions = [st.annotations("captions", int(i)) for i in idx]
    n_caps = min(len(c) for c in captions)
    tokens = torch.stack([teacher.tokenizer([c[k] for c in captions]) for k in range(n_caps)], 1)  # (N, K, L)
    baseline = evaluate_clip(st, teacher) if evaluate else None

    model.train().requires_grad_(True)
    loss_fn = ClipLoss()
    groups = _param_groups(model, weight_decay)
    temperature = [p for name, p in model.named_parameters() if name in ("logit_scale", "logit_bias")]
    groups.append({"params": temperature, "weight_decay": 0.0, "lr_scale": logit_scale_lr / lr})
    n = len(idx)
    total = resolve_steps(n, batch_size, epochs, steps, "train_tiny_clip")
    batches = PassBatches(n, batch_size, total, order_rng)

    def step_fn(sel: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        cap = torch.from_numpy(rng.integers(0, n_caps, len(sel)))
        img_f = model.encode_image(teacher.preprocess(images[sel]), normalize=True)
        txt_f = model.encode_text(tokens[sel, cap], normalize=True)
        loss = loss_fn(img_f, txt_f, model.logit_scale.exp())
        return loss, {"loss": loss.item(), "T": model.logit_scale.detach().exp().item()}

    def clamp_temperature() -> None:
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))

    warmup = max(1, total // 20)
    module = StepModule(model, step_fn, lr=lr, param_groups=groups, betas=(0.9, 0.98), eps=1e-6,
                        schedule=lambda k: warmup_cosine(k, total, warmup), after_step=clamp_temperature)
    step = fit(module, batches, desc="tiny CLIP", progress=progress)
    losses, steps_per_epoch = module.losses, batches.steps_per_epoch
    model.eval().requires_grad_(False)
    train_s = time.time() - t_start
    ckpt = out / f"{CLIP_NAME}.pt"
    with atomic_path(ckpt) as t:
        torch.save(model.state_dict(), t)

    metrics: dict[str, Any] = {
        "store": str(st.path), "n_pairs_images": n, "epochs": batches.epochs, "batch_size": batch_size, "lr": lr,
        "seed": seed, "steps": step, "planned_steps": total, "torch_threads": torch.get_num_threads(),
        "train_wall_s": round(train_s, 1),
        "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
        "loss_first_epoch_mean": float(np.mean(losses[:steps_per_epoch])) if losses else None,
        "loss_last_epoch_mean": float(np.mean(losses[-steps_per_epoch:])) if losses else None,
        "logit_scale": model.logit_scale.detach().exp().item(), "losses": losses, "config": cfg,
    }
    if evaluate:
        loaded = OpenCLIPImageTeacher(model_name=CLIP_NAME, model_config=str(cfg_path), checkpoint=str(ckpt),
                                      device="cpu")
        metrics["test"] = evaluate_clip(st, loaded)
        metrics["test_untrained"] = baseline
    metrics["wall_s"] = round(time.time() - t_start, 1)
    write_json(out / f"{CLIP_NAME}_metrics.json", metrics)
    return out


@torch.no_grad()
def evaluate_clip(store: Store, teacher: Any, split: str = "test",
                  noise_levels: Sequence[float] = (0.5, 1.0, 1.5)) -> dict[str, Any]:
    """How well (and how uniquely) a CLIP teacher embeds the store's images of one split.

    - ``i2t_top1`` / ``t2i_top1``: image <-> caption retrieval among the split's N images (caption 1, which
      names size, colour, shape and position); ``*_mean5`` with the mean of the five caption embeddings;
      ``i2t_top1_same_scene``: the retrieved caption describes the same scene (duplicates are not errors).
    - ``nn_different_scene``: images whose nearest other image (cosine) has a different scene description;
      ``with_duplicate``: images that have another image with the same description (only those can have a
      same-scene neighbour), ``nn_same_scene_of_duplicates``: how many of those do find one.
    - ``mean_offdiag_cos`` / ``max_offdiag_cos_diff_scene``: how spread out the embeddings are.
    - ``noisy_self_top1``: retrieval of each image from its own embedding plus Gaussian noise of total norm
      r (embeddings are unit norm) among the N clean ones: a proxy of stage 1's fMRI -> image retrieval.
    """
    idx = stimuli_of(store, (split,))
    images = load_images(store, idx)
    emb = torch.cat([teacher.encode(images[i:i + 128]) for i in range(0, len(images), 128)])
    emb = torch.nn.functional.normalize(emb.float(), dim=-1)
    caps = [store.annotations("captions", int(i)) for i in idx]
    desc = [store.annotations("descriptions", int(i)) for i in idx]
    n = len(idx)
    t1 = torch.nn.functional.normalize(teacher.encode_text([c[0] for c in caps]), dim=-1)
    k = min(len(c) for c in caps)
    t5 = torch.stack([teacher.encode_text([c[j] for c in caps]) for j in range(k)], 1)
    t5 = torch.nn.functional.normalize(torch.nn.functional.normalize(t5, dim=-1).mean(1), dim=-1)
    target = torch.arange(n)
    same = torch.tensor([[a == b for b in desc] for a in desc])
    s1, s5 = emb @ t1.T, emb @ t5.T
    ii = emb @ emb.T
    off = ii.clone()
    off.fill_diagonal_(-2.0)
    nn_ = off.argmax(1)
    with_dup = (same.sum(1) > 1)
    g = torch.Generator().manual_seed(0)
    noisy = {}
    for r in noise_levels:
        noise = torch.randn(n, emb.shape[1], generator=g) * (r / math.sqrt(emb.shape[1]))
        q = torch.nn.functional.normalize(emb + noise, dim=-1)
        noisy[str(r)] = float(((q @ emb.T).argmax(1) == target).float().mean())
    diff = ~same
    return {
        "split": split, "n_images": n,
        "i2t_top1": float((s1.argmax(1) == target).float().mean()),
        "t2i_top1": float((s1.argmax(0) == target).float().mean()),
        "i2t_top1_mean5": float((s5.argmax(1) == target).float().mean()),
        "i2t_top1_same_scene": float(same[target, s1.argmax(1)].float().mean()),
        "nn_different_scene": int((~same[target, nn_]).sum()),
        "with_duplicate": int(with_dup.sum()),
        "nn_same_scene_of_duplicates": int((same[target, nn_] & with_dup).sum()),
        "mean_offdiag_cos": float(ii[~torch.eye(n, dtype=torch.bool)].mean()),
        "max_offdiag_cos_diff_scene": float(ii[diff].max()) if bool(diff.any()) else None,
        "noisy_self_top1": noisy,
    }


# --------------------------------------------------------------------------------------------- VAE
def train_tiny_vae(
    store: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    epochs: int = 1,
    batch_size: int = 4,
    lr: float = 2e-3,
    kl_weight: float = 1e-6,
    init_logvar: float = -6.0,
    seed: int = 0,
    config: str = "tiny",
    max_minutes: float | None = None,
    evaluate: bool = True,
    progress: bool = True,
    steps: int | None = None,
) -> Path:
    """Train a tiny AutoencoderKL on the store's train+val images; save it to ``out_dir/tiny_vae``.

    The loss is MSE (images in [-1, 1]) + ``kl_weight`` x KL (mean over latent elements). Not L1: on the
    phantom's ~95 % grey images, L1's sign gradients from the background swamp the objects' in Adam's
    normalisation and the VAE sat at "all grey" (24 dB) for hundreds of steps; MSE's background gradients
    vanish once it is grey. The posterior log-variance starts at ``init_logvar`` (std 0.05) so the decoder is
    not fed unit-variance noise while the encoder's means are still tiny (SD's trained VAE has small std).

    Args:
        store: a store with uint8 stimuli.
        out_dir: receives ``tiny_vae/`` (``save_pretrained``) and ``tiny_vae_metrics.json``.
        epochs: passes over the train+val images: the step budget is ``epochs`` x (images // ``batch_size``)
            unless ``steps`` is given.
        batch_size: images per step (small batches: 600 steps of 4 reached the quality of 500 steps of 8,
            in half the time).
        lr: peak AdamW learning rate (warm-up, cosine decay).
        kl_weight: weight of the KL term.
        init_logvar: initial posterior log-variance (bias of the log-variance half of ``quant_conv``).
        seed: initialisation, order and sampling.
        config: the VAE config: ``"tiny"`` (:data:`neurovision.pretrained.teachers.TINY_VAE_CONFIG`) or a JSON path.
        max_minutes: deprecated and ignored (was a wall-clock budget; see :func:`neurovision.tiny.loop.deprecated_max_minutes`).
        evaluate: PSNR of reconstructions of the store's test images (in the metrics file).
        progress: show a tqdm bar.
        steps: the budget in optimiser steps (overrides ``epochs``); the schedule follows the step.

    Returns:
        ``out_dir``.
    """

    from neurovision.pretrained.teachers import VAETeacher

    deprecated_max_minutes(max_minutes, "train_tiny_vae")
    t_start = time.time()
    out = Path(out_dir)
    st = Store(store)
    size = int(st.image_shape[0])
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    teacher = VAETeacher(config=config, image_size=size, seed=seed, device="cpu")
    vae = teacher.vae
    c = int(vae.config.latent_channels)
    if vae.quant_conv is not None:
        with torch.no_grad():
            vae.quant_conv.bias[c:].fill_(init_logvar)
    idx = stimuli_of(st, ("train", "val"))
    x_all = teacher.preprocess(load_images(st, idx))  # [-1, 1] at `size`
    n = len(idx)
    vae.train().requires_grad_(True)
    gen = torch.Generator().manual_seed(seed)
    total = resolve_steps(n, batch_size, epochs, steps, "train_tiny_vae")
    batches = PassBatches(n, batch_size, total, rng)

    def step_fn(sel: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        x = x_all[sel]
        dist = vae.encode(x).latent_dist
        rec = vae.decode(dist.sample(generator=gen)).sample
        mse = (rec - x).pow(2).mean()
        kl = 0.5 * (dist.mean.pow(2) + dist.var - 1.0 - dist.logvar).mean()
        return mse + kl_weight * kl, {"mse": mse.item(), "kl": kl.item()}

    warmup = max(1, total // 20)
    module = StepModule(vae, step_fn, lr=lr, weight_decay=0.0, record="mse",
                        schedule=lambda k: warmup_cosine(k, total, warmup))
    step = fit(module, batches, desc="tiny VAE", progress=progress)
    losses, steps_per_epoch = module.losses, batches.steps_per_epoch
    vae.eval().requires_grad_(False)
    with torch.no_grad():  # SD's convention: scale latents to unit variance
        zs = torch.cat([vae.encode(x_all[i:i + 64]).latent_dist.mean for i in range(0, n, 64)])
        scaling = float(1.0 / zs.std())
    vae.register_to_config(scaling_factor=scaling)
    train_s = time.time() - t_start

    target = out / VAE_DIR
    out.mkdir(parents=True, exist_ok=True)
    with atomic_dir(target) as tmp:  # written whole, renamed over any previous VAE
        vae.save_pretrained(tmp)
        for f in tmp.iterdir():  # safetensors writes 0600
            os.chmod(f, shared_mode())

    metrics: dict[str, Any] = {
        "store": str(st.path), "n_images": n, "epochs": batches.epochs, "batch_size": batch_size, "lr": lr,
        "kl_weight": kl_weight, "init_logvar": init_logvar, "seed": seed, "steps": step,
        "planned_steps": total, "torch_threads": torch.get_num_threads(), "train_wall_s": round(train_s, 1),
        "mse_first": losses[0] if losses else None,
        "mse_last_epoch_mean": float(np.mean(losses[-steps_per_epoch:])) if losses else None,
        "scaling_factor": scaling, "losses": losses, "config": dict(vae.config),
    }
    if evaluate:
        metrics["test"] = evaluate_vae(st, VAETeacher(path=str(target), image_size=size, device="cpu"))
    metrics["wall_s"] = round(time.time() - t_start, 1)
    write_json(out / f"{VAE_DIR}_metrics.json", metrics)
    return out


@torch.no_grad()
def evaluate_vae(store: Store, teacher: Any, split: str = "test") -> dict[str, Any]:
    """Reconstruction PSNR (dB, uint8 images at the store's size) and latent statistics on one split."""
    idx = stimuli_of(store, (split,))
    images = load_images(store, idx)
    psnr, zs = [], []
    for i in range(0, len(images), 32):
        x = images[i:i + 32]
        z = teacher.encode(x)
        y = teacher.decode(z)
        if y.shape[-2:] != x.shape[-2:]:
            y = torch.nn.functional.interpolate(y.float(), size=x.shape[-2:], mode="bicubic",
                                                antialias=True).clamp(0, 255).round()
        mse = ((y.float() - x.float()) ** 2).mean((1, 2, 3)).clamp_min(1e-10)
        psnr.append(10 * torch.log10(255.0**2 / mse))
        zs.append(z)
    p = torch.cat(psnr)
    z = torch.cat(zs)
    return {"split": split, "n_images": len(idx), "psnr_mean": float(p.mean()), "psnr_min": float(p.min()),
            "latent_shape": list(z.shape[1:]), "latent_std": float(z.std()), "latent_mean": float(z.mean())}


# --------------------------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    """``neurovision tiny teachers --store S --out DIR``: train the tiny CLIP and VAE."""
    p = argparse.ArgumentParser(prog="neurovision tiny teachers", description=__doc__.splitlines()[0])
    p.add_argument("--store", required=True, help="the phantom store (.h5)")
    p.add_argument("--out", required=True, help="output folder (tiny_clip.json/.pt, tiny_vae/)")
    p.add_argument("--only", choices=("clip", "vae"), default=None, help="train only one teacher")
    p.add_argument("--force", action="store_true", help="retrain even when the outputs exist")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clip-tower", choices=("resnet", "vit"), default="resnet")
    clip_budget = p.add_mutually_exclusive_group()
    clip_budget.add_argument("--clip-epochs", type=int, default=10,
                             help="CLIP budget in passes over train+val (default 10)")
    clip_budget.add_argument("--clip-steps", type=int, default=None,
                             help="CLIP budget in optimiser steps (instead of --clip-epochs)")
    p.add_argument("--clip-batch-size", type=int, default=64)
    vae_budget = p.add_mutually_exclusive_group()
    vae_budget.add_argument("--vae-epochs", type=int, default=1, help="VAE budget in passes (default 1)")
    vae_budget.add_argument("--vae-steps", type=int, default=None,
                            help="VAE budget in optimiser steps (instead of --vae-epochs)")
    p.add_argument("--vae-batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice); the count changes the weights, see set_threads")
    a = p.parse_args(argv)
    for flag, v in (("--clip-epochs", a.clip_epochs), ("--clip-steps", a.clip_steps), ("--vae-epochs", a.vae_epochs),
                    ("--vae-steps", a.vae_steps), ("--clip-batch-size", a.clip_batch_size),
                    ("--vae-batch-size", a.vae_batch_size), ("--threads", a.threads)):
        if v is not None and v < 1:
            p.error(f"{flag} must be >= 1, got {v}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    set_threads(a.threads)

    out = Path(a.out)
    if a.only in (None, "clip"):
        if not a.force and (out / f"{CLIP_NAME}.pt").is_file() and (out / f"{CLIP_NAME}.json").is_file():
            log.info("%s.pt exists; skipping (use --force to retrain)", out / CLIP_NAME)
        else:
            image_size = int(Store(a.store).image_shape[0])
            train_tiny_clip(a.store, out, epochs=a.clip_epochs, batch_size=a.clip_batch_size, seed=a.seed,
                            config=tiny_clip_config(image_size=image_size, tower=a.clip_tower),
                            steps=a.clip_steps)
            _print_metrics(out / f"{CLIP_NAME}_metrics.json")
    if a.only in (None, "vae"):
        if not a.force and (out / VAE_DIR / "config.json").is_file():
            log.info("%s exists; skipping (use --force to retrain)", out / VAE_DIR)
        else:
            train_tiny_vae(a.store, out, epochs=a.vae_epochs, batch_size=a.vae_batch_size, seed=a.seed,
                           steps=a.vae_steps)
            _print_metrics(out / f"{VAE_DIR}_metrics.json")
    return 0


def _print_metrics(path: Path) -> None:
    m = json.loads(path.read_text())
    m = {k: v for k, v in m.items() if k not in ("losses", "config")}
    print(f"{path}:\n{json.dumps(m, indent=2)}")

