"""Stage 3: images from stage-1 predictions by diffusion img2img at noise strength β (Shen et al.).

x̂ = D((1 − β)·ẑ_vae + β·σ | ẑ_clip, prompt): the predicted SD-VAE latent is noised to the timestep that
strength β selects, then denoised by an unCLIP UNet conditioned on the predicted CLIP image embedding (the
UNet's ``class_labels``, as Stable unCLIP 2.1 does it) and optionally on a text prompt (the LLM's
reconstruction prompt), and decoded by the VAE.

- β = 0: no diffusion at all, the predicted latent is decoded as it is (the "low-level" reconstruction).
- 0 < β < 1: diffusers img2img semantics: ``int(steps·β)`` of the ``steps`` denoising steps are run, starting
  from ``scheduler.add_noise(ẑ_vae, ε, t_start)``.
- β = 1: pure generation from noise, ẑ_vae is ignored.

:class:`UnCLIPReconstructor` is built from the components of a Stable unCLIP pipeline folder (``vae``,
``unet``, ``scheduler``, ``text_encoder``, ``tokenizer``, ``image_normalizer``, ``image_noising_scheduler``,
read with ``from_pretrained(local_files_only=True)``; nothing is downloaded). The tiny CPU preset is the same
layout written by :mod:`neurovision.tiny.unclip`. Sampling is batched and seeded per item: the noise of
an item depends only on ``(seed, subject, stimulus)``, not on the batch it happens to be in.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

COMPONENTS = ("vae", "unet", "scheduler", "text_encoder", "tokenizer", "image_normalizer",
              "image_noising_scheduler")
META_FILE = "neurovision_unclip.json"  # optional: what our tiny trainer knew (embedding norm, teacher ids)


def item_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed from ``seed`` and item keys (subject, stimulus): independent of batching and rank."""
    h = hashlib.sha256(",".join(str(int(k)) for k in (seed, *keys)).encode()).digest()
    return int.from_bytes(h[:8], "little") & (2**63 - 1)


