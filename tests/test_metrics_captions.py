"""Caption metrics against pycocoevalcap used directly (COCOEvalCap's way), exact match, CLIP-S."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from neurovision.metrics import (
    caption_metrics,
    clip_score,
    clip_score_from_teacher,
    exact_match,
    exact_match_by_type,
    python_ptb_tokenize,
    unavailable_metrics,
)
from neurovision.metrics.captions import METRIC_NAMES, normalize_answer, tokenize_captions

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="java is not installed")

# phantom-like captions: several references per stimulus, candidates from exact to totally wrong
REFS = {
    "s00": ["A small red circle in the top left.", "There is a little red circle in the top left",
            "a red disc near the upper left corner"],
    "s01": ["A big blue square at the bottom right.", "a large blue square in the bottom right corner",
            "one blue square, bottom right"],
    "s02": ["Two green triangles in the centre.", "two small green triangles in the middle of the image"],
    "s03": ["A yellow circle and a red square side by side.", "a red square next to a yellow circle",
            "there's a yellow circle left of a red square"],
    "s04": ["A grey background with a white cross in the middle", "a white cross on a grey background"],
}
CANDS = {
    "s00": "A red circle in the top left corner.",            # partial
    "s01": "a large blue square in the bottom right corner",  # exact copy of a reference
    "s02": "Three purple stars spinning (fast)!",             # totally wrong
    "s03": "A yellow circle isn't next to the red square",    # partial, clitic
    "s04": "",                                                # empty candidate: allowed, scores 0
}
COCO_NAMES = {"Bleu_1": "BLEU-1", "Bleu_2": "BLEU-2", "Bleu_3": "BLEU-3", "Bleu_4": "BLEU-4",
              "METEOR": "METEOR", "ROUGE_L": "ROUGE-L", "CIDEr": "CIDEr"}
from tests.helpers import TINY_CLIP  # noqa: E402

FAST = {"meteor": False, "spice": False, "tokenizer": "python"}  # no java: BLEU, ROUGE-L, CIDEr only


def _coco_eval_cap(cands: dict[str, str], refs: dict[str, list[str]], meteor: bool) -> dict[str, float]:
    """COCOEvalCap.evaluate written out: PTB-tokenise gts and res separately, then every scorer."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    gts = PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in refs.items()})
    res = PTBTokenizer().tokenize({k: [{"caption": c}] for k, c in cands.items()})
    scorers = [(Bleu(4), ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"]), (Rouge(), "ROUGE_L"), (Cider(), "CIDEr")]
    if meteor:
        scorers.insert(1, (Meteor(), "METEOR"))
    out: dict[str, float] = {}
    for scorer, method in scorers:
        score, _ = scorer.compute_score(gts, res)
        if isinstance(method, list):
            out.update(zip(method, score, strict=True))
        else:
            out[method] = score
        if method == "METEOR":
            scorer.__del__()
    return out


@pytest.fixture(scope="module")
def ptb_run() -> tuple[dict[str, float | None], list[subprocess.Popen]]:
    """caption_metrics on the phantom captions (PTB + METEOR), with every subprocess it started."""
    started: list[subprocess.Popen] = []

    class Recording(subprocess.Popen):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            started.append(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(subprocess, "Popen", Recording)
        result = caption_metrics(CANDS, REFS)
    return result, started


# --------------------------------------------------------------------------------------------- COCO metrics
@needs_java
def test_caption_metrics_equal_coco_eval_cap(ptb_run) -> None:
    ours, started = ptb_run
    ref = _coco_eval_cap(CANDS, REFS, meteor=False)  # METEOR's own check is the slow test below
    assert list(ours) == list(METRIC_NAMES)
    for coco, name in COCO_NAMES.items():
        if name != "METEOR":
            assert ours[name] == pytest.approx(ref[coco], abs=1e-9), name
    assert 0.2 < ours["BLEU-1"] < 1 and 0 < ours["BLEU-4"] < ours["BLEU-1"] and 0 < ours["CIDEr"] < 10
    # every java process (PTB, METEOR) has exited; METEOR's pipes are closed
    assert started and all(p.returncode is not None for p in started)
    meteor = [p for p in started if "meteor-1.5.jar" in p.args]
    if "METEOR" in unavailable_metrics():
        assert ours["METEOR"] is None and not meteor
    else:
        assert 0 < ours["METEOR"] < 1  # type: ignore[operator]
        assert len(meteor) == 1 and meteor[0].stdin.closed and meteor[0].stdout.closed


@needs_java
@pytest.mark.slow  # a second METEOR java process: 10-20 s
def test_meteor_equals_coco_eval_cap(ptb_run) -> None:
    if "METEOR" in unavailable_metrics():
        pytest.skip(unavailable_metrics()["METEOR"])
    assert ptb_run[0]["METEOR"] == pytest.approx(_coco_eval_cap(CANDS, REFS, meteor=True)["METEOR"], abs=1e-9)


@needs_java
def test_python_tokenizer_matches_ptb(ptb_run) -> None:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    extra = ["It’s a “big” circle; no squares!", "a dog's toy, the cats' bowls and 1,000 dots at 3:30",
             "A RED CIRCLE!! (left) -- or [right]...", "I can't see it, won't you?", "end with 5."]
    texts = [c for v in REFS.values() for c in v] + list(CANDS.values()) + extra
    ptb = PTBTokenizer().tokenize({i: [{"caption": t}] for i, t in enumerate(texts)})
    assert [python_ptb_tokenize(t) for t in texts] == [ptb[i][0] for i in range(len(texts))]
    assert python_ptb_tokenize("There is a little red circle in the top left.") == \
        "there is a little red circle in the top left"
    py = caption_metrics(CANDS, REFS, **FAST)
    ours = ptb_run[0]
    for name in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"):
        assert py[name] == pytest.approx(ours[name], abs=1e-12), name
    assert py["METEOR"] is None and py["SPICE"] is None


@needs_java
def test_ptb_path_keeps_captions_on_their_keys() -> None:
    # pycocoevalcap only replaces "\n": a "\r" would split a caption and shift every later one to another key
    out = tokenize_captions({1: ["a red\rcircle.", "x\u2028y"], 2: ["blue square"]})
    assert out == {1: ["a red circle", "x y"], 2: ["blue square"]}


def test_matching_captions_beat_shuffled_ones() -> None:
    refs = {k: v[1:] for k, v in REFS.items()}
    same = {k: v[0] for k, v in REFS.items()}  # refs[k] shares phrasing with its own caption only
    keys = list(REFS)
    shuffled = {k: REFS[keys[(i + 2) % len(keys)]][0] for i, k in enumerate(keys)}
    copy = {k: v[0] for k, v in refs.items()}  # a candidate identical to one of its references
    a, b, c = (caption_metrics(x, refs, **FAST) for x in (same, shuffled, copy))
    assert a["CIDEr"] > b["CIDEr"] + 0.5 and a["BLEU-4"] > b["BLEU-4"]
    assert c["BLEU-4"] == pytest.approx(1.0) and c["ROUGE-L"] == pytest.approx(1.0) and c["CIDEr"] > a["CIDEr"]
    empty = caption_metrics(dict.fromkeys(refs, ""), refs, **FAST)
    assert empty["BLEU-1"] == pytest.approx(0.0, abs=1e-9) and empty["ROUGE-L"] == 0 and empty["CIDEr"] == 0


def test_spice_none_with_reason_or_a_number() -> None:
    missing = unavailable_metrics()
    if "SPICE" in missing:
        assert missing["SPICE"]
        out = caption_metrics(CANDS, REFS, meteor=False, tokenizer="python")
        assert out["SPICE"] is None
        with pytest.raises(RuntimeError, match="SPICE is unavailable"):
            caption_metrics(CANDS, REFS, spice=True, meteor=False, tokenizer="python")
    else:  # a machine with Java <= 11 and the Stanford CoreNLP jars
        out = caption_metrics(CANDS, REFS, spice=True, meteor=False, tokenizer="python")
        assert isinstance(out["SPICE"], float) and 0 <= out["SPICE"] <= 1


def test_without_java_only_java_metrics_are_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda *a, **k: None)
    missing = unavailable_metrics()
    assert "java" in missing["METEOR"] and "java" in missing["SPICE"]
    out = caption_metrics(CANDS, REFS, tokenizer="python")
    assert out["METEOR"] is None and out["SPICE"] is None and out["CIDEr"] > 0
    with pytest.raises(RuntimeError, match="tokenizer='python'"):
        caption_metrics(CANDS, REFS)
    with pytest.raises(RuntimeError, match="METEOR is unavailable"):
        caption_metrics(CANDS, REFS, meteor=True, tokenizer="python")


def test_input_validation_names_the_key() -> None:
    with pytest.raises(ValueError, match="'s04' has no references"):
        caption_metrics(CANDS, {k: v for k, v in REFS.items() if k != "s04"}, **FAST)
    with pytest.raises(ValueError, match="'extra' has no candidate"):
        caption_metrics(CANDS, {**REFS, "extra": ["a circle"]}, **FAST)
    with pytest.raises(ValueError, match="'s02' has no references"):
        caption_metrics(CANDS, {**REFS, "s02": []}, **FAST)
    with pytest.raises(ValueError, match="'s01' has an empty"):
        caption_metrics(CANDS, {**REFS, "s01": ["a square", "  "]}, **FAST)
    with pytest.raises(TypeError, match="'s03'"):
        caption_metrics(CANDS, {**REFS, "s03": "a bare string, not a list"}, **FAST)
    with pytest.raises(TypeError, match="'s00'"):
        caption_metrics({**CANDS, "s00": None}, REFS, **FAST)
    with pytest.raises(ValueError, match="no candidates"):
        caption_metrics({}, {}, **FAST)


# --------------------------------------------------------------------------------------------- exact match
@pytest.mark.parametrize(("pred", "answer", "expected"), [
    ("The Red circle.", "red circle", True),
    ("an apple", "Apple", True),
    ("  red \t circle ", "red circle", True),
    ("“red”!", "red", True),
    ("top-left", "topleft", True),      # punctuation is removed, not replaced by a space
    ("theme", "me", False),             # articles are whole words only
    ("circles", "circle", False),
    ("two", "2", False),                # no number-word mapping
    ("a", "the", True),                 # both normalise to ""
])
def test_exact_match(pred: str, answer: str, expected: bool) -> None:
    assert exact_match(pred, answer) is expected


def test_normalize_answer() -> None:
    assert normalize_answer("The  BIG, red (round) circle!") == "big red round circle"


def test_exact_match_by_type() -> None:
    rows = [
        {"type": "color", "prediction": "Red", "answer": "red"},
        {"type": "color", "prediction": "blue", "answer": "green"},
        {"type": "count", "prediction": "2", "answer": "2"},
        {"type": "color", "prediction": "the yellow", "answer": "yellow."},
        {"type": "position", "prediction": "left", "answer": "right"},
    ]
    out = exact_match_by_type(iter(rows))
    assert out == {"color": pytest.approx(2 / 3), "count": 1.0, "position": 0.0, "all": pytest.approx(3 / 5)}
    assert list(out) == ["color", "count", "position", "all"]
    with pytest.raises(KeyError, match="row 1"):
        exact_match_by_type([rows[0], {"type": "x", "prediction": "a"}])
    with pytest.raises(ValueError):
        exact_match_by_type([])


# --------------------------------------------------------------------------------------------- CLIP-S
def test_clip_score_against_numpy(rng: np.random.Generator) -> None:
    img = rng.normal(size=(6, 16))
    txt = img + rng.normal(scale=1.0, size=img.shape)
    txt[2] = -3.0 * img[2]  # cosine -1: clipped to 0
    txt[4] = rng.normal(size=16)
    cos = np.sum(img * txt, 1) / np.linalg.norm(img, axis=1) / np.linalg.norm(txt, axis=1)
    expected = 2.5 * np.maximum(cos, 0)
    assert expected[2] == 0 and (expected > 0).sum() >= 4
    got = clip_score(torch.tensor(img, dtype=torch.float32), torch.tensor(txt, dtype=torch.float32))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)
    got64 = clip_score(torch.tensor(img), torch.tensor(txt), w=1.0)
    assert got64.dtype == torch.float64
    np.testing.assert_allclose(got64.numpy(), expected / 2.5, rtol=1e-12)
    with pytest.raises(ValueError, match="paired"):
        clip_score(torch.zeros(3, 4), torch.zeros(2, 4))


def test_clip_score_from_tiny_teacher(tmp_path: Path) -> None:
    from neurovision.pretrained.teachers import OpenCLIPImageTeacher

    cfg = tmp_path / "tiny_clip.json"
    cfg.write_text(json.dumps(TINY_CLIP))
    teacher = OpenCLIPImageTeacher("tiny", model_config=str(cfg), device="cpu")
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=g)
    captions = ["a red circle", "a blue square", "two green triangles", "a white cross", "nothing at all"]
    got = clip_score_from_teacher(teacher, images, captions, batch_size=2)  # batches of 2, 2, 1
    img = teacher.encode(images).double().numpy()
    txt = teacher.encode_text(["A photo depicts " + c for c in captions]).double().numpy()
    cos = np.sum(img * txt, 1) / np.linalg.norm(img, axis=1) / np.linalg.norm(txt, axis=1)
    assert got == pytest.approx(float(np.mean(2.5 * np.maximum(cos, 0))), rel=1e-5, abs=1e-7)
    raw = clip_score_from_teacher(teacher, images, captions, w=1.0, prefix="")
    txt = teacher.encode_text(captions).double().numpy()
    cos = np.sum(img * txt, 1) / np.linalg.norm(img, axis=1) / np.linalg.norm(txt, axis=1)
    assert raw == pytest.approx(float(np.mean(np.maximum(cos, 0))), rel=1e-5, abs=1e-7)
    with pytest.raises(ValueError, match="captions"):
        clip_score_from_teacher(teacher, images, captions[:3])
