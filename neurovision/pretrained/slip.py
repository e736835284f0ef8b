"""The SLIP repository's models (facebookresearch/SLIP ``models.py``: CLIP, SIMCLR, SLIP), rebuilt with the same
parameter names so the released checkpoints load strictly, without the repository.

A released checkpoint (``slip_base_25ep.pt``, ``simclr_base_25ep.pt``, ...) is a ``torch.save`` of
``{"epoch", "state_dict", "optimizer", "scaler", "best_acc1", "args"}`` written under DistributedDataParallel:
``state_dict`` keys start with ``module.``; ``args`` (an ``argparse.Namespace``) holds ``model`` (``SLIP_VITB16``,
...), ``ssl_mlp_dim`` and ``ssl_emb_dim``. The keys (after ``module.``):

- every model: ``visual.*``, a timm ``VisionTransformer`` with ``num_classes=0`` (ViT-S/16 is MoCo v3's: 12 heads);
- CLIP and SLIP: ``transformer.resblocks.{i}.{attn.in_proj_weight, attn.out_proj, ln_1, mlp.c_fc, mlp.c_proj,
  ln_2}``, ``token_embedding``, ``positional_embedding``, ``ln_final``, ``image_projection``,
  ``text_projection``, ``logit_scale`` (OpenAI CLIP's text tower, QuickGELU, causal mask);
- SIMCLR and SLIP: ``image_mlp.{layer1, bn1, layer2, bn2, layer3}`` (the SimCLR projection head).

:func:`slip_arch` reads the sizes from the state dict (so a tiny model saved in the same layout loads too);
:class:`SlipModel` builds the model of an architecture; :func:`load_slip_checkpoint` reads a checkpoint file.
"""

from __future__ import annotations

import argparse
import math
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, cast, get_args

import torch
from torch import nn

__all__ = ["SLIP_MODELS", "SlipArch", "SlipModel", "SlipModelName", "load_slip_checkpoint", "slip_arch"]

SlipModelName = Literal["SLIP_VITS16", "SLIP_VITB16", "SLIP_VITL16", "CLIP_VITS16", "CLIP_VITB16", "CLIP_VITL16",
                        "SIMCLR_VITS16", "SIMCLR_VITB16", "SIMCLR_VITL16"]
SLIP_MODELS: tuple[str, ...] = get_args(SlipModelName)

# size -> (timm vision model, width, depth, heads) as the SLIP repository builds them
_VISION = {"VITS16": ("vit_small_patch16_224", 384, 12, 12),  # MoCo v3 ViT-S: 12 heads (timm's has 6)
           "VITB16": ("vit_base_patch16_224", 768, 12, 12),
           "VITL16": ("vit_large_patch16_224", 1024, 24, 16)}


@dataclass(frozen=True)
class SlipArch:
    """The sizes of a SLIP-repository model (defaults: the released ViT-B/16 models)."""

    model: str = "SLIP_VITB16"
    vision_width: int = 768
    vision_depth: int = 12
    vision_heads: int = 12
    patch_size: int = 16
    image_size: int = 224
    embed_dim: int = 512
    context_length: int = 77
    vocab_size: int = 49408
    text_width: int = 512
    text_heads: int = 8
    text_layers: int = 12
    ssl_mlp_dim: int = 4096
    ssl_emb_dim: int = 256

    @property
    def family(self) -> str:
        return self.model.split("_")[0]

    @property
    def has_text(self) -> bool:
        return self.family in ("SLIP", "CLIP")

    @property
    def has_ssl_head(self) -> bool:
        return self.family in ("SLIP", "SIMCLR")

    @property
    def timm_name(self) -> str:
        return _VISION[self.model.split("_")[1]][0]


def _check_name(model: str) -> str:
    if model not in SLIP_MODELS:
        raise ValueError(f"unknown SLIP-repository model {model!r}; known: {list(SLIP_MODELS)}")
    return model


def _count(sd: Mapping[str, Any], prefix: str) -> int:
    pat = re.compile(rf"^{re.escape(prefix)}(\d+)\.")
    return len({m.group(1) for k in sd if (m := pat.match(k))})


