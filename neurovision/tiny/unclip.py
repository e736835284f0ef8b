"""A tiny unCLIP diffusion model trained on a phantom store, so stage-3 reconstructions mean something on a CPU.

Real runs load Stable unCLIP 2.1 from a local folder. For the demo chain we write a folder of the same layout
(``vae``, ``unet``, ``scheduler``, ``text_encoder``, ``tokenizer``, ``image_normalizer``,
``image_noising_scheduler``), loadable by :meth:`neurovision.pretrained.unclip.UnCLIPReconstructor.from_pretrained`:

- ``vae``: the tiny VAE teacher of :mod:`neurovision.tiny.teachers` (copied; the stage-1 VAE head predicts
  its scaled latents, so the UNet works in exactly that space);
- ``unet``: a small ``UNet2DConditionModel`` (``class_embed_type="projection"``, the Stable unCLIP class input
  ``[image embedding, noise-level embedding]``) trained on the latents of the store's *train and val* stimuli,
  conditioned on their tiny-CLIP image embeddings (the stage-1 teacher's space, read from the teacher cache)
  and their SD prompts; each condition is dropped 10 % of the time (for classifier-free guidance) and the
  image embedding is noise-augmented at a random unCLIP noise level half the time (robustness to the
  imperfect embeddings stage 1 predicts). The command's default target is the clean latent
  (``--prediction-type sample``; SD's ε is an option) and half of the noisy inputs are built from
  stage-1-like degraded latents (``--degrade 0.5``: shrunk towards the mean, blurred, smooth noise added), so
  that img2img from a blurred predicted latent sharpens it instead of keeping the blur;
- ``text_encoder``/``tokenizer``: a 2-layer ``CLIPTextModel`` trained jointly, with a byte-level BPE tokenizer
  trained on the prompts (milliseconds);
- ``scheduler``: DDIM with SD's scaled-linear β schedule; ``image_normalizer``: mean/std of the embeddings.

``neurovision_unclip.json`` records the embedding norm, the teacher ids and the losses; ``tiny_unclip_metrics.json``
beside the folder holds test-set scores of reconstructions from the *true* latents and embeddings (an upper
bound for stage 3: what the decoder can do when stage 1 is perfect).

``neurovision tiny unclip --store data/phantom_demo.h5 --teachers teachers/phantom_demo``
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from neurovision.data.atomic import atomic_dir, write_json
from neurovision.data.store import Store

log = logging.getLogger(__name__)

UNCLIP_DIR = "tiny_unclip"


def tiny_unet_config(clip_dim: int, sample_size: int, latent_channels: int = 4, text_dim: int = 64,
                     width: int = 64) -> dict[str, Any]:
    """A small unCLIP UNet: 3 resolutions, cross-attention to the prompt at the two coarser ones."""
    return {
        "sample_size": sample_size, "in_channels": latent_channels, "out_channels": latent_channels,
        "layers_per_block": 1, "block_out_channels": [width // 2, width, width],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "cross_attention_dim": text_dim, "attention_head_dim": 8, "norm_num_groups": 8,
        "class_embed_type": "projection", "projection_class_embeddings_input_dim": 2 * clip_dim,
    }


def tiny_text_encoder(tokenizer: Any, dim: int = 64, layers: int = 2, max_len: int = 32) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=dim, intermediate_size=2 * dim,
                         num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=max_len,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, projection_dim=dim)
    return CLIPTextModel(cfg)


PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def sd_scheduler_config(prediction_type: str = "epsilon") -> dict[str, Any]:
    """SD's training schedule (scaled-linear β, 1000 steps) with the UNet's target (ε by default)."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    return {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
            "beta_end": 0.012, "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
            "prediction_type": prediction_type}


