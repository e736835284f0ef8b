"""A linear read-out of all active voxels, beside the ViT3D (MindEye pairs a linear layer with its MLP likewise).

``VoxelReadout(in_dim, out_dim)`` is a zero-initialised linear map from the flattened active patches to the
CLIP head's output, with dropout on its input. With ``rank=k`` the voxels are first projected onto the top-k
principal components of the repeat-averaged training patterns (whitened; fitted once by :meth:`fit`, stored in
the module's buffers and so in every checkpoint), and the trainable map reads those k numbers: the response of
a brain to a stimulus lives in a low-dimensional subspace, and projecting single trials onto it removes most of
the trial noise before the read-out ever sees it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class VoxelReadout(nn.Module):
    """Linear read-out of flattened active patches, optionally through a fitted principal subspace.

    Args:
        in_dim: number of input values (active patches × voxels per patch).
        out_dim: output size (the CLIP embedding size).
        rank: number of principal components read (None = every voxel, full rank).
        dropout: dropout on the read-out's input (the voxels, or the components with ``rank``).
    """

    def __init__(self, in_dim: int, out_dim: int, rank: int | None = None, dropout: float = 0.5) -> None:
        super().__init__()
        if rank is not None and not 0 < rank <= in_dim:
            raise ValueError(f"VoxelReadout: rank must be in 1..{in_dim} (the number of active voxels), got {rank}")
        self.in_dim, self.rank = in_dim, rank
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(rank or in_dim, out_dim)
        nn.init.zeros_(self.linear.weight)  # zero at the start: the model begins as the ViT3D alone
        nn.init.zeros_(self.linear.bias)
        if rank is not None:
            self.register_buffer("mean", torch.zeros(in_dim))
            self.register_buffer("basis", torch.zeros(in_dim, rank))
            self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @property
    def needs_fit(self) -> bool:
        return self.rank is not None and not bool(self.fitted)

    @torch.no_grad()
    def fit(self, patterns: Tensor) -> Tensor:
        """Fit the principal subspace to ``patterns`` (n × in_dim, e.g. one repeat-averaged pattern per
        training stimulus and subject); returns the explained-variance ratio of the k components.

        Exact and deterministic (an eigen-decomposition of the n × n or in_dim × in_dim Gram matrix in float64,
        whichever is smaller); components are scaled to unit variance over ``patterns``.
        """
        if self.rank is None:
            raise ValueError("VoxelReadout.fit: a full-rank read-out has nothing to fit (rank is None)")
        x = patterns.reshape(len(patterns), -1).double()
        n, d = x.shape
        if d != self.in_dim:
            raise ValueError(f"VoxelReadout.fit: patterns have {d} values each, the read-out reads {self.in_dim}")
        if n <= self.rank:
            raise ValueError(f"VoxelReadout.fit: {n} patterns cannot give {self.rank} principal components")
        if not torch.isfinite(x).all():
            raise ValueError("VoxelReadout.fit: patterns contain NaN or inf")
        mean = x.mean(0)
        xc = x - mean
        if n <= d:  # components from the n × n Gram matrix: v = xcᵀ u / s
            evals, u = torch.linalg.eigh(xc @ xc.T)
            evals, u = evals.flip(0)[: self.rank].clamp_min(1e-12), u.flip(1)[:, : self.rank]
            v = xc.T @ u / evals.sqrt()
        else:
            evals, v = torch.linalg.eigh(xc.T @ xc)
            evals, v = evals.flip(0)[: self.rank].clamp_min(1e-12), v.flip(1)[:, : self.rank]
        # a sign convention, so the basis does not depend on the eigensolver's
        v = v * torch.sign(v[v.abs().argmax(0), torch.arange(self.rank)])
        std = (evals / max(n - 1, 1)).sqrt()
        self.mean.copy_(mean.float())
        self.basis.copy_((v / std).float())
        self.fitted.fill_(True)
        total = (xc * xc).sum()
        return (evals / total).float()

    def forward(self, patches: Tensor) -> Tensor:
        x = patches.flatten(1)
        if self.rank is not None:
            if not bool(self.fitted):
                raise RuntimeError("VoxelReadout: the principal subspace was never fitted (call fit() first)")
            x = (x - self.mean.to(x.dtype)) @ self.basis.to(x.dtype)
        return self.linear(self.dropout(x))


def with_readout(pred: Tensor, readout: nn.Module | None, patches: Tensor) -> Tensor:
    """A CLIP-head prediction plus the voxel read-out of ``patches`` (unchanged without a read-out): the stage-1
    CLIP prediction, as training, later stages and concept localisation all make it."""
    return pred if readout is None else pred + readout(patches.to(pred.dtype))
