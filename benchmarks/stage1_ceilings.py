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


def _ridge(x: dict[str, np.ndarray], y: dict[str, np.ndarray], alphas: list[float]) -> float:
    """Test retrieval of a ridge map fitted on ``train`` with the penalty that retrieves best on ``val``."""
    from sklearn.linear_model import Ridge

    def fitted(a: float) -> Ridge:
        return Ridge(alpha=a).fit(x["train"], y["train"])

    best = max(alphas, key=lambda a: _retrieval(fitted(a).predict(x["val"]), y["val"]))
    return _retrieval(fitted(best).predict(x["test"]), y["test"])


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

    import neurovision

    neurovision.setup_environment()  # the torchvision fix, before lightning (data_modules) and open_clip load it
    from data_modules.fmri import FMRITrials
    from neurovision.data.store import Store
    from neurovision.pretrained.teachers import OpenCLIPImageTeacher, TeacherCache
    from neurovision.sources import scenes
    from neurovision.sources.phantom import _contrast

    st = Store(args.store)
    teacher = OpenCLIPImageTeacher(model_name=args.clip_model_name, model_config=args.clip_model_config,
                                   checkpoint=args.clip_checkpoint, device="cpu")
    clip = np.asarray(TeacherCache().get(st, teacher), dtype=np.float64)
    scene_list = [scenes.Scene(tuple(scenes.SceneObject(**o) for o in objs)) for objs in st.annotations("scenes")]
    planted = np.concatenate([np.stack([scenes.presence(sc) for sc in scene_list]),
                              0.5 * np.stack([_contrast(st.image(i)) for i in range(len(scene_list))])], 1)
    alphas = [10.0 ** e for e in range(-2, 6)]
    rows = []
    for s, name in enumerate(st.subject_names):
        x, stim = {}, {}
        for split in ("train", "val", "test"):  # one trial-averaged pattern per image
            ds = FMRITrials(st, split, [s], mode="average")
            x[split] = np.stack([ds.group_mean(g).numpy().ravel() for g in range(len(ds.groups))])
            stim[split] = np.array([int(st.trials["stimulus"][grp[0]]) for grp in ds.groups])
        y = {k: clip[v] for k, v in stim.items()}
        row: dict[str, object] = {"subject": name}
        row["voxels"] = _ridge(x, y, alphas)
        for k in args.pca:
            pca = PCA(k, random_state=0).fit(x["train"])
            z = StandardScaler().fit(pca.transform(x["train"]))
            row[f"pca{k}"] = _ridge({sp: z.transform(pca.transform(v)) for sp, v in x.items()}, y, alphas)
        row["planted"] = _ridge({sp: planted[v] for sp, v in stim.items()}, y, alphas)
        rows.append(row)
        print(json.dumps(row), flush=True)
    n_test = len(stim["test"])
    keys = [k for k in rows[0] if k != "subject"]
    print(f"mean over subjects (test retrieval among {n_test}, chance {100 / n_test:.2f} %):")
    for k in keys:
        print(f"  {k:>8}: {100 * np.mean([float(r[k]) for r in rows]):.1f} %")


if __name__ == "__main__":
    main()
