"""The trained networks of stage 1 as later stages and localisation reuse them: the paper's MLP heads, and a
stage-1 checkpoint rebuilt without teachers or data (:func:`load_stage1`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from neurovision.data.spec import DataSpec
from neurovision.models.readout import VoxelReadout, with_readout
from neurovision.models.vit3d import ViT3D


class MLPHead(nn.Sequential):
    """The paper's 2-layer MLP head: Linear -> GELU -> Linear (hidden 1024)."""

    def __init__(self, dim: int, hidden: int, out: int) -> None:
        super().__init__(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, out))

    @property
    def out_features(self) -> int:
        """The output size (the last ``Linear``'s)."""
        last = self[-1]
        assert isinstance(last, nn.Linear)
        return last.out_features


class Stage1Parts(nn.Module):
    """The trained networks of a stage-1 checkpoint, rebuilt without teachers or data.

    Attributes:
        encoder: the ViT3D.
        clip_head: CLS -> CLIP image embedding.
        vae_head: CLS -> flattened VAE latent (None if the run had no VAE stream).
        skip: the voxel read-out added to the CLIP head's output (None if the run had no ``linear_skip``);
            :meth:`predict_clip` adds it.
        spec: the :class:`DataSpec` the run was trained with.
        hparams: the run's hyper-parameters (plain types).
        teacher_ids: ids of the CLIP / VAE teachers whose targets the heads were trained towards.
    """

    def __init__(self, encoder: ViT3D, clip_head: MLPHead, vae_head: MLPHead | None, spec: DataSpec,
                 hparams: dict[str, Any], teacher_ids: dict[str, Any], skip: VoxelReadout | None = None) -> None:
        super().__init__()
        self.encoder, self.clip_head, self.vae_head, self.skip = encoder, clip_head, vae_head, skip
        self.spec, self.hparams, self.teacher_ids = spec, hparams, teacher_ids

    def predict_clip(self, cls: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """The stage-1 CLIP prediction, as :class:`~neurovision.tasks.alignment.AlignmentTask` makes it: the head on ``cls`` plus the read-out."""
        return with_readout(self.clip_head(cls), self.skip, patches)


def check_stage1_spec(stage1_spec: DataSpec, spec: DataSpec, path: str, key: str = "model.init_args.stage1") -> None:
    """The grid and patches of a stage-1 run must be the datamodule store's (later stages reuse its ViT3D: another
    grid's patches would go through embeddings trained for other positions without an error)."""
    for f in ("patch_size", "grid_shape", "patch_coords"):
        ours, theirs = getattr(spec, f), getattr(stage1_spec, f)
        if theirs != ours:
            said = (f"{len(theirs)} active patches vs {len(ours)} (or other positions)" if f == "patch_coords"
                    else f"{theirs} vs {ours}")
            raise ValueError(f"{path}: field 'data_spec/{f}': the stage-1 run's differs from the datamodule store's: "
                             f"{said} (YAML keys {key}, data.init_args.store: a stage-1 run of another grid)")


def load_stage1(path: str | Any, map_location: str | torch.device = "cpu",
                key: str = "model.init_args.stage1") -> Stage1Parts:
    """Rebuild the ViT3D and heads of an :class:`~neurovision.tasks.alignment.AlignmentTask` checkpoint (``torch.load(weights_only=True)``).

    Raises ``FileNotFoundError`` naming the path (and ``key``, the YAML key or flag that gave it) if it does not
    exist and ``ValueError`` naming the missing field if the file is not a stage-1 checkpoint.
    """
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: stage-1 checkpoint does not exist ({key})")
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:  # a truncated zip, a foreign file, a pickle of non-tensor objects
        raise ValueError(f"{p}: field '<file>': not a readable checkpoint ({key}): {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}") from e
    if not isinstance(ckpt, dict):
        raise ValueError(f"{p}: field '<file>': not a Lightning checkpoint ({key}): a {type(ckpt).__name__}")
    hp = ckpt.get("hyper_parameters") or {}
    sd = ckpt.get("state_dict") or {}
    for field in ("dim", "depth", "heads", "data_spec"):
        if field not in hp:
            raise ValueError(f"{p}: field 'hyper_parameters/{field}': missing (not a stage-1 AlignmentTask checkpoint; "
                             f"{key})")
    if "clip_head.3.weight" not in sd:
        raise ValueError(f"{p}: field 'state_dict/clip_head.3.weight': missing (not a stage-1 AlignmentTask checkpoint; "
                         f"{key})")
    ds = dict(hp["data_spec"])
    spec = DataSpec(
        num_active_patches=int(ds["num_active_patches"]), patch_size=int(ds["patch_size"]),
        grid_shape=tuple(int(v) for v in ds["grid_shape"]),  # type: ignore[arg-type]
        patch_coords=tuple(tuple(int(v) for v in c) for c in ds["patch_coords"]),  # type: ignore[misc]
        num_subjects=int(ds["num_subjects"]), image_shape=tuple(int(v) for v in ds["image_shape"]),  # type: ignore[arg-type]
    )
    encoder = ViT3D(
        patch_dim=spec.patch_dim, patch_coords=spec.patch_coords, dim=int(hp["dim"]), depth=int(hp["depth"]),
        heads=int(hp["heads"]), mlp_ratio=float(hp.get("mlp_ratio", 4.0)),
        num_subjects=spec.num_subjects if hp.get("subject_embedding") else 0,
    )
    hidden = int(hp.get("head_hidden", 1024))
    clip_head = MLPHead(encoder.dim, hidden, int(sd["clip_head.3.weight"].shape[0]))
    vae_head = MLPHead(encoder.dim, hidden, int(sd["vae_head.3.weight"].shape[0])) if "vae_head.3.weight" in sd else None
    skip = None
    if hp.get("linear_skip"):
        skip = VoxelReadout(spec.num_active_patches * spec.patch_dim, int(sd["clip_head.3.weight"].shape[0]),
                            rank=hp.get("linear_skip_rank"), dropout=float(hp.get("linear_skip_dropout", 0.5)))
    parts = Stage1Parts(encoder, clip_head, vae_head, spec, dict(hp), dict(ckpt.get("teacher_ids") or {}), skip)
    state = {k: v for k, v in sd.items() if k.split(".")[0] in ("encoder", "clip_head", "vae_head", "skip")}
    parts.load_state_dict(state, strict=True)
    return parts.eval()
