"""ViT3D: shapes, exact masking, reference attention, checkpointing, equivariance, validation, learning."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from neurovision.models import ViT3D, ViT3DOutput
from neurovision.models.vit3d import Block

P = 2  # patch size: patch_dim = 8
COORDS = [(0, 0, 0), (1, 0, 0), (0, 2, 1), (3, 1, 2), (2, 2, 2), (1, 3, 0), (0, 1, 3), (3, 3, 3)]
A = len(COORDS)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matmuls: one intra-op thread is faster and immune to oversubscription on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model(**kw: object) -> ViT3D:
    torch.manual_seed(0)
    return ViT3D.tiny(P**3, COORDS, **kw).eval()  # type: ignore[arg-type]


def _patches(b: int = 3, a: int = A, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, a, P**3, generator=torch.Generator().manual_seed(seed))


def test_shapes_and_presets() -> None:
    m = _model()
    out = m(_patches())
    assert isinstance(out, ViT3DOutput)
    assert out.cls.shape == (3, 64) and out.tokens.shape == (3, 1 + A, 64) and out.penultimate.shape == (3, 1 + A, 64)
    assert torch.equal(out.cls, out.tokens[:, 0])
    assert m.num_tokens == 1 + A and m.pos_sizes == (4, 4, 4)
    assert m.flops_per_sample() > 0
    assert "patch_coords" not in m.state_dict()  # data-decided: rebuilt from the constructor
    with torch.device("meta"):  # the paper's size, without allocating it
        big = ViT3D.paper(14**3, COORDS)
    assert (big.depth, big.dim, big.heads, len(big.blocks)) == (16, 768, 12, 16)


def test_penultimate_is_input_of_last_block() -> None:
    m = _model()
    seen: list[torch.Tensor] = []
    m.blocks[-1].register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    out = m(_patches())
    assert len(seen) == 1 and torch.equal(out.penultimate, seen[0])
    assert not torch.allclose(out.penultimate, out.tokens)


def _naive_block(blk: Block, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """softmax(QK^T / sqrt(d)) V with the block's own weights, written out by hand."""
    a = blk.attn
    b, n, d = x.shape
    h = F.layer_norm(x, (d,), blk.norm1.weight, blk.norm1.bias)
    qkv = h @ a.qkv.weight.T + a.qkv.bias
    q, k, v = (t.reshape(b, n, a.heads, a.head_dim).transpose(1, 2) for t in qkv.split(d, dim=-1))
    s = q @ k.transpose(-1, -2) / math.sqrt(a.head_dim)
    if keep is not None:
        s = s.masked_fill(~keep[:, None, None, :], float("-inf"))
    o = (s.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)
    x = x + o @ a.proj.weight.T + a.proj.bias
    h = F.layer_norm(x, (d,), blk.norm2.weight, blk.norm2.bias)
    fc1, fc2 = blk.mlp[0], blk.mlp[3]
    return x + F.gelu(h @ fc1.weight.T + fc1.bias) @ fc2.weight.T + fc2.bias