def slip_arch(model: str, state_dict: Mapping[str, torch.Tensor] | None = None) -> SlipArch:
    """The architecture of ``model`` (a SLIP-repository model name), with the sizes read from ``state_dict``
    (keys without ``module.``) when given, else the repository's defaults for that model."""
    _check_name(model)
    _, width, depth, heads = _VISION[model.split("_")[1]]
    arch = SlipArch(model=model, vision_width=width, vision_depth=depth, vision_heads=heads)
    if state_dict is None:
        return arch
    sd = state_dict

    def shape(key: str) -> tuple[int, ...]:
        if key not in sd:
            raise ValueError(f"not a {model} state dict: no {key!r} (keys look like {sorted(sd)[:5]} ...)")
        return tuple(sd[key].shape)

    w, _, p, _ = shape("visual.patch_embed.proj.weight")
    n_tokens = shape("visual.pos_embed")[1] - 1
    grid = math.isqrt(n_tokens)
    if grid * grid != n_tokens:
        raise ValueError(f"visual.pos_embed has {n_tokens} patch positions, not a square grid")
    arch = replace(arch, vision_width=w, patch_size=p, image_size=grid * p,
                   vision_depth=_count(sd, "visual.blocks."))
    if arch.has_text:
        vocab, tw = shape("token_embedding.weight")
        arch = replace(arch, vocab_size=vocab, text_width=tw, context_length=shape("positional_embedding")[0],
                       embed_dim=shape("image_projection")[1], text_layers=_count(sd, "transformer.resblocks."))
    if arch.has_ssl_head:
        arch = replace(arch, ssl_mlp_dim=shape("image_mlp.layer1.weight")[0],
                       ssl_emb_dim=shape("image_mlp.layer3.weight")[0])
    return arch


class SlipModel(nn.Module):
    """A SLIP-repository model (``visual``; CLIP/SLIP: the text tower and projections; SIMCLR/SLIP: ``image_mlp``),
    initialised as the repository does (call under a seeded generator for a reproducible random control)."""

    def __init__(self, arch: SlipArch) -> None:
        super().__init__()
        import timm

        self.arch = arch
        self.visual = timm.create_model(arch.timm_name, pretrained=False, num_classes=0, embed_dim=arch.vision_width,
                                        depth=arch.vision_depth, num_heads=arch.vision_heads,
                                        patch_size=arch.patch_size, img_size=arch.image_size)
        if arch.has_text:
            from open_clip.transformer import QuickGELU, Transformer

            # OpenAI CLIP's text transformer: open_clip's has SLIP's parameter names (resblocks.i.attn, .mlp.c_fc, ...)
            self.transformer = Transformer(arch.text_width, arch.text_layers, arch.text_heads, act_layer=QuickGELU)
            self.token_embedding = nn.Embedding(arch.vocab_size, arch.text_width)
            self.positional_embedding = nn.Parameter(torch.empty(arch.context_length, arch.text_width))
            self.ln_final = nn.LayerNorm(arch.text_width)
            self.image_projection = nn.Parameter(torch.empty(arch.vision_width, arch.embed_dim))
            self.text_projection = nn.Parameter(torch.empty(arch.text_width, arch.embed_dim))
            self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))
            self.register_buffer("attn_mask", torch.full((arch.context_length,) * 2, float("-inf")).triu_(1),
                                 persistent=False)
            nn.init.normal_(self.token_embedding.weight, std=0.02)
            nn.init.normal_(self.positional_embedding, std=0.01)
            proj_std = arch.text_width ** -0.5 * (2 * arch.text_layers) ** -0.5
            for block in cast(Any, self.transformer.resblocks):
                nn.init.normal_(block.attn.in_proj_weight, std=arch.text_width ** -0.5)
                nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
                nn.init.normal_(block.mlp.c_fc.weight, std=(2 * arch.text_width) ** -0.5)
                nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
            nn.init.normal_(self.image_projection, std=arch.vision_width ** -0.5)
            nn.init.normal_(self.text_projection, std=arch.text_width ** -0.5)
        if arch.has_ssl_head:
            d, m, e = arch.vision_width, arch.ssl_mlp_dim, arch.ssl_emb_dim
            self.image_mlp = nn.Sequential(OrderedDict([
                ("layer1", nn.Linear(d, m)), ("bn1", nn.BatchNorm1d(m)), ("relu1", nn.ReLU()),
                ("layer2", nn.Linear(m, m)), ("bn2", nn.BatchNorm1d(m)), ("relu2", nn.ReLU()),
                ("layer3", nn.Linear(m, e))]))

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """The projected image embedding (CLIP/SLIP), not normalised."""
        return cast(torch.Tensor, self.visual(image) @ self.image_projection)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """The projected text embedding at the end-of-text token (the highest id), not normalised."""
        x = self.token_embedding(tokens) + self.positional_embedding
        x = self.transformer(x, attn_mask=cast(torch.Tensor, self.attn_mask))
        x = self.ln_final(x)
        return cast(torch.Tensor, x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ self.text_projection)


def load_slip_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """The state dict of a SLIP-repository checkpoint (``module.`` stripped) and the model name its ``args``
    record (None when the file has no ``args``). Loaded with ``weights_only=True`` (``argparse.Namespace``
    allowed: the released files pickle their training arguments)."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path}: not a SLIP checkpoint (found {type(ckpt).__name__})")
    sd = ckpt.get("state_dict", ckpt)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path}: not a SLIP checkpoint (no state_dict of tensors)")
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    args = ckpt.get("args")
    name = getattr(args, "model", None) if args is not None else None
    if isinstance(args, dict):
        name = args.get("model")
    return sd, None if name is None else str(name)