def sample_timesteps(n: int, num_train_timesteps: int, t_power: float, rng: np.random.Generator) -> torch.Tensor:
    """Training timesteps t = ⌊T·u^(1/t_power)⌋, u ~ U(0, 1): uniform for ``t_power`` = 1, density ∝ t^(p−1)
    above it (more of the high-noise steps, where the image embedding decides what is drawn)."""
    if t_power <= 0:
        raise ValueError(f"t_power must be > 0, got {t_power}")
    u = rng.random(n) ** (1.0 / t_power)
    return torch.from_numpy(np.minimum((u * num_train_timesteps).astype(np.int64), num_train_timesteps - 1))


def degrade_latents(x0: torch.Tensor, mean: torch.Tensor, rng: np.random.Generator,
                    shrink: tuple[float, float] = (0.2, 0.8), blur: tuple[float, float] = (0.0, 1.5),
                    noise: tuple[float, float] = (0.0, 0.4)) -> torch.Tensor:
    """Stage-1-like versions of clean latents: m + λ·G_σ(x0 − m) + ρ·(smooth noise), per item λ, σ, ρ uniform
    in the given ranges. A regression from fMRI predicts latents shrunk towards the mean and blurred (on the
    demo phantom, in an ad-hoc fit of one stage-1 checkpoint's test predictions: λ ≈ 0.35, residual sd ≈ 0.36
    at σ ≈ 0.5 latent pixels)."""
    from torchvision.transforms.functional import gaussian_blur

    out = torch.empty_like(x0)
    for i in range(x0.shape[0]):
        lam, sig, rho = (float(rng.uniform(*r)) for r in (shrink, blur, noise))
        d = x0[i:i + 1] - mean
        if sig > 0.05:
            d = gaussian_blur(d, kernel_size=7, sigma=sig)
        r = torch.from_numpy(rng.standard_normal(x0.shape[1:]).astype(np.float32))[None]
        r = gaussian_blur(r, kernel_size=5, sigma=1.0)
        r = r / r.std().clamp_min(1e-6)
        out[i] = (mean + lam * d + rho * r)[0]
    return out


def build_tiny_unclip(vae: Any, clip_dim: int, texts: list[str], embeds: torch.Tensor | None = None,
                      width: int = 64, seed: int = 0, prediction_type: str = "epsilon") -> Any:
    """A randomly initialised tiny unCLIP reconstructor around ``vae`` (real diffusers/transformers classes).

    ``texts`` train the byte-level BPE tokenizer; ``embeds`` (N, clip_dim) set the image normaliser's
    mean/std and the recorded ``clip_norm``.
    """
    from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import (
        StableUnCLIPImageNormalizer,
    )

    from neurovision.pretrained.unclip import UnCLIPReconstructor
    from neurovision.tiny.llm import train_tokenizer

    c = int(vae.config.latent_channels)
    h = int(vae.config.sample_size) // 2 ** (len(vae.config.block_out_channels) - 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tok = train_tokenizer(texts or ["a picture"], vocab_size=512)
        tok.model_max_length = 32
        text_encoder = tiny_text_encoder(tok, max_len=32)
        unet = UNet2DConditionModel.from_config(tiny_unet_config(clip_dim, h, c, text_encoder.config.hidden_size, width))
    normalizer = StableUnCLIPImageNormalizer(embedding_dim=clip_dim)
    meta: dict[str, Any] = {"clip_norm": None}
    if embeds is not None:
        with torch.no_grad():
            normalizer.mean.copy_(embeds.mean(0, keepdim=True))
            normalizer.std.copy_(embeds.std(0, keepdim=True).clamp_min(1e-6))
        meta["clip_norm"] = float(embeds.norm(dim=1).mean())
    img_noising = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    return UnCLIPReconstructor(vae, unet, DDIMScheduler.from_config(sd_scheduler_config(prediction_type)), text_encoder, tok,
                               normalizer, img_noising, meta)


