"""A linear read-out of all active voxels, beside the ViT3D (MindEye pairs a linear layer with its MLP likewise).

``VoxelReadout(in_dim, out_dim)`` is a zero-initialised linear map from the flattened active patches to the
CLIP head's output, with dropout on its input. With ``rank=k`` the voxels are first projected onto the top-k
principal components of the repeat-averaged training patterns (whitened; fitted once by :meth:`VoxelReadout.fit`
or :meth:`VoxelReadout.fit_stream`, stored in the module's buffers and so in every checkpoint), and the
trainable map reads those k numbers: the response of a brain to a stimulus lives in a low-dimensional subspace,
and projecting single trials onto it removes most of the trial noise before the read-out ever sees it.

The fit (:func:`principal_subspace`) reads the patterns as a stream of chunks and never holds them all at NSD
size (36k patterns × 214k values): small inputs get an exact eigen-decomposition, large ones a randomised
subspace iteration (Halko, Martinsson & Tropp 2011) whose memory is O((k + p)·d + chunk·d).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

#: inputs of at most this many values (n·d; 256 MiB as float32) whose smaller side is at most
#: :data:`EXACT_MAX_SIDE` are fitted exactly (the n × n Gram or d × d covariance matrix in float64)
EXACT_MAX_VALUES = 2**26
#: largest Gram / covariance matrix side of the exact path (4096² float64 = 128 MiB)
EXACT_MAX_SIDE = 4096


@dataclass(frozen=True)
class Subspace:
    """A fitted principal subspace (the result of :func:`principal_subspace`).

    Attributes:
        mean: (d,) float32, the mean pattern.
        basis: (d, k) float32, the components scaled to unit variance over the patterns (whitened), each with
            its largest-magnitude entry positive.
        ratio: (k,) float32, the fraction of the patterns' total variance each component explains.
        n: number of patterns fitted.
        exact: True if the exact path fitted it, False for the randomised one.
    """

    mean: Tensor
    basis: Tensor
    ratio: Tensor
    n: int
    exact: bool


Chunks = Iterable[Tensor] | Callable[[], Iterable[Tensor]]


def _reiterable(chunks: Chunks, where: str) -> Callable[[], Iterator[Tensor]]:
    if isinstance(chunks, Tensor):  # one tensor: a single chunk
        return lambda: iter((chunks,))
    if callable(chunks):
        return lambda: iter(chunks())
    if iter(chunks) is chunks:  # a generator or iterator: gone after one pass
        raise TypeError(f"{where}: chunks must be re-iterable (a list, or a function returning a fresh iterable "
                        "of chunks); a generator is used up by the first of several passes")
    return lambda: iter(chunks)


@torch.no_grad()
def principal_subspace(
    chunks: Chunks,
    rank: int,
    *,
    n: int | None = None,
    dim: int | None = None,
    seed: int = 0,
    oversample: int | None = None,
    power_iters: int = 2,
    exact_max: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    desc: str = "principal subspace",
    where: str = "principal_subspace",
) -> Subspace:
    """The top-``rank`` principal subspace of patterns read as a stream of (m × d) chunks, whitened.

    Args:
        chunks: the patterns, a few hundred at a time: a re-iterable of tensors (m × ..., flattened to m × d;
            any float dtype, used as float32), or a function returning a fresh iterable (the randomised path
            reads the stream ``1 + power_iters`` times, so a one-shot generator is refused).
        rank: k, the number of components.
        n: the number of patterns, if known (the progress bar's total; a stream of another length is an error).
        dim: the number of values per pattern, if known (a chunk of another width is an error).
        seed: seed of the random test matrix (a generator of its own; the global RNG is untouched).
        oversample: p, extra columns of the randomised subspace (default 64: a pass reads the whole stream,
            so columns are cheaper than passes).
        power_iters: subspace iterations after the first pass (each one more pass over the stream).
        exact_max: inputs of at most this many values (n·d) whose smaller side is at most
            :data:`EXACT_MAX_SIDE` are fitted exactly, larger ones by the randomised path (default
            :data:`EXACT_MAX_VALUES`; 0 = always randomised).
        device: where the products run (default: the first chunk's device); results come back there.
        progress: show a progress bar (patterns read, over all passes).
        desc: the progress bar's label.
        where: the name in error messages.

    Exact path (n·d ≤ ``exact_max`` and min(n, d) ≤ 4096): the chunks are stacked (float32) and the n × n
    Gram or d × d covariance matrix is eigen-decomposed in float64, as sklearn's full PCA does.

    Randomised path (anything larger): a block subspace iteration on the covariance C = Xcᵀ Xc, never formed:
    Q = orth(Ω) with Ω a seeded d × (k + p) Gaussian; each pass over the stream accumulates C Q = Σ Bcᵀ(Bc Q)
    chunk by chunk (Bc the mean-centred chunk; the first pass centres by the first chunk's mean and corrects
    with the exact mean at its end), and Q = orth(C Q) between passes; the last pass also accumulates
    T = Qᵀ C Q ((k + p)², float64), whose top-k eigenvectors W give the components Q W with their exact
    variances (Rayleigh–Ritz). Memory: about 5 (k + p)·d + 3 chunk·d float32 values, never n·d; FLOPs:
    4 n·d·(k + p) per pass. Float32 except the (k + p)-sized factors and the d-sized mean (float64).

    Deterministic for a fixed seed, input and chunking (on one device). Returns a :class:`Subspace`.
    """
    from tqdm.auto import tqdm

    source = _reiterable(chunks, where)
    exact_max = EXACT_MAX_VALUES if exact_max is None else exact_max
    if rank < 1:
        raise ValueError(f"{where}: rank must be >= 1, got {rank}")

    def rows(chunk: Tensor) -> Tensor:
        nonlocal dim, device
        x = torch.as_tensor(chunk)
        x = x.reshape(len(x), -1) if x.ndim != 2 else x
        if dim is None:
            dim = x.shape[1]
        if x.shape[1] != dim:
            raise ValueError(f"{where}: patterns have {x.shape[1]} values each, expected {dim}")
        if device is None:
            device = x.device
        return x.to(device=device, dtype=torch.float32)  # finite: checked on the float64 sums of the first pass

    def stream(it: Iterable[Tensor]) -> Iterator[Tensor]:
        for c in it:
            if len(c):
                x = rows(c)
                bar.update(len(x))
                yield x

    bar = tqdm(total=n, desc=desc, unit="pattern", leave=False, disable=not progress)
    try:
        # buffer the first chunks: a stream that ends within exact_max values is fitted exactly
        buf: list[Tensor] = []
        size = 0
        first = stream(source())
        for x in first:
            buf.append(x)
            size += x.numel()
            if size > exact_max:
                break
        else:
            x = None
            m = sum(len(b) for b in buf)
            _check_n(m, n, rank, dim, where)
            if buf and dim is not None and min(m, dim) <= EXACT_MAX_SIDE:  # rows() set dim with the first chunk
                mean, v, evals, total = _exact(buf, rank, where)
                return _finish(mean, v, evals, total, m, exact=True)
            first = iter(())  # all of it is in buf: the randomised path re-reads it from there
        x = None  # the buffered chunks are released one by one in the first pass
        p = 64 if oversample is None else oversample
        passes = 1 + power_iters
        if n is not None:
            bar.total = n * passes
            bar.refresh()

        def pass_one() -> Iterator[Tensor]:
            while buf:  # the buffered chunks, released as they are used, then the rest of the stream
                yield buf.pop(0)
            yield from first

        if size > exact_max:
            def again() -> Iterator[Tensor]:  # later passes read the stream again
                return stream(source())
        else:
            kept = list(buf)  # all of it is buffered: later passes read these chunks again

            def again() -> Iterator[Tensor]:
                return iter(kept)
        mean, v, evals, total, m = _randomised(pass_one(), again, rank, p, passes, seed, dim, device, n, where)
        return _finish(mean, v, evals, total, m, exact=False)
    finally:
        bar.close()


def _check_n(m: int, n: int | None, rank: int, dim: int | None, where: str) -> None:
    if n is not None and m != n:
        raise ValueError(f"{where}: the chunks gave {m} patterns, expected n={n}")
    if m <= rank:
        raise ValueError(f"{where}: {m} patterns cannot give {rank} principal components")
    if dim is not None and rank > dim:
        raise ValueError(f"{where}: {dim} values per pattern cannot give {rank} principal components")


def _finite(colsum: Tensor, where: str) -> None:
    """NaN or ±inf anywhere in a chunk makes its column sums non-finite: one check of d sums instead of m·d
    values (a float32 column sum of finite patterns overflows only for values near 1e38 / m)."""
    if not torch.isfinite(colsum).all():
        raise ValueError(f"{where}: patterns contain NaN or inf")


def _exact(buf: list[Tensor], rank: int, where: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Exact PCA of the stacked chunks: mean, components (d × k), top-k eigenvalues, total sum of squares
    (float64; the matrices are built in column or row blocks of ≤ 32 MiB, so the float32 stack is the peak)."""
    n, d = sum(len(b) for b in buf), buf[0].shape[1]
    sums = [b.sum(0, dtype=torch.float64) for b in buf]
    for c in sums:
        _finite(c, where)
    mean = torch.stack(sums).sum(0) / n
    if n <= d:  # components from the n × n Gram matrix: v = xcᵀ u / s
        x = torch.cat(buf)
        buf.clear()
        step = max(1, 2**22 // n)
        cols = [(s, min(s + step, d)) for s in range(0, d, step)]
        gram = torch.zeros(n, n, dtype=torch.float64, device=x.device)
        for s, e in cols:
            xb = x[:, s:e].double() - mean[s:e]
            gram.addmm_(xb, xb.T)
        evals, u = torch.linalg.eigh(gram)
        evals, u = evals.flip(0)[:rank].clamp_min(1e-12), u.flip(1)[:, :rank]
        v = torch.empty(d, rank, dtype=torch.float64, device=x.device)
        for s, e in cols:
            v[s:e] = (x[:, s:e].double() - mean[s:e]).T @ u / evals.sqrt()
        total = gram.trace()
    else:  # the d × d covariance, accumulated over the chunks
        cov = torch.zeros(d, d, dtype=torch.float64, device=buf[0].device)
        for b in buf:
            xb = b.double() - mean
            cov.addmm_(xb.T, xb)
        evals, v = torch.linalg.eigh(cov)
        evals, v = evals.flip(0)[:rank].clamp_min(1e-12), v.flip(1)[:, :rank]
        total = cov.trace()
    return mean, v, evals, total


def _randomised(first: Iterator[Tensor], again: Callable[[], Iterator[Tensor]], rank: int, p: int, passes: int,
                seed: int, dim: int | None, device: torch.device | str | None, n: int | None,
                where: str) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    """Randomised subspace iteration over the stream (see :func:`principal_subspace`)."""
    gen = torch.Generator().manual_seed(seed)
    q: Tensor | None = None
    mean: Tensor | None = None
    total: Tensor | None = None
    t: Tensor | None = None
    m = 0
    for it in range(passes):
        chunks = first if it == 0 else again()
        z: Tensor | None = None
        shift: Tensor | None = None
        sum_x: Tensor | None = None
        sumsq: Tensor | None = None
        t = None
        count = 0
        for x in chunks:
            if q is None:  # the random test matrix, once the width and device are known
                l_ = min(rank + p, x.shape[1])
                q, _ = torch.linalg.qr(torch.randn(x.shape[1], l_, generator=gen).to(x.device))
            if z is None or t is None or shift is None or sum_x is None or sumsq is None:  # the pass's first chunk
                z = torch.zeros_like(q)
                t = torch.zeros(q.shape[1], q.shape[1], dtype=torch.float64, device=x.device)
                # pass 1 centres by its first chunk's mean (corrected at its end), later passes by the mean
                shift = x.mean(0) if mean is None else mean.float()
                # the column sums and the sum of squares (read in pass 1 only)
                sum_x = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
                sumsq = torch.zeros((), dtype=torch.float64, device=x.device)
            y = x - shift
            del x
            pq = y @ q  # (m × l)
            z.addmm_(y.T, pq)
            pd = pq.double()
            t.addmm_(pd.T, pd)
            if it == 0:  # float32 reductions of the chunk (a dtype=float64 one would copy it), float64 totals
                colsum = y.sum(0).double()
                _finite(colsum, where)
                sum_x += colsum
                sumsq += torch.linalg.vector_norm(y, dim=1).double().square().sum()
            count += len(y)
            del y, pq, pd
        if it == 0:
            m = count
            _check_n(m, n, rank, dim, where)
        elif count != m:
            raise ValueError(f"{where}: pass {it + 1} over the chunks gave {count} patterns, the first gave {m}")
        if q is None or z is None or t is None or shift is None or sum_x is None or sumsq is None:
            raise ValueError(f"{where}: pass {it + 1} over the chunks gave no patterns")  # refused just above
        if mean is None:  # pass 1
            delta = sum_x / m  # mean - shift
            mean = shift.double() + delta
            total = sumsq - m * delta.dot(delta)
        else:
            delta = mean - shift.double()
        # Σ (x - c)ᵀ(x - c) = C + m δ δᵀ with δ = mean - c: remove the shift's term
        qd = q.T.double() @ delta
        z.addr_(delta.float(), qd.float(), alpha=-m)
        t.addr_(qd, qd, alpha=-m)
        if it < passes - 1:
            q = None  # the old basis is not needed during the QR
            q, _ = torch.linalg.qr(z)
        del z
    if q is None or t is None or mean is None or total is None:
        raise ValueError(f"{where}: no pass over the chunks (power_iters must be >= 0, got {passes - 1})")
    t = (t + t.T) / 2
    evals, w = torch.linalg.eigh(t)
    evals, w = evals.flip(0)[:rank].clamp_min(1e-12), w.flip(1)[:, :rank]
    v = q @ w.float()
    return mean, v, evals, total, m


def _finish(mean: Tensor, v: Tensor, evals: Tensor, total: Tensor, n: int, exact: bool) -> Subspace:
    k = v.shape[1]
    # a sign convention, so the basis does not depend on the eigensolver's
    v = v * torch.sign(v[v.abs().argmax(0), torch.arange(k, device=v.device)])
    std = (evals / max(n - 1, 1)).sqrt()
    basis = (v.double() / std).float() if exact else v / std.float()
    return Subspace(mean=mean.float(), basis=basis, ratio=(evals / total).float(), n=n, exact=exact)


class VoxelReadout(nn.Module):
    """Linear read-out of flattened active patches, optionally through a fitted principal subspace.

    Args:
        in_dim: number of input values (active patches × voxels per patch).
        out_dim: output size (the CLIP embedding size).
        rank: number of principal components read (None = every voxel, full rank).
        dropout: dropout on the read-out's input (the voxels, or the components with ``rank``).
    """

    # buffers of a read-out with a rank (register_buffer), typed here for the checker
    mean: Tensor
    basis: Tensor
    fitted: Tensor

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
    def fit(self, patterns: Tensor, seed: int = 0) -> Tensor:
        """Fit the principal subspace to ``patterns`` (n × in_dim, e.g. one repeat-averaged pattern per
        training stimulus and subject); returns the explained-variance ratio of the k components.

        Exact (float64 eigen-decomposition) up to :data:`EXACT_MAX_VALUES` values, randomised above (see
        :func:`principal_subspace`; the rows are read in chunks, no float64 copy of ``patterns``); components
        are scaled to unit variance over ``patterns``.
        """
        self._check_rank("fit")
        x = patterns.reshape(len(patterns), -1)
        step = max(1, 2**24 // max(x.shape[1], 1))
        return self.fit_stream([x[s:s + step] for s in range(0, len(x), step)], n=len(x), seed=seed)

    @torch.no_grad()
    def fit_stream(self, chunks: Chunks, *, n: int | None = None, seed: int = 0, **kw) -> Tensor:
        """Fit the principal subspace to patterns read as chunks (see :func:`principal_subspace` for
        ``chunks`` and the keyword arguments); returns the explained-variance ratio of the k components."""
        rank = self._check_rank("fit")
        kw.setdefault("device", self.mean.device)
        sub = principal_subspace(chunks, rank, n=n, dim=self.in_dim, seed=seed, where="VoxelReadout.fit", **kw)
        self.set_subspace(sub.mean, sub.basis)
        return sub.ratio

    @torch.no_grad()
    def set_subspace(self, mean: Tensor, basis: Tensor) -> None:
        """Load a fitted subspace (e.g. one broadcast from another rank) into the buffers, on their device."""
        self._check_rank("set_subspace")
        if tuple(mean.shape) != (self.in_dim,) or tuple(basis.shape) != (self.in_dim, self.rank):
            raise ValueError(f"VoxelReadout.set_subspace: expected mean ({self.in_dim},) and basis "
                             f"({self.in_dim}, {self.rank}), got {tuple(mean.shape)} and {tuple(basis.shape)}")
        self.mean.copy_(mean)
        self.basis.copy_(basis)
        self.fitted.fill_(True)

    def _check_rank(self, what: str) -> int:
        """The rank; a full-rank read-out (rank None) is an error naming ``what``."""
        if self.rank is None:
            raise ValueError(f"VoxelReadout.{what}: a full-rank read-out has nothing to fit (rank is None)")
        return self.rank

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