def test_attention_matches_naive_reference() -> None:
    blk = _model().blocks[0]
    x = torch.randn(2, 1 + A, 64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(blk(x), _naive_block(blk, x, None), atol=1e-5, rtol=1e-5)
    keep = torch.ones(2, 1 + A, dtype=torch.bool)
    keep[0, 3] = keep[1, 5] = keep[1, 6] = False
    torch.testing.assert_close(blk(x, keep[:, None, None, :]), _naive_block(blk, x, keep), atol=1e-5, rtol=1e-5)


def _loss_and_grads(m: ViT3D, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    m.zero_grad()
    torch.manual_seed(3)  # same dropout / drop-path draws in both runs
    loss = m(x).tokens.square().mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in m.parameters() if p.grad is not None]


def test_gradient_checkpointing_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    m = _model(dropout=0.1, drop_path=0.1).train()
    x = _patches()
    loss0, g0 = _loss_and_grads(m, x)
    calls: list[int] = []
    orig = torch.utils.checkpoint.checkpoint

    def counting(*args: object, **kw: object) -> object:
        calls.append(1)
        assert kw.get("use_reentrant") is False
        return orig(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    m.gradient_checkpointing = True
    loss1, g1 = _loss_and_grads(m, x)
    assert len(calls) == m.depth
    torch.testing.assert_close(loss1, loss0)
    assert len(g1) == len(g0)
    for a, b in zip(g0, g1, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    m.eval()
    m(x)
    assert len(calls) == m.depth  # not used outside training


def test_token_mask_is_exact() -> None:
    m = _model()
    x = _patches(b=3)
    drop = [2, 5, 0]  # one patch masked per sample, a different one each
    mask = torch.ones(3, A, dtype=torch.bool)
    mask[torch.arange(3), torch.tensor(drop)] = False
    out = m(x, token_mask=mask)
    coords = torch.tensor(COORDS)
    for i, j in enumerate(drop):
        keep = torch.arange(A) != j
        ref = m(x[i:i + 1, keep], coords=coords[keep])
        torch.testing.assert_close(out.cls[i:i + 1], ref.cls, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.tokens[i:i + 1, 1:][:, keep], ref.tokens[:, 1:], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out.cls, m(x).cls)  # and masking does change the output
    with pytest.raises(ValueError, match="token_mask"):
        m(x, token_mask=mask.float())


def test_permutation_equivariance() -> None:
    m = _model()
    perm = torch.randperm(A, generator=torch.Generator().manual_seed(4))
    permuted = ViT3D.tiny(P**3, [COORDS[i] for i in perm]).eval()
    permuted.load_state_dict(m.state_dict())
    x = _patches()
    out, out_p = m(x), permuted(x[:, perm])
    torch.testing.assert_close(out_p.cls, out.cls, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_p.tokens[:, 1:], out.tokens[:, 1:][:, perm], atol=1e-5, rtol=1e-5)


def test_subject_embedding() -> None:
    x = _patches(b=2)
    shared = _model()
    s0, s1 = torch.tensor([0, 0]), torch.tensor([1, 1])
    torch.testing.assert_close(shared(x, s0).cls, shared(x, s1).cls, atol=0, rtol=0)
    per_subject = _model(num_subjects=3)
    assert not torch.allclose(per_subject(x, s0).cls, per_subject(x, s1).cls)
    with pytest.raises(ValueError, match="subject"):
        per_subject(x, torch.tensor([0, 3]))


@pytest.mark.parametrize(
    "bad",
    [
        _patches().index_put((torch.tensor([0]), torch.tensor([1]), torch.tensor([2])), torch.tensor(float("nan"))),
        _patches().index_put((torch.tensor([1]), torch.tensor([0]), torch.tensor([0])), torch.tensor(float("inf"))),
        _patches(a=A + 1),
        torch.randn(3, A, P**3 + 1),
        torch.randn(A, P**3),
    ],
    ids=["nan", "inf", "patch-count", "patch-dim", "2d"],
)
def test_bad_patches_raise(bad: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="patches"):
        _model()(bad)


def test_bad_construction_raises() -> None:
    with pytest.raises(ValueError, match="patch_coords"):
        ViT3D.tiny(8, [(0, 0), (1, 1)])
    with pytest.raises(ValueError, match="patch_coords"):
        ViT3D.tiny(8, [(0, 0, -1)])
    with pytest.raises(ValueError, match="divisible"):
        ViT3D(8, COORDS, dim=30, heads=4)
    with pytest.raises(ValueError, match="coords"):
        _model()(_patches(a=1), coords=torch.tensor([[9, 0, 0]]))


def test_tiny_model_overfits_a_batch() -> None:
    torch.manual_seed(0)
    m = ViT3D.tiny(P**3, COORDS)
    head = torch.nn.Linear(64, 16)
    x, y = _patches(b=8, seed=5), torch.randn(8, 16, generator=torch.Generator().manual_seed(6))
    opt = torch.optim.Adam([*m.parameters(), *head.parameters()], lr=3e-3)
    losses = []
    for _ in range(100):
        loss = F.mse_loss(head(m(x).cls), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], losses[::10]


def test_state_dict_round_trip(tmp_path: Path) -> None:
    m = _model(num_subjects=2)
    path = tmp_path / "vit3d.pt"
    torch.save(m.state_dict(), path)
    fresh = ViT3D.tiny(P**3, COORDS, num_subjects=2).eval()
    fresh.load_state_dict(torch.load(path, weights_only=True))
    x, s = _patches(), torch.tensor([0, 1, 1])
    assert torch.equal(fresh(x, s).tokens, m(x, s).tokens)
