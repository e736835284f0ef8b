"""ViT3D: a vision transformer over the active 3-D patches of an fMRI volume, shared by all subjects.

Shen et al. (NeurIPS 2024) cut every (resampled, padded) volume into P**3 cubes and keep the "active" ones;
each active cube is one token. Here a token is a linear embedding of the cube's P**3 voxels plus a learned
3-D position embedding of the cube's patch-grid location (three per-axis tables, summed, so one model serves
any patch set whose coordinates fit the tables), and a learned CLS token is prepended. Blocks are pre-norm
(LN -> multi-head self-attention via ``scaled_dot_product_attention`` -> residual; LN -> GELU MLP -> residual)
with optional stochastic depth, followed by a final LayerNorm.

The CLS output feeds the stage-1 heads (CLIP / VAE); ``penultimate`` (the hidden states entering the last
block) feeds the stage-2 LLM projector, as in LLaVA.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

__all__ = ["ViT3D", "ViT3DOutput"]


@dataclass
class ViT3DOutput:
    """What :class:`ViT3D` returns.

    Attributes:
        cls: (B, D) final-layer CLS token after the final LayerNorm.
        tokens: (B, 1 + A, D) final-layer tokens after the final LayerNorm (CLS first).
        penultimate: (B, 1 + A, D) hidden states entering the last block (not normed).
    """

    cls: Tensor
    tokens: Tensor
    penultimate: Tensor


def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth: zero a whole sample's residual branch with probability ``p``, rescale the rest."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class Attention(nn.Module):
    """Multi-head self-attention with one qkv projection and ``F.scaled_dot_product_attention``."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.heads = heads
        self.head_dim = dim // heads
        self.attn_dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """x: (B, N, D); attn_mask: bool, broadcastable to (B, heads, N, N), True = may attend."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.attn_dropout if self.training else 0.0
        )
        return self.proj_drop(self.proj(o.transpose(1, 2).reshape(b, n, d)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)); x + MLP(LN(x)); both branches with stochastic depth."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.drop_path = drop_path
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout)
        )

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        x = x + drop_path(self.attn(self.norm1(x), attn_mask), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


def _as_coords(coords: Any, name: str) -> Tensor:
    """(A, 3) non-negative integer patch-grid coordinates as a long tensor; clear errors otherwise."""
    c = coords if isinstance(coords, Tensor) else torch.as_tensor(np.asarray(coords), device="cpu")
    if c.ndim != 2 or c.shape[1] != 3 or c.shape[0] < 1:
        raise ValueError(f"{name} must be (A, 3) patch-grid coordinates with A >= 1, got shape {tuple(c.shape)}")
    if c.is_floating_point() or c.is_complex() or c.dtype == torch.bool:
        raise ValueError(f"{name} must hold integers, got dtype {c.dtype}")
    if bool((c < 0).any()):
        raise ValueError(f"{name} must be non-negative")
    return c.long()


class ViT3D(nn.Module):
    """A ViT over the active 3-D patches of an fMRI volume (one model for all subjects).

    Args:
        patch_dim: voxels per patch (P**3).
        patch_coords: (A, 3) patch-grid coordinates of the active patches, in token order. The per-axis
            position tables are sized by the largest coordinate + 1.
        dim: token width.
        depth: number of transformer blocks.
        heads: attention heads (``dim`` must be divisible by it).
        mlp_ratio: MLP hidden width / ``dim``.
        dropout: dropout on attention weights, attention output and MLP.
        drop_path: stochastic-depth rate of the last block (linearly increasing from 0 over the blocks).
        num_subjects: if > 0, a learned per-subject embedding is added to the CLS token (0: fully shared model,
            as the paper).
        gradient_checkpointing: recompute each block in the backward pass while training (saves memory).
    """

    patch_coords: Tensor  # a buffer (register_buffer): typed here for the checker

    def __init__(
        self,
        patch_dim: int,
        patch_coords: Sequence[Sequence[int]],
        dim: int = 768,
        depth: int = 16,
        heads: int = 12,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        drop_path: float = 0.0,
        num_subjects: int = 0,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if patch_dim < 1 or depth < 1 or dim < 1 or heads < 1:
            raise ValueError(f"patch_dim, dim, depth and heads must be >= 1, got {patch_dim}, {dim}, {depth}, {heads}")
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        if not 0.0 <= drop_path < 1.0 or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout and drop_path must be in [0, 1), got {dropout}, {drop_path}")
        if num_subjects < 0:
            raise ValueError(f"num_subjects must be >= 0, got {num_subjects}")
        coords = _as_coords(patch_coords, "patch_coords")
        self.patch_dim = patch_dim
        self.dim = dim
        self.depth = depth
        self.heads = heads
        self.mlp_ratio = mlp_ratio
        self.num_subjects = num_subjects
        self.gradient_checkpointing = gradient_checkpointing
        self.check_inputs = True  # NaN/inf check: one host sync per forward; switch off when profiling
        # data-decided, rebuilt from the constructor arguments: not part of the state dict
        self.register_buffer("patch_coords", coords, persistent=False)
        sx, sy, sz = (int(m) + 1 for m in coords.max(0).values)  # (A, 3): checked by _as_coords
        self.pos_sizes: tuple[int, int, int] = (sx, sy, sz)

        self.patch_embed = nn.Linear(patch_dim, dim)
        self.pos_x = nn.Parameter(torch.empty(self.pos_sizes[0], dim))
        self.pos_y = nn.Parameter(torch.empty(self.pos_sizes[1], dim))
        self.pos_z = nn.Parameter(torch.empty(self.pos_sizes[2], dim))
        self.cls_token = nn.Parameter(torch.empty(1, 1, dim))
        self.subject_embed = nn.Embedding(num_subjects, dim) if num_subjects > 0 else None
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, dropout, r) for r in rates)
        self.norm = nn.LayerNorm(dim)
        self.reset_parameters()

    # ------------------------------------------------------------------------------------------ presets
    @classmethod
    def paper(cls, patch_dim: int, patch_coords: Sequence[Sequence[int]], **kwargs: Any) -> ViT3D:
        """Shen et al.'s size: 16 layers, width 768, 12 heads."""
        return cls(patch_dim, patch_coords, **{"dim": 768, "depth": 16, "heads": 12, **kwargs})

    @classmethod
    def tiny(cls, patch_dim: int, patch_coords: Sequence[Sequence[int]], **kwargs: Any) -> ViT3D:
        """A CPU/test size: 2 layers, width 64, 4 heads."""
        return cls(patch_dim, patch_coords, **{"dim": 64, "depth": 2, "heads": 4, **kwargs})

    # ------------------------------------------------------------------------------------------ helpers
    def reset_parameters(self) -> None:
        """trunc_normal(0.02) for Linear weights and embeddings, zero biases, LayerNorm ones/zeros."""
        for p in (self.pos_x, self.pos_y, self.pos_z, self.cls_token):
            nn.init.trunc_normal_(p, std=0.02, a=-0.04, b=0.04)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02, a=-0.04, b=0.04)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight, std=0.02, a=-0.04, b=0.04)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def num_patches(self) -> int:
        """A: active patches of the construction-time patch set."""
        return int(self.patch_coords.shape[0])

    @property
    def num_tokens(self) -> int:
        """1 + A: the CLS token plus one token per active patch."""
        return 1 + self.num_patches

    def flops_per_sample(self, num_patches: int | None = None) -> int:
        """Rough forward FLOPs (2 x multiply-adds of the matmuls) for one sample with ``num_patches`` tokens."""
        a = self.num_patches if num_patches is None else num_patches
        n, d, h = a + 1, self.dim, int(self.dim * self.mlp_ratio)
        per_block = 2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d + 2 * 2 * n * d * h
        return 2 * a * self.patch_dim * d + self.depth * per_block

    def position_embedding(self, coords: Tensor | None = None) -> Tensor:
        """(A, D) sum of the per-axis tables at ``coords`` (default: the construction-time patch set)."""
        c = self.patch_coords if coords is None else coords
        return self.pos_x[c[:, 0]] + self.pos_y[c[:, 1]] + self.pos_z[c[:, 2]]

    def _check(self, patches: Tensor, subject: Tensor | None, token_mask: Tensor | None, coords: Tensor) -> None:
        a = coords.shape[0]
        if not isinstance(patches, Tensor) or patches.ndim != 3 or patches.shape[1:] != (a, self.patch_dim):
            shape = tuple(patches.shape) if isinstance(patches, Tensor) else type(patches).__name__
            raise ValueError(f"patches must be (B, A={a}, patch_dim={self.patch_dim}), got {shape}")
        if not patches.is_floating_point():
            raise ValueError(f"patches must be floating point, got {patches.dtype}")
        if self.check_inputs and not bool(torch.isfinite(patches).all()):
            raise ValueError("patches contain NaN or inf")
        b = patches.shape[0]
        if token_mask is not None and (token_mask.dtype != torch.bool or tuple(token_mask.shape) != (b, a)):
            raise ValueError(f"token_mask must be bool (B={b}, A={a}), got {token_mask.dtype} {tuple(token_mask.shape)}")
        if subject is not None and self.subject_embed is not None:
            if subject.shape != (b,) or subject.is_floating_point():
                raise ValueError(f"subject must be integer (B={b},), got {subject.dtype} {tuple(subject.shape)}")
            if self.check_inputs and bool(((subject < 0) | (subject >= self.num_subjects)).any()):
                raise ValueError(f"subject indices must be in [0, {self.num_subjects}), got {subject.tolist()}")

    # ------------------------------------------------------------------------------------------ forward
    def forward(
        self,
        patches: Tensor,
        subject: Tensor | None = None,
        token_mask: Tensor | None = None,
        coords: Tensor | None = None,
    ) -> ViT3DOutput:
        """Encode a batch of active-patch volumes.

        Args:
            patches: (B, A, patch_dim) voxel values of the active patches.
            subject: (B,) subject indices; used only when ``num_subjects > 0`` (ignored otherwise, and
                ``None`` skips the subject embedding, e.g. for an unseen subject).
            token_mask: (B, A) bool, True = keep. Masked patches take no part in attention as keys, so kept
                tokens are exactly those of the input without them; outputs at masked positions are
                meaningless and should be ignored.
            coords: (A, 3) patch-grid coordinates overriding the construction-time ``patch_coords`` (another
                patch set; must fit the position tables).
        """
        if coords is None:
            c = self.patch_coords
        else:
            c = _as_coords(coords, "coords").to(self.patch_coords.device)
            if any(int(m) >= s for m, s in zip(c.max(0).values, self.pos_sizes, strict=True)):
                raise ValueError(f"coords exceed the position tables (sizes {self.pos_sizes})")
        self._check(patches, subject, token_mask, c)
        b = patches.shape[0]
        x = self.patch_embed(patches.to(self.patch_embed.weight.dtype)) + self.position_embedding(c)
        cls = self.cls_token.expand(b, -1, -1)
        if subject is not None and self.subject_embed is not None:
            cls = cls + self.subject_embed(subject.long())[:, None]
        x = torch.cat([cls, x], dim=1)
        mask = None
        if token_mask is not None:  # CLS is always kept, so no query row is fully masked
            mask = torch.cat([token_mask.new_ones(b, 1), token_mask], dim=1)[:, None, None, :]
        penultimate = x
        for i, blk in enumerate(self.blocks):
            if i == self.depth - 1:
                penultimate = x
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(blk, x, mask, use_reentrant=False)
            else:
                x = blk(x, mask)
        tokens = self.norm(x)
        return ViT3DOutput(cls=tokens[:, 0], tokens=tokens, penultimate=penultimate)

    def extra_repr(self) -> str:
        return (f"patches={self.num_patches}, patch_dim={self.patch_dim}, dim={self.dim}, depth={self.depth}, "
                f"heads={self.heads}, pos_sizes={self.pos_sizes}, num_subjects={self.num_subjects}")

