"""GradCAM of a concept on the ViT3D's patch tokens (Shen et al. 2024, Fig. 6): the gradient of the concept's CLIP
similarity with respect to the hidden states entering an encoder block, weighted by those states, per patch.

:mod:`neurovision.localization.maps` spreads the patch maps into each subject's voxels, aggregates and scores them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from neurovision.pretrained.hooks import ForwardHooks

__all__ = ["concept_cams", "gradcam"]


@contextmanager
def _capture(encoder: nn.Module, layer: int) -> Iterator[Callable[[Any], Tensor]]:
    """Within the block: a function ``output -> (B, 1 + A, D)`` hidden states at ``layer`` of the last forward.

    ``layer`` k is the input of block k of ``encoder.blocks`` (0: the token embeddings, -1: the input of the last
    block, i.e. ``ViT3DOutput.penultimate``), taken by a forward pre-hook on that block. The hook hands the block a
    tensor that requires grad, so the states are differentiable even when the encoder's parameters are frozen.
    An encoder without ``blocks`` supports only ``layer=-1`` (its ``.penultimate``).
    """
    blocks = getattr(encoder, "blocks", None)
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)):
        if layer != -1:
            raise ValueError(f"layer={layer} needs an encoder with .blocks; {type(encoder).__name__} has none "
                             "(only layer=-1, its .penultimate)")
        yield lambda out: out.penultimate
        return
    n = len(blocks)
    if not -n <= layer < n:
        raise ValueError(f"layer must be in [{-n}, {n - 1}] (the input of block k; -1: the last), got {layer}")
    target = blocks[layer]
    name = next(k for k, m in encoder.named_modules() if m is target)
    with ForwardHooks(encoder, [name], capture="input", differentiable=True, owner="GradCAM") as hooks:
        yield lambda out: hooks.out[name]


def _cams(encoder: nn.Module, clip_head: nn.Module, patches: Tensor, text: Tensor, subject: Tensor | None,
          paired: bool, relu: bool, normalize: bool, layer: int = -1) -> Tensor:
    """(C, B, A) GradCAMs of C targets (``paired``: one target per sample, C = 1) at ``layer``."""
    modules = (encoder, clip_head)
    was_training = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        # inference_mode(False): the Lightning test loop runs hooks under inference mode
        with torch.inference_mode(False), torch.enable_grad(), _capture(encoder, layer) as states:
            x = patches.clone() if patches.is_inference() else patches
            x = x.detach()
            t = text.clone() if text.is_inference() else text
            sub = None if subject is None else (subject.clone() if subject.is_inference() else subject)
            out = encoder(x, sub)
            act = states(out)  # (B, 1 + A, D): the hidden states entering block ``layer``
            pred = F.normalize(clip_head(out.cls).float(), dim=-1)
            t = F.normalize(t.detach().float().to(pred.device), dim=-1)
            sims = (pred * t).sum(-1, keepdim=True) if paired else pred @ t.T  # (B, C)
            tokens = act[:, 1:].detach().float()  # CLS dropped
            cams = []
            n = sims.shape[1]
            for c in range(n):
                # samples are independent, so the gradient of the batch sum is each sample's own gradient
                (g,) = torch.autograd.grad(sims[:, c].sum(), act, retain_graph=c < n - 1)
                w = g[:, 1:].float().mean(1, keepdim=True)  # (B, 1, D): channel weights
                cam = (w * tokens).sum(-1)  # (B, A)
                cams.append(F.relu(cam) if relu else cam)
            cam = torch.stack(cams).detach()
    finally:
        for m, training in zip(modules, was_training, strict=True):
            m.train(training)
    if normalize:
        cam = cam / cam.abs().amax(-1, keepdim=True).clamp_min(1e-12)
    return cam


def gradcam(encoder: nn.Module, clip_head: nn.Module, patches: Tensor, text_emb: Tensor,
            subject: Tensor | None = None, *, relu: bool = True, normalize: bool = False, layer: int = -1) -> Tensor:
    """GradCAM of ``cos(clip_head(encoder(patches).cls), text_emb)`` at the token states entering block ``layer``.

    Args:
        encoder: a :class:`~neurovision.models.ViT3D` (anything returning ``.cls`` (B, D) and
            ``.penultimate`` (B, 1 + A, D) from ``encoder(patches, subject)``; other layers than -1 need its
            transformer blocks as ``encoder.blocks``).
        clip_head: CLS -> CLIP embedding.
        patches: (B, A, P**3) active patches.
        text_emb: (D_clip,) one target for all samples, or (B, D_clip) one per sample.
        subject: (B,) subject indices (used by encoders with a subject embedding).
        relu: keep only the positive evidence (GradCAM); False returns the signed map.
        normalize: divide each sample's map by its maximum absolute value.
        layer: where the map is taken: the hidden states entering block ``layer`` (-1, default: the last block,
            i.e. the penultimate layer, the paper's choice; 0: the token embeddings, patch embedding +
            position; negative values count from the end).

    Returns:
        (B, A) one value per active patch. Runs the modules in eval mode (restored afterwards), builds its
        own graph even under ``torch.inference_mode`` and leaves no ``.grad`` on any parameter.
    """
    if text_emb.ndim == 1:
        return _cams(encoder, clip_head, patches, text_emb[None], subject, False, relu, normalize, layer)[0]
    if text_emb.ndim != 2 or text_emb.shape[0] != patches.shape[0]:
        raise ValueError(f"text_emb must be (D,) or (B={patches.shape[0]}, D), got {tuple(text_emb.shape)}")
    return _cams(encoder, clip_head, patches, text_emb, subject, True, relu, normalize, layer)[0]


def concept_cams(encoder: nn.Module, clip_head: nn.Module, patches: Tensor, text_embs: Tensor,
                 subject: Tensor | None = None, *, relu: bool = True, normalize: bool = False,
                 layer: int = -1) -> Tensor:
    """(C, B, A) GradCAMs of C concept embeddings (C, D_clip) from one forward pass (see :func:`gradcam`)."""
    if text_embs.ndim != 2:
        raise ValueError(f"text_embs must be (C, D), got {tuple(text_embs.shape)}")
    return _cams(encoder, clip_head, patches, text_embs, subject, False, relu, normalize, layer)
