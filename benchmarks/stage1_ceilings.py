#!/usr/bin/env python
"""Reference decoders for stage 1 on a phantom store: how far linear read-outs get, outside the framework.

For each subject, trial-averaged patterns of its own training images fit a ridge map to the CLIP teacher's
embeddings (the same targets stage 1 learns, from the teacher cache); the ridge penalty is chosen on the
subject's validation images; the score is fMRI->image top-1 retrieval among the shared test images (cosine), as
stage 1 reports it. Three inputs:

- ``voxels``: every active voxel (76 x 216 at the demo geometry);
- ``pca<k>``: the top-k principal components of the training patterns (whitened);
- ``planted``: the phantom's noise-free generating features of each image (concept counts and the 6 x 6
  receptive-field contrasts), i.e. what a perfect brain decoder could hand a linear map: the ceiling set by the
  teacher's embedding, not by the fMRI.

Usage::

    python benchmarks/stage1_ceilings.py --store data/phantom_demo.h5 \
        --clip-model-config teachers/phantom_demo/tiny_clip.json --clip-checkpoint teachers/phantom_demo/tiny_clip.pt
"""

from __future__ import annotations

import argparse
import json
import warnings

import numpy as np


def _retrieval(pred: np.ndarray, target: np.ndarray) -> float:
    p = pred / np.linalg.norm(pred, axis=1, keepdims=True)
    t = target / np.linalg.norm(target, axis=1, keepdims=True)
    return float(((p @ t.T).argmax(1) == np.arange(len(t))).mean())


def _ridge(x_tr, y_tr, x_va, y_va, x_te, y_te, alphas) -> tuple[float, float]:
    from sklearn.linear_model import Ridge

    best = max(alphas, key=lambda a: _retrieval(Ridge(alpha=a).fit(x_tr, y_tr).predict(x_va), y_va))
    return _retrieval(Ridge(alpha=best).fit(x_tr, y_tr).predict(x_te), y_te), best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--clip-model-name", default="tiny_clip")
    ap.add_argument("--clip-model-config", required=True)
    ap.add_argument("--clip-checkpoint", default=None)
    ap.add_argument("--pca", type=int, nargs="+", default=[32, 64])
    args = ap.parse_args()

    from scipy.linalg import LinAlgWarning
    from sklearn.decomposition import PCA

    warnings.filterwarnings("ignore", category=LinAlgWarning)  # the smallest penalties on the planted features
    from sklearn.preprocessing import StandardScaler

    from neurovision.sources import scenes
    from neurovision.sources.phantom import _contrast
    from neurovision.store import SPLITS, Store
    from neurovision.teachers import OpenCLIPImageTeacher, TeacherCache

    st = Store(args.store)
    teacher = OpenCLIPImageTeacher(model_name=args.clip_model_name, model_config=args.clip_model_config,
                                   checkpoint=args.clip_checkpoint, device="cpu")
    clip = np.asarray(TeacherCache().get(st, teacher), dtype=np.float64)
    t = st.trials
    scene_list = [scenes.Scene(tuple(scenes.SceneObject(**o) for o in (json.loads(s) if isinstance(s, (str, bytes)) else s)))
                  for s in st.annotations("scenes")]
    planted = np.concatenate([np.stack([scenes.presence(sc) for sc in scene_list]),
                              0.5 * np.stack([_contrast(st.image(i)) for i in range(len(scene_list))])], 1)
    alphas = [10.0 ** e for e in range(-2, 6)]
    rows = []
    for s, name in enumerate(st.subject_names):
        idx = np.flatnonzero(t["subject"] == s)
        stim = t["stimulus"][idx]
        uniq = np.unique(stim)
        avg = np.stack([np.stack([st.patches(int(i)) for i in idx[stim == u]]).astype(np.float32).mean(0).ravel()
                        for u in uniq])
        split = np.array([t["split"][idx[stim == u][0]] for u in uniq])
        tr, va, te = (split == SPLITS.index(k) for k in ("train", "val", "test"))
        y = clip[uniq]
        row = {"subject": name}
        row["voxels"], _ = _ridge(avg[tr], y[tr], avg[va], y[va], avg[te], y[te], alphas)
        for k in args.pca:
            pca = PCA(k, random_state=0).fit(avg[tr])
            z = StandardScaler().fit(pca.transform(avg[tr]))
            zz = z.transform(pca.transform(avg))
            row[f"pca{k}"], _ = _ridge(zz[tr], y[tr], zz[va], y[va], zz[te], y[te], alphas)
        f = planted[uniq]
        row["planted"], _ = _ridge(f[tr], y[tr], f[va], y[va], f[te], y[te], alphas)
        rows.append(row)
        print(json.dumps(row), flush=True)
    keys = [k for k in rows[0] if k != "subject"]
    print(f"mean over subjects (test retrieval among {te.sum()}, chance {100 / te.sum():.2f} %):")
    for k in keys:
        print(f"  {k:>8}: {100 * np.mean([r[k] for r in rows]):.1f} %")


if __name__ == "__main__":
    main()
