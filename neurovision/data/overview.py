"""Figures for people who would rather look than read: a store at a glance."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from neurovision.data.atomic import atomic_path
from neurovision.data.store import Store


def store_overview(store: Store, out: str | os.PathLike[str], n_images: int = 8, seed: int = 0) -> Path:
    """PNG with sample stimuli (and their first caption), the union ROI and active patches on the grid
    (three mid slices), and each subject's ROI in its own space. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    n_img = min(n_images, len(store.stimulus_ids))
    picks = np.sort(rng.choice(len(store.stimulus_ids), n_img, replace=False))
    captions = store.annotations("captions") if "captions" in store.annotation_kinds else None
    n_subj = len(store.subjects)
    cols = max(n_img, 3, n_subj)
    fig, axes = plt.subplots(3, cols, figsize=(2.2 * cols, 7.2), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, k in zip(axes[0], picks, strict=False):
        ax.imshow(store.image(int(k)))
        if captions and captions[k]:
            ax.set_title(_wrap(captions[k][0]), fontsize=7)
    union = store.union_mask()
    grid = store.grid_spec()
    active = grid.to_grid(np.ones((store.grid.n_active, store.grid.patch_size**3), np.float32)).numpy()
    for a, ax in enumerate(axes[1][:3]):
        sl = [slice(None)] * 3
        sl[a] = union.shape[a] // 2
        ax.imshow(np.rot90(active[tuple(sl)]), cmap="Blues", vmin=0, vmax=2)
        ax.contour(np.rot90(union[tuple(sl)].astype(float)), levels=[0.5], colors="crimson", linewidths=1)
        ax.set_title(f"grid axis {'xyz'[a]} mid slice\nblue: active patches, red: union ROI", fontsize=7)
    for ax, s in zip(axes[2], store.subjects, strict=False):
        roi = store.roi(s.name)
        z = int(np.argmax(roi.sum((0, 1)))) if roi.any() else roi.shape[2] // 2
        ax.imshow(np.rot90(roi[:, :, z]), cmap="Reds")
        ax.set_title(f"{s.name} ROI, z={z}\n{'x'.join(map(str, s.original_shape))}", fontsize=7)
    fig.suptitle(f"{store.path.name}: {len(store)} trials, {n_subj} subjects, "
                 f"{store.grid.n_active}/{store.grid.n_patches} active patches", fontsize=10)
    fig.tight_layout()
    out = Path(out)
    with atomic_path(out, suffix=out.suffix or ".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return out


def _wrap(text: str, width: int = 28) -> str:
    words, lines, cur = text.split(), [], ""
    for w in words:
        if len(cur) + len(w) + 1 > width and cur:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}".strip()
    lines.append(cur)
    return "\n".join(lines[:3])