def train_tiny_unclip(
    store_path: str | os.PathLike[str],
    teachers: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    epochs: int = 60,
    batch_size: int = 64,
    lr: float = 1e-3,
    max_minutes: float | None = None,
    seed: int = 0,
    width: int = 64,
    progress: bool = True,
    eval_items: int = 100,
    prediction_type: str = "epsilon",
    t_power: float = 1.0,
    degrade: float = 0.0,
    steps: int | None = None,
) -> Path:
    """Train the tiny unCLIP model on a store; teachers from ``teachers`` (tiny_clip.*, tiny_vae/).

    The budget is ``steps`` optimiser steps, or ``epochs`` x (images // ``batch_size``) when ``steps`` is None;
    the learning-rate schedule follows the step, so the same seed gives the same weights on an idle or a loaded
    machine. ``max_minutes`` (a former wall-clock budget) is deprecated and ignored.

    ``prediction_type``: the UNet's target (ε, the clean latent ``sample``, or v); ``t_power``: timestep
    sampling (:func:`sample_timesteps`); ``degrade``: the fraction of items whose noisy input is built from a
    stage-1-like degraded latent (:func:`degrade_latents`) while the target stays the clean latent, so that
    img2img from a blurred, shrunk prediction sharpens it (needs ``prediction_type="sample"``: an ε or v
    target for a degraded input diverges as t → 0).
    """
    if not 0.0 <= degrade <= 1.0:
        raise ValueError(f"degrade must be in [0, 1], got {degrade}")
    if degrade > 0 and prediction_type != "sample":
        raise ValueError(f"degrade > 0 needs prediction_type='sample', got {prediction_type!r}")
    from diffusers import DDPMScheduler
    from diffusers.models.embeddings import get_timestep_embedding

    from neurovision.pretrained.teachers import OpenCLIPImageTeacher, TeacherCache, VAETeacher
    from neurovision.tiny.loop import (
        PassBatches,
        StepModule,
        deprecated_max_minutes,
        fit,
        resolve_steps,
        warmup_cosine,
    )
    from neurovision.tiny.teachers import CLIP_NAME, VAE_DIR, stimuli_of

    deprecated_max_minutes(max_minutes, "train_tiny_unclip")

    t0 = time.time()
    tdir = Path(teachers)
    out = Path(out) if out is not None else tdir / UNCLIP_DIR
    for f in (tdir / f"{CLIP_NAME}.json", tdir / f"{CLIP_NAME}.pt", tdir / VAE_DIR / "config.json"):
        if not f.is_file():
            raise FileNotFoundError(f"--teachers: {f} is missing (train the tiny CLIP and VAE first: "
                                    "neurovision tiny teachers)")
    store = Store(store_path)
    image_size = int(store.image_shape[0])
    clip = OpenCLIPImageTeacher(model_name=CLIP_NAME, model_config=str(tdir / f"{CLIP_NAME}.json"),
                                checkpoint=str(tdir / f"{CLIP_NAME}.pt"), device="cpu")
    vae_t = VAETeacher(path=str(tdir / VAE_DIR), image_size=image_size, device="cpu")
    cache = TeacherCache(progress=progress)
    emb_all = torch.from_numpy(np.asarray(cache.get(store, clip), np.float32))
    lat_all = torch.from_numpy(np.asarray(cache.get(store, vae_t), np.float32))
    prompts_all = [str(p) for p in store.annotations("sd_prompts")]
    train_idx = stimuli_of(store, ["train", "val"])
    test_idx = stimuli_of(store, ["test"])
    # the UNet sees embeddings at norm √D (unit scale per component, like the un-normalised CLIP embeddings of
    # Stable unCLIP) rather than unit norm, where the class input would be dwarfed by its noise-level half;
    # predictions are rescaled to the same norm at sampling time (``clip_norm`` in the folder's metadata)
    scale = float(np.sqrt(emb_all.shape[1])) / float(emb_all[train_idx].norm(dim=1).mean())
    emb_all = emb_all * scale
    emb, lat = emb_all[train_idx], lat_all[train_idx]
    texts = [prompts_all[i] for i in train_idx]
    clip_dim = int(emb.shape[1])

    torch.manual_seed(seed)
    order_rng, rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    rec = build_tiny_unclip(vae_t.vae, clip_dim, texts, embeds=emb, width=width, seed=seed,
                            prediction_type=prediction_type)
    lat_mean = lat.mean(0, keepdim=True)
    unet, text_encoder, tok = rec.unet, rec.text_encoder, rec.tokenizer
    normalizer, img_noising = rec.image_normalizer, rec.image_noising_scheduler
    noise_sched = DDPMScheduler.from_config(sd_scheduler_config(prediction_type))
    ids = tok(texts, padding="max_length", max_length=32, truncation=True, return_tensors="pt").input_ids
    empty_ids = tok([""], padding="max_length", max_length=32, return_tensors="pt").input_ids
    unet.train().requires_grad_(True)
    text_encoder.train().requires_grad_(True)
    alphas = noise_sched.alphas_cumprod
    total = resolve_steps(len(train_idx), batch_size, epochs, steps, "train_tiny_unclip")
    batches = PassBatches(len(train_idx), batch_size, total, order_rng)

    def step_fn(b: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        x0, e, tid = lat[b], emb[b], ids[b].clone()
        n = len(b)
        drop_txt = torch.from_numpy(rng.random(n) < 0.1)
        drop_img = torch.from_numpy(rng.random(n) < 0.1)
        tid[drop_txt] = empty_ids[0]
        levels = torch.from_numpy(np.where(rng.random(n) < 0.5, rng.integers(0, 250, n), 0)).long()
        noise_e = torch.randn_like(e)
        e_aug = normalizer.unscale(img_noising.add_noise(normalizer.scale(e), noise_e, levels)).detach()
        cond = torch.cat([e_aug, get_timestep_embedding(levels, clip_dim, flip_sin_to_cos=True,
                                                        downscale_freq_shift=0)], 1)
        cond[drop_img] = 0.0
        t = sample_timesteps(n, noise_sched.config.num_train_timesteps, t_power, rng)
        eps = torch.randn_like(x0)
        a = alphas[t].view(-1, 1, 1, 1)
        x_in = x0
        if degrade > 0:
            deg = torch.from_numpy(rng.random(n) < degrade)
            if deg.any():
                x_in = x0.clone()
                x_in[deg] = degrade_latents(x0[deg], lat_mean, rng)
        xt = a.sqrt() * x_in + (1 - a).sqrt() * eps
        hidden = text_encoder(tid)[0]
        pred = unet(xt, t, encoder_hidden_states=hidden, class_labels=cond).sample
        target = {"epsilon": eps, "sample": x0, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0}[prediction_type]
        loss = F.mse_loss(pred, target)
        return loss, {"loss": loss.item()}

    warmup = max(1, total // 20)
    module = StepModule(torch.nn.ModuleDict({"unet": unet, "text_encoder": text_encoder}), step_fn, lr=lr,
                        weight_decay=0.01, schedule=lambda k: warmup_cosine(k, total, warmup))
    done = fit(module, batches, desc="tiny unCLIP", progress=progress, gradient_clip_val=1.0)
    losses = module.losses
    unet.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)
    rec.meta.update({
        "clip_teacher": clip.id, "vae_teacher": vae_t.id, "store": str(store_path),
        "n_images": len(train_idx), "steps": done, "planned_steps": total,
        "torch_threads": torch.get_num_threads(),
        "loss_first": losses[0] if losses else None, "loss_last_100": float(np.mean(losses[-100:])) if losses else None,
    })
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out) as tmp:
        rec.save_pretrained(tmp)
    train_s = time.time() - t0
    scores = evaluate_decoder(store, rec, clip, emb_all, lat_all, test_idx[:: max(1, len(test_idx) // eval_items)],
                              prompts_all) if eval_items > 0 else {}
    write_json(out.parent / f"{UNCLIP_DIR}_metrics.json", {
        **{k: v for k, v in rec.meta.items()}, "train_wall_s": round(train_s, 1), "batch_size": batch_size,
        "lr": lr, "epochs": batches.epochs, "prediction_type": prediction_type, "t_power": t_power, "degrade": degrade,
        "losses": losses[::10], "test_true_targets": scores,
        "config": dict(unet.config),
    })
    return out


@torch.no_grad()
def evaluate_decoder(store: Store, rec: Any, clip: Any, emb_all: torch.Tensor, lat_all: torch.Tensor,
                     index: np.ndarray, prompts: list[str], betas: tuple[float, ...] = (0.0, 0.5, 0.8, 1.0),
                     steps: int = 20, guidance_scale: float = 2.0) -> dict[str, Any]:
    """Reconstructions from the *true* latents/embeddings of test images: PixCorr, SSIM, CLIP two-way ID."""
    from neurovision.metrics.images import pixcorr, ssim, two_way_identification

    stim = torch.from_numpy(store.images(np.sort(index))).permute(0, 3, 1, 2)
    stim_emb = clip.encode(stim)
    out: dict[str, Any] = {"n_images": len(index), "steps": steps, "guidance_scale": guidance_scale}
    for beta in betas:
        for use_prompt in (False, True):
            if beta == 0 and use_prompt:
                continue
            imgs = rec.reconstruct(lat_all[index], emb_all[index], beta=beta, steps=steps, guidance_scale=guidance_scale,
                                   prompts=[prompts[i] for i in index] if use_prompt else None,
                                   seeds=[int(i) for i in index])
            x, y = imgs.float() / 255, stim.float() / 255
            out[f"beta={beta:g}{',prompt' if use_prompt else ''}"] = {
                "pixcorr": pixcorr(x, y), "ssim": ssim(x, y),
                "clip_2way": two_way_identification(clip.encode(imgs), stim_emb),
            }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="neurovision tiny unclip", description=__doc__.splitlines()[0])
    p.add_argument("--store", required=True, help="the phantom store (.h5)")
    p.add_argument("--teachers", required=True, help="folder with tiny_clip.json/.pt and tiny_vae/")
    p.add_argument("--out", default=None, help=f"output folder (default <teachers>/{UNCLIP_DIR})")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--epochs", type=int, default=60, help="budget in passes over train+val (default 60)")
    budget.add_argument("--steps", type=int, default=None, help="budget in optimiser steps (instead of --epochs)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--width", type=int, default=64, help="UNet width (channels of the two coarser levels)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prediction-type", choices=PREDICTION_TYPES, default="sample",
                   help="the UNet's target (default: the clean latent; SD's is epsilon)")
    p.add_argument("--t-power", type=float, default=1.0,
                   help="timestep sampling t = T·u^(1/p): 1 uniform, > 1 more high-noise steps")
    p.add_argument("--degrade", type=float, default=None,
                   help="fraction of items noised from a stage-1-like degraded latent (needs --prediction-type "
                        "sample; default 0.5 with it, else 0)")
    p.add_argument("--eval-items", type=int, default=100,
                   help="test images reconstructed from their true latents/embeddings for the metrics file (0: none)")
    p.add_argument("--force", action="store_true", help="retrain even when the output exists")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice); the count can change the weights")
    a = p.parse_args(argv)
    for flag, v in (("--epochs", a.epochs), ("--steps", a.steps), ("--batch-size", a.batch_size),
                    ("--threads", a.threads)):
        if v is not None and v < 1:
            p.error(f"{flag} must be >= 1, got {v}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from neurovision.tiny.loop import set_threads

    set_threads(a.threads)

    out = Path(a.out) if a.out else Path(a.teachers) / UNCLIP_DIR
    if (out / "unet" / "config.json").is_file() and not a.force:
        log.info("%s exists; skipping (use --force to retrain)", out)
        return 0
    out = train_tiny_unclip(a.store, a.teachers, out, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr,
                            steps=a.steps, seed=a.seed, width=a.width, eval_items=a.eval_items,
                            prediction_type=a.prediction_type, t_power=a.t_power,
                            degrade=a.degrade if a.degrade is not None else (0.5 if a.prediction_type == "sample" else 0.0))
    m = json.loads((out.parent / f"{UNCLIP_DIR}_metrics.json").read_text())
    print(json.dumps({k: v for k, v in m.items() if k not in ("losses", "config")}, indent=2))
    return 0