def item_noise(shape: Sequence[int], seeds: Sequence[int], device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise of shape ``(len(seeds), *shape)``, one generator per item."""
    out = [torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(out).to(device=device, dtype=dtype)


def check_beta(beta: float, key: str = "model.init_args.beta") -> float:
    beta = float(beta)
    if not 0.0 <= beta <= 1.0 or not np.isfinite(beta):
        raise ValueError(f"{key}: noise strength β must be in [0, 1], got {beta}")
    return beta


class UnCLIPReconstructor(torch.nn.Module):
    """VAE + unCLIP UNet (+ optional text encoder) of a Stable unCLIP pipeline, sampling img2img at strength β.

    Args:
        vae: ``diffusers.AutoencoderKL``; latents are in its *scaled* space (``z · scaling_factor``), as the
            stage-1 VAE head predicts them (:class:`neurovision.pretrained.teachers.VAETeacher`).
        unet: ``diffusers.UNet2DConditionModel`` with ``class_embed_type="projection"`` whose class input is
            ``[image embedding, noise-level embedding]`` (twice the CLIP dimension), as in Stable unCLIP.
        scheduler: the sampling scheduler (DDIM, DPM-Solver, …; any diffusers scheduler with
            ``set_timesteps``/``add_noise``/``step``).
        text_encoder: the ``transformers`` CLIP text model (prompt conditioning).
        tokenizer: its tokenizer.
        image_normalizer: unCLIP's embedding normaliser for the noise augmentation (``noise_level``).
        image_noising_scheduler: the scheduler that noises the image embedding (``noise_level``).
        meta: what the tiny trainer recorded (e.g. ``clip_norm``, the mean norm of its training embeddings).
    """

    def __init__(self, vae: Any, unet: Any, scheduler: Any, text_encoder: Any, tokenizer: Any,
                 image_normalizer: Any | None = None, image_noising_scheduler: Any | None = None,
                 meta: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.vae, self.unet, self.text_encoder = vae, unet, text_encoder
        self.scheduler, self.tokenizer = scheduler, tokenizer
        self.image_normalizer, self.image_noising_scheduler = image_normalizer, image_noising_scheduler
        self.meta = dict(meta or {})
        for m in (vae, unet, text_encoder, image_normalizer):
            if m is not None:
                m.eval().requires_grad_(False)
        cfg = unet.config
        if cfg.class_embed_type != "projection" or not cfg.projection_class_embeddings_input_dim:
            raise ValueError("unet: an unCLIP UNet needs class_embed_type='projection' (Stable unCLIP); got "
                             f"class_embed_type={cfg.class_embed_type!r}")
        self.clip_dim = int(cfg.projection_class_embeddings_input_dim) // 2
        self.latent_channels = int(cfg.in_channels)

    # ------------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: str | Path, key: str = "model.init_args.reconstructor",
                        torch_dtype: torch.dtype = torch.float32) -> UnCLIPReconstructor:
        """Load the components of a local Stable unCLIP folder (``stable-diffusion-2-1-unclip`` layout)."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import (
            StableUnCLIPImageNormalizer,
        )
        from diffusers.schedulers import DDIMScheduler, DDPMScheduler
        from transformers import AutoTokenizer, CLIPTextModel

        root = Path(path)
        if not root.is_dir():
            raise FileNotFoundError(f"{key}: reconstructor folder not found: {root} (a local Stable unCLIP "
                                    "folder, or `neurovision tiny unclip` for the tiny one)")
        for c in ("vae", "unet", "scheduler", "text_encoder", "tokenizer"):
            if not (root / c).is_dir():
                raise FileNotFoundError(f"{key}: {root} has no '{c}' component folder (expected the Stable "
                                        f"unCLIP layout: {', '.join(COMPONENTS)})")
        kw: dict[str, Any] = {"local_files_only": True}
        vae = AutoencoderKL.from_pretrained(root / "vae", torch_dtype=torch_dtype, **kw)
        unet = UNet2DConditionModel.from_pretrained(root / "unet", torch_dtype=torch_dtype, **kw)
        scheduler = DDIMScheduler.from_pretrained(root / "scheduler", **kw)
        text_encoder = CLIPTextModel.from_pretrained(root / "text_encoder", torch_dtype=torch_dtype, **kw)
        tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer", **kw)
        normalizer = noising = None
        if (root / "image_normalizer").is_dir():
            normalizer = StableUnCLIPImageNormalizer.from_pretrained(root / "image_normalizer",
                                                                     torch_dtype=torch_dtype, **kw)
        if (root / "image_noising_scheduler").is_dir():
            noising = DDPMScheduler.from_pretrained(root / "image_noising_scheduler", **kw)
        meta = json.loads((root / META_FILE).read_text()) if (root / META_FILE).is_file() else {}
        return cls(vae, unet, scheduler, text_encoder, tokenizer, normalizer, noising, meta)

    def save_pretrained(self, path: str | Path) -> None:
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        for c in COMPONENTS:
            m = getattr(self, c)
            if m is not None:
                m.save_pretrained(root / c)
        (root / META_FILE).write_text(json.dumps(self.meta, indent=2))

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        s = int(self.unet.config.sample_size)
        return (self.latent_channels, s, s)

    # ------------------------------------------------------------------------------------ conditioning
    @torch.no_grad()
    def encode_prompt(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text encoder hidden states (B, L, D) of the prompts (max length of the tokenizer, padded)."""
        max_len = min(int(getattr(self.tokenizer, "model_max_length", 77) or 77),
                      int(self.text_encoder.config.max_position_embeddings))
        tok = self.tokenizer(list(prompts), padding="max_length", max_length=max_len, truncation=True,
                             return_tensors="pt")
        out = self.text_encoder(tok.input_ids.to(self.device))
        return out[0].to(self.dtype)

    def image_condition(self, embeds: torch.Tensor, noise_level: int = 0,
                        seeds: Sequence[int] | None = None) -> torch.Tensor:
        """unCLIP ``class_labels``: the (noise-augmented) image embedding and its noise-level embedding."""
        from diffusers.models.embeddings import get_timestep_embedding

        embeds = embeds.to(self.device, self.dtype)
        b = embeds.shape[0]
        level = torch.full((b,), int(noise_level), device=self.device, dtype=torch.long)
        if noise_level > 0:
            if self.image_normalizer is None or self.image_noising_scheduler is None:
                raise ValueError("noise_level > 0 needs the image_normalizer and image_noising_scheduler components")
            noise = item_noise(embeds.shape[1:], seeds if seeds is not None else range(b), self.device, self.dtype)
            x = self.image_normalizer.scale(embeds)
            x = self.image_noising_scheduler.add_noise(x, timesteps=level, noise=noise)
            embeds = self.image_normalizer.unscale(x)
        emb = get_timestep_embedding(level, embeds.shape[-1], flip_sin_to_cos=True, downscale_freq_shift=0)
        return torch.cat([embeds, emb.to(embeds.dtype)], dim=1)

    def prepare_embeds(self, embeds: torch.Tensor, clip_norm: float | str | None = "meta") -> torch.Tensor:
        """Predicted CLIP embeddings rescaled to the norm the UNet was trained with (``meta['clip_norm']``
        by default, a number, or ``None`` to keep them as predicted)."""
        if embeds.ndim != 2 or embeds.shape[1] != self.clip_dim:
            raise ValueError(f"CLIP embeddings must be (B, {self.clip_dim}) for this UNet, got {tuple(embeds.shape)}")
        norm = self.meta.get("clip_norm") if clip_norm == "meta" else clip_norm
        if norm is None:
            return embeds
        return torch.nn.functional.normalize(embeds.float(), dim=-1) * float(norm)

    # ------------------------------------------------------------------------------------ sampling
    def timesteps(self, beta: float, steps: int) -> torch.Tensor:
        """The denoising timesteps strength β runs (img2img semantics; empty for β = 0)."""
        beta = check_beta(beta)
        self.scheduler.set_timesteps(int(steps), device=self.device)
        ts = self.scheduler.timesteps
        n = min(int(round(steps * beta, 6)), steps)
        order = int(getattr(self.scheduler, "order", 1))
        return ts[(steps - n) * order:] if n > 0 else ts[:0]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> uint8 images (B, 3, H, W) on the CPU."""
        c = self.vae.config
        z = latents.to(self.device, self.dtype) / c.scaling_factor
        if getattr(c, "shift_factor", None) is not None:
            z = z + c.shift_factor
        x = self.vae.decode(z).sample
        return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()

    @torch.no_grad()
    def reconstruct(
        self,
        vae_latents: torch.Tensor | None,
        clip_embeds: torch.Tensor,
        beta: float,
        prompts: Sequence[str | None] | None = None,
        seeds: Sequence[int] | None = None,
        steps: int = 50,
        guidance_scale: float = 1.0,
        noise_level: int = 0,
        clip_norm: float | str | None = "meta",
        num_candidates: int = 1,
        selector: Callable[[torch.Tensor], torch.Tensor] | None = None,
        return_choice: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Images (B, 3, H, W) uint8 from predicted latents (B, C, h, w) and CLIP embeddings (B, D).

        ``prompts`` (None entries = no prompt) condition the text encoder; ``guidance_scale`` > 1 applies
        classifier-free guidance against the empty prompt and a zero image embedding (the unCLIP negative).

        ``num_candidates`` > 1 samples that many images per item (candidate 0 with the item's own seed, so one
        candidate is the plain sample) and keeps the one whose ``selector`` embedding (uint8 images -> (B, D)
        CLIP image embeddings, the space the embeddings were predicted in) has the highest cosine with the
        predicted embedding: MindEye's best-of-N selection, which uses the brain prediction only, never the
        stimulus. ``return_choice`` also returns the chosen candidate of each item. β = 0 is deterministic and
        always has one candidate. The same as ``reconstruct_betas(..., betas=[beta])[0]``.
        """
        imgs, choice = self.reconstruct_betas(vae_latents, clip_embeds, [beta], prompts, seeds, steps,
                                              guidance_scale, noise_level, clip_norm, num_candidates, selector)[0]
        return (imgs, choice) if return_choice else imgs

    @torch.no_grad()
    def reconstruct_betas(
        self,
        vae_latents: torch.Tensor | None,
        clip_embeds: torch.Tensor,
        betas: Sequence[float],
        prompts: Sequence[str | None] | None = None,
        seeds: Sequence[int] | None = None,
        steps: int = 50,
        guidance_scale: float = 1.0,
        noise_level: int = 0,
        clip_norm: float | str | None = "meta",
        num_candidates: int = 1,
        selector: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One pass over the items for many noise strengths: ``[(images, chosen candidate)]``, one per β.

        What does not depend on β is computed once and reused by every β: the (noise-augmented) image-embedding
        conditioning, the prompt encoding and each candidate's item noise ε (seeded by the item, not by β).
        Each β's images are exactly those of :meth:`reconstruct` at that β (same arguments).

        What cannot be shared: the denoising itself. img2img at strength β starts from
        ``add_noise(ẑ_vae, ε, t_β)``, a different latent at a different timestep for every β, and every step
        after it is conditioned on that trajectory; a high-β sample is not a continuation of a lower-β one (the
        timesteps of β' < β are the tail of β's, but the latents on them differ). β = 1 ignores ẑ_vae and is an
        ordinary unCLIP sample. So best-of-N candidates are drawn, decoded and selected per β; only β = 0 (a
        plain decode of ẑ_vae) is free of candidates. See :func:`unet_evaluations` / :func:`vae_decodes`.
        """
        betas = [check_beta(b) for b in betas]
        b = clip_embeds.shape[0]
        seeds = list(seeds) if seeds is not None else list(range(b))
        if len(seeds) != b:
            raise ValueError(f"seeds: {len(seeds)} for {b} items")
        if int(num_candidates) < 1:
            raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
        if num_candidates > 1 and selector is None:
            raise ValueError("num_candidates > 1 needs a selector (the CLIP image encoder of the predicted embeddings)")
        if vae_latents is not None:
            if tuple(vae_latents.shape[1:]) != self.latent_shape or vae_latents.shape[0] != b:
                raise ValueError(f"VAE latents must be ({b}, {', '.join(map(str, self.latent_shape))}) for this "
                                 f"reconstructor, got {tuple(vae_latents.shape)}")
            if not torch.isfinite(vae_latents).all():
                raise ValueError("VAE latents contain NaN or Inf")
        elif min(betas, default=1.0) < 1:
            raise ValueError(f"β = {min(betas)} < 1 needs the predicted VAE latents (only β = 1 generates from noise)")
        if not torch.isfinite(clip_embeds).all():
            raise ValueError("CLIP embeddings contain NaN or Inf")
        for beta in betas:
            if beta > 0 and len(self.timesteps(beta, steps)) == 0:
                raise ValueError(f"β = {beta} runs int(steps·β) = 0 of steps = {steps} denoising steps (use β = 0, "
                                 "or more steps)")
        cond = hidden = None
        if any(beta > 0 for beta in betas):
            cond = self.image_condition(self.prepare_embeds(clip_embeds, clip_norm), noise_level, seeds)
            texts = [p or "" for p in (prompts if prompts is not None else [None] * b)]
            if len(texts) != b:
                raise ValueError(f"prompts: {len(texts)} for {b} items")
            hidden = self.encode_prompt(texts)
            if guidance_scale > 1.0:
                hidden = torch.cat([self.encode_prompt([""] * b), hidden])
                cond = torch.cat([torch.zeros_like(cond), cond])
        noises: dict[int, torch.Tensor] = {}

        def noise(k: int) -> torch.Tensor:  # candidate k's item noise, drawn once for every β
            if k not in noises:
                noises[k] = item_noise(self.latent_shape, seeds if k == 0 else [item_seed(s, k) for s in seeds],
                                       self.device, self.dtype)
            return noises[k]

        target = torch.nn.functional.normalize(clip_embeds.float().cpu(), dim=-1) if num_candidates > 1 else None

        def score(imgs: torch.Tensor) -> torch.Tensor:  # cosine with the predicted embedding
            return (torch.nn.functional.normalize(selector(imgs).float().cpu(), dim=-1) * target).sum(-1)  # type: ignore[misc,operator]

        results: list[tuple[torch.Tensor, torch.Tensor]] = []
        decoded0: torch.Tensor | None = None
        for beta in betas:
            choice = torch.zeros(b, dtype=torch.long)
            if beta == 0:
                if decoded0 is None:
                    decoded0 = self.decode(vae_latents)  # type: ignore[arg-type]
                results.append((decoded0.clone(), choice))
                continue
            out = self._sample(vae_latents, cond, hidden, beta, noise(0), steps, guidance_scale)  # type: ignore[arg-type]
            if num_candidates > 1:
                best = score(out)
                for k in range(1, int(num_candidates)):
                    cand = self._sample(vae_latents, cond, hidden, beta, noise(k), steps, guidance_scale)  # type: ignore[arg-type]
                    sim = score(cand)
                    better = sim > best
                    out[better], best[better], choice[better] = cand[better], sim[better], k
            results.append((out, choice))
        return results

    def _sample(self, vae_latents: torch.Tensor | None, cond: torch.Tensor, hidden: torch.Tensor, beta: float,
                noise: torch.Tensor, steps: int, guidance_scale: float) -> torch.Tensor:
        """One img2img sample per item: the items' noise ``(B, C, h, w)`` to strength β, denoise, decode."""
        b = noise.shape[0]
        ts = self.timesteps(beta, steps)
        if beta >= 1:
            latents = noise * float(self.scheduler.init_noise_sigma)
        else:
            z = vae_latents.to(self.device, self.dtype)  # type: ignore[union-attr]
            latents = self.scheduler.add_noise(z, noise, ts[:1].repeat(b))
        cfg = guidance_scale > 1.0
        for t in ts:
            x = torch.cat([latents, latents]) if cfg else latents
            x = self.scheduler.scale_model_input(x, t)
            eps = self.unet(x, t, encoder_hidden_states=hidden, class_labels=cond).sample
            if cfg:
                e_u, e_c = eps.chunk(2)
                eps = e_u + guidance_scale * (e_c - e_u)
            latents = self.scheduler.step(eps, t, latents).prev_sample
        return self.decode(latents)


def denoising_steps(beta: float, steps: int, order: int = 1) -> int:
    """Scheduler timesteps strength β runs out of ``steps`` (img2img: ``int(steps·β)``, 0 for β = 0), times the
    scheduler's ``order`` (1 for DDIM/DDPM; each timestep is one UNet call). As :meth:`UnCLIPReconstructor.timesteps`."""
    beta = check_beta(beta)
    return min(int(round(steps * beta, 6)), int(steps)) * int(order)


def unet_evaluations(betas: Sequence[float] | float, steps: int, num_candidates: int = 1,
                     guidance_scale: float = 1.0, order: int = 1) -> int:
    """UNet forward passes per item of one :meth:`UnCLIPReconstructor.reconstruct_betas` call (one item's row
    of a batched call counts one; classifier-free guidance, ``guidance_scale > 1``, doubles the rows).

    Each β > 0 runs ``num_candidates`` samples of :func:`denoising_steps` steps (candidates are not shared
    between β, see :meth:`UnCLIPReconstructor.reconstruct_betas`); β = 0 runs none. The cost model of the β
    sweep (``benchmarks``): multiply by the UNet's FLOPs per evaluation at the latent size and by the items.
    """
    betas = [betas] if isinstance(betas, (int, float)) else list(betas)
    cfg = 2 if guidance_scale > 1.0 else 1
    return sum(denoising_steps(b, steps, order) * int(num_candidates) * cfg for b in betas if float(b) > 0)


def vae_decodes(betas: Sequence[float] | float, num_candidates: int = 1) -> int:
    """VAE decoder passes per item of one :meth:`UnCLIPReconstructor.reconstruct_betas` call: one per candidate
    of each β > 0 (every candidate is decoded for the selector) and one for β = 0, whatever ``num_candidates``."""
    betas = [betas] if isinstance(betas, (int, float)) else list(betas)
    return sum(int(num_candidates) if float(b) > 0 else 0 for b in betas) + (1 if any(float(b) == 0 for b in betas) else 0)


def image_grid(rows: Sequence[torch.Tensor], labels: Sequence[str] | None = None,
               path: str | Path | None = None, title: str | None = None) -> np.ndarray:
    """A grid image: one column per entry of ``rows`` (each (N, 3, H, W) uint8), one row per item.

    Returns the grid as (H, W, 3) uint8; with ``path`` also writes it as a PNG (atomically) with column labels.
    """
    cols = [r.detach().cpu() for r in rows]
    n = min(int(c.shape[0]) for c in cols)
    h, w = int(cols[0].shape[2]), int(cols[0].shape[3])
    pad = 2
    grid = np.full((n * (h + pad) + pad, len(cols) * (w + pad) + pad, 3), 255, np.uint8)
    for j, c in enumerate(cols):
        c = c[:n]
        if c.shape[2:] != (h, w):
            c = torch.nn.functional.interpolate(c.float(), size=(h, w), mode="bilinear").round().clamp(0, 255)
        arr = c.to(torch.uint8).permute(0, 2, 3, 1).numpy()
        for i in range(n):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            grid[y:y + h, x:x + w] = arr[i]
    if path is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from neurovision.data.atomic import atomic_path

        fig_w = max(2.0, 0.9 * len(cols) * max(1.0, w / 64))
        fig, ax = plt.subplots(figsize=(fig_w, max(2.0, 0.9 * n * max(1.0, h / 64)) + 0.6))
        ax.imshow(grid, interpolation="nearest")
        ax.set_yticks([])
        if labels:
            ax.set_xticks([pad + j * (w + pad) + w / 2 for j in range(len(cols))])
            ax.set_xticklabels(list(labels), rotation=45, ha="right", fontsize=8)
        else:
            ax.set_xticks([])
        if title:
            ax.set_title(title, fontsize=9)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)
    return grid


__all__ = ["UnCLIPReconstructor", "check_beta", "denoising_steps", "image_grid", "item_noise", "item_seed",
           "unet_evaluations", "vae_decodes"]
