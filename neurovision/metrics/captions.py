"""Caption metrics for stage 2: COCO caption metrics, exact match and CLIP-S.

- :func:`caption_metrics`: BLEU-1..4, METEOR, ROUGE-L, CIDEr (and SPICE) exactly as ``COCOEvalCap`` computes
  them: captions tokenised by pycocoevalcap's ``PTBTokenizer`` (Java), then each scorer's ``compute_score``.
  ``tokenizer="python"`` replaces the Java tokenizer by :func:`python_ptb_tokenize` (same output on plain
  captions) on machines without Java. A metric whose backend is missing is ``None``, never a made-up number;
  :func:`unavailable_metrics` says why.
- :func:`exact_match` / :func:`exact_match_by_type`: normalised exact match of short answers (SQuAD style).
- :func:`clip_score` / :func:`clip_score_from_teacher`: CLIP-S of Hessel et al. (2021), reference free.

Nothing here downloads: SPICE needs the Stanford CoreNLP 3.6.0 jars that pycocoevalcap fetches on first use,
so it is reported unavailable (not downloaded) when they are absent.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import re
import shutil
import subprocess
import unicodedata
from collections.abc import Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
import torch.nn.functional as F

from neurovision.metrics.items import RowMetric

_K = TypeVar("_K", bound=Hashable)  # the caller's caption keys (e.g. (subject, stimulus) tuples)

METRIC_NAMES: tuple[str, ...] = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE")

#: What pycocoevalcap's PTBTokenizer drops after tokenising (its ``PUNCTUATIONS``). With ``-lowerCase`` the
#: bracket tokens come out as ``-lrb-`` etc., so the upper-case entries never match: brackets are kept.
PTB_PUNCTUATIONS = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                              ".", "?", "!", ",", ":", "-", "--", "...", ";"])


# --------------------------------------------------------------------------------------------- backends
def _coco_dir() -> Path | None:
    spec = importlib.util.find_spec("pycocoevalcap")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


@functools.lru_cache(maxsize=4)
def _java_major(java: str) -> int | None:
    """Major version of the ``java`` executable (8 for ``1.8.0_x``); ``None`` when it cannot be read."""
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if m is None:
        return None
    major = int(m.group(1))
    return int(m.group(2) or 0) if major == 1 else major


def _ptb_problem() -> str | None:
    """Why pycocoevalcap's Java PTBTokenizer cannot run here (``None`` when it can)."""
    root = _coco_dir()
    if root is None:
        return "pycocoevalcap is not installed (pip install pycocoevalcap)"
    if shutil.which("java") is None:
        return "java not found on PATH"
    jar = root / "tokenizer" / "stanford-corenlp-3.4.1.jar"
    if not jar.is_file():
        return f"missing {jar}"
    if not os.access(jar.parent, os.W_OK):  # PTBTokenizer writes its input file next to the jar
        return f"{jar.parent} is not writable (PTBTokenizer writes its temporary input file there)"
    return None


def unavailable_metrics() -> dict[str, str]:
    """Metrics of :func:`caption_metrics` that cannot be computed on this machine, with the reason.

    Checks files and the Java version only: it never starts a download and never runs a scorer.
    """
    root = _coco_dir()
    if root is None:
        return dict.fromkeys(METRIC_NAMES, "pycocoevalcap is not installed (pip install pycocoevalcap)")
    out: dict[str, str] = {}
    java = shutil.which("java")
    meteor = [p for p in (root / "meteor" / "meteor-1.5.jar", root / "meteor" / "data" / "paraphrase-en.gz")
              if not p.is_file()]
    if java is None:
        out["METEOR"] = "java not found on PATH (METEOR runs meteor-1.5.jar)"
    elif meteor:
        out["METEOR"] = "missing " + ", ".join(map(str, meteor))
    lib = root / "spice" / "lib"
    spice = [p for p in (root / "spice" / "spice-1.0.jar", lib / "stanford-corenlp-3.6.0.jar",
                         lib / "stanford-corenlp-3.6.0-models.jar") if not p.is_file()]
    reasons = []
    if java is None:
        reasons.append("java not found on PATH")
    if spice:
        reasons.append(
            "missing " + ", ".join(p.name for p in spice) + f" in {lib.parent} (pycocoevalcap downloads "
            "stanford-corenlp-full-2015-12-09.zip on first use; not attempted here: copy "
            f"stanford-corenlp-3.6.0.jar and stanford-corenlp-3.6.0-models.jar into {lib})")
    if java is not None:
        major = _java_major(java)
        if major is not None and major > 11:
            reasons.append(f"SPICE 1.0 needs Java 8..11, found Java {major} (newer JVMs abort with "
                           "InaccessibleObjectException)")
    if reasons:
        out["SPICE"] = "; ".join(reasons)
    return out


# --------------------------------------------------------------------------------------------- tokenizer
_UNICODE = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": " ", "\u201d": " ", "\u2026": "...",
                          "\u2013": " -- ", "\u2014": " -- ", "`": " ", '"': " "})
_BRACKETS = {"(": " -lrb- ", ")": " -rrb- ", "[": " -lsb- ", "]": " -rsb- ", "{": " -lcb- ", "}": " -rcb- "}
_CLITICS = ("'s", "'re", "'ve", "'ll", "'d", "'m")
_SPLIT_WORDS = {"cannot": "can not", "gonna": "gon na", "gotta": "got ta", "wanna": "wan na",
                "lemme": "lem me", "gimme": "gim me", "'tis": "'t is", "'twas": "'t was"}
_ABBREVIATIONS = frozenset(["mr.", "mrs.", "ms.", "dr.", "st.", "jr.", "sr.", "vs.", "etc.", "prof.", "inc.",
                            "ltd.", "co.", "no."])


def _split_token(tok: str) -> list[str]:
    if tok in _SPLIT_WORDS:
        return _SPLIT_WORDS[tok].split()
    if tok.endswith(".") and len(tok) > 1 and tok not in _ABBREVIATIONS \
            and re.fullmatch(r"(?:[a-z]\.)+", tok) is None:  # u.s., e.g. stay whole
        return [*_split_token(tok[:-1]), "."]
    while tok.startswith("'") and len(tok) > 1 and tok not in _CLITICS and tok != "'em":
        tok = tok[1:]  # an opening quote (PTB: "`", dropped)
    if tok.endswith("n't") and len(tok) > 3:
        return [tok[:-3], "n't"]
    for c in _CLITICS:
        if tok.endswith(c) and len(tok) > len(c):
            return [tok[: -len(c)], c]
    if tok.endswith("'") and len(tok) > 1:  # a closing quote or a plural possessive (shapes')
        return [tok.rstrip("'"), "'"]
    return [tok]


def python_ptb_tokenize(caption: str) -> str:
    """Pure-python stand-in for pycocoevalcap's ``PTBTokenizer`` on one caption (no Java needed).

    Lower-cases, splits punctuation, clitics (``is n't``, ``it 's``) and brackets (``-lrb-``) like Stanford's
    PTBTokenizer with ``-lowerCase``, then drops the tokens COCOEvalCap drops (:data:`PTB_PUNCTUATIONS`).
    Equal to the Java tokenizer on ordinary captions (words, digits, ``.,;:!?'"()-``), not on every input.
    """
    s = " ".join(caption.split()).translate(_UNICODE).lower()
    for b, t in _BRACKETS.items():
        s = s.replace(b, t)
    s = s.replace("...", " ... ").replace("--", " -- ")
    s = re.sub(r"[!?]+|[;%$#+=<>|]", r" \g<0> ", s)
    s = re.sub(r"(?<!\d)[,:]|[,:](?!\d)", r" \g<0> ", s)  # 1,000 and 3:30 stay whole
    tokens = [t for tok in s.split() for t in _split_token(tok)]
    return " ".join(t for t in tokens if t and t not in PTB_PUNCTUATIONS)


def _clean(caption: str) -> str:
    # every kind of line break to a space: the Java tokenizer reads one caption per line, and pycocoevalcap
    # only replaces "\n" (a "\r" would shift every later caption onto the wrong key)
    return " ".join(caption.split())


def tokenize_captions(
    captions: Mapping[_K, Sequence[str]], tokenizer: Literal["ptb", "python"] = "ptb",
) -> dict[_K, list[str]]:
    """Tokenise ``{key: [caption, ...]}`` as COCOEvalCap does (one Java call for all captions)."""
    if tokenizer == "python":
        return {k: [python_ptb_tokenize(c) for c in v] for k, v in captions.items()}
    if tokenizer != "ptb":
        raise ValueError(f"tokenizer must be 'ptb' or 'python', got {tokenizer!r}")
    problem = _ptb_problem()
    if problem is not None:
        raise RuntimeError(f"the PTB tokenizer cannot run: {problem}; pass tokenizer='python'")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    out = PTBTokenizer().tokenize({k: [{"caption": _clean(c)} for c in v] for k, v in captions.items()})
    bad = [k for k, v in captions.items() if len(out.get(k, ())) != len(v)]
    if bad:
        raise RuntimeError(f"PTBTokenizer returned the wrong number of captions for key {bad[0]!r}")
    return out


# --------------------------------------------------------------------------------------------- COCO metrics
def _validate(candidates: Mapping[_K, str], references: Mapping[_K, Sequence[str]]) -> None:
    if not candidates:
        raise ValueError("no candidates")
    missing = [k for k in candidates if k not in references]
    extra = [k for k in references if k not in candidates]
    if missing or extra:
        raise ValueError("candidates and references must have the same keys: "
                         + ", ".join(f"key {k!r} has no references" for k in missing[:5])
                         + ("; " if missing and extra else "")
                         + ", ".join(f"key {k!r} has no candidate" for k in extra[:5]))
    for k, c in candidates.items():
        if not isinstance(c, str):
            raise TypeError(f"candidate for key {k!r} must be a string, got {type(c).__name__}")
        refs = references[k]
        if isinstance(refs, str) or not isinstance(refs, Sequence):
            raise TypeError(f"references for key {k!r} must be a list of strings, got {type(refs).__name__}")
        if len(refs) == 0:
            raise ValueError(f"key {k!r} has no references (at least one is needed)")
        for r in refs:
            if not isinstance(r, str) or not r.strip():
                raise ValueError(f"key {k!r} has an empty or non-string reference: {r!r}")


def _meteor(gts: dict[int, list[str]], res: dict[int, list[str]]) -> float:
    """METEOR via pycocoevalcap's persistent java process, always stopped afterwards."""
    from pycocoevalcap.meteor.meteor import Meteor

    m = Meteor()
    p = m.meteor_p
    try:
        return float(m.compute_score(gts, res)[0])
    except Exception as e:
        p.kill()
        err = p.stderr.read().decode(errors="replace")[-2000:] if p.stderr else ""
        raise RuntimeError(f"METEOR failed ({e!r}); java said: {err.strip() or '(nothing)'}") from e
    finally:
        if m.lock.locked():  # compute_score keeps its lock on errors, and Meteor.__del__ would then hang
            m.lock.release()
        for f in (p.stdin, p.stdout, p.stderr):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()
        p.kill()  # a no-op once it has exited; Meteor.__del__ at GC then finds nothing left to do
        p.wait()


def caption_metrics(
    candidates: Mapping[_K, str],
    references: Mapping[_K, Sequence[str]],
    *,
    spice: bool | Literal["auto"] = "auto",
    meteor: bool | Literal["auto"] = "auto",
    tokenizer: Literal["ptb", "python"] = "ptb",
) -> dict[str, float | None]:
    """COCO caption metrics of one candidate per key against that key's references.

    Parameters
    ----------
    candidates
        ``{key: caption}`` (an empty caption is allowed and scores 0).
    references
        ``{key: [reference, ...]}`` with the same keys, at least one non-empty reference each.
    spice
        ``"auto"``: SPICE when its backend is available, else ``None``; ``True``: raise when unavailable;
        ``False``: never (``None``).
    meteor
        The same for METEOR (a java process that takes seconds to start: ``False`` for quick checks).
    tokenizer
        ``"ptb"``: pycocoevalcap's Java PTBTokenizer (COCOEvalCap); ``"python"``: :func:`python_ptb_tokenize`.

    Returns
    -------
    dict
        ``BLEU-1..BLEU-4, METEOR, ROUGE-L, CIDEr, SPICE``. BLEU is corpus level and CIDEr's IDF comes from the
        references given, so score the whole test set in one call. ``None``: see :func:`unavailable_metrics`.
    """
    for name, v in (("spice", spice), ("meteor", meteor)):
        if v not in (True, False, "auto"):
            raise ValueError(f"{name} must be True, False or 'auto', got {v!r}")
    _validate(candidates, references)
    if _coco_dir() is None:
        raise ImportError("caption_metrics needs pycocoevalcap (pip install pycocoevalcap)")
    unavailable = unavailable_metrics()
    for name, v in (("SPICE", spice), ("METEOR", meteor)):
        if v is True and name in unavailable:
            raise RuntimeError(f"{name} is unavailable: {unavailable[name]}")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    keys = list(candidates)  # scorers get ids 0..N-1: SPICE round-trips ids through JSON
    tok = tokenize_captions({i: [candidates[k], *references[k]] for i, k in enumerate(keys)}, tokenizer)
    res = {i: tok[i][:1] for i in range(len(keys))}
    gts = {i: tok[i][1:] for i in range(len(keys))}
    out: dict[str, float | None] = dict.fromkeys(METRIC_NAMES)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for n, b in enumerate(bleu, 1):
        out[f"BLEU-{n}"] = float(b)
    if meteor is not False and "METEOR" not in unavailable:
        out["METEOR"] = _meteor(gts, res)
    out["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    if spice is not False and "SPICE" not in unavailable:
        from pycocoevalcap.spice.spice import Spice

        try:
            out["SPICE"] = float(Spice().compute_score(gts, res)[0])
        except subprocess.CalledProcessError as e:
            raise RuntimeError(f"SPICE failed: {e}") from e
    return out


# --------------------------------------------------------------------------------------------- exact match
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation (any Unicode ``P*``) and the articles a/an/the, collapse whitespace."""
    s = "".join(ch for ch in text.lower() if not unicodedata.category(ch).startswith("P"))
    return " ".join(_ARTICLES.sub(" ", s).split())


def exact_match(prediction: str, answer: str) -> bool:
    """Whether ``prediction`` equals ``answer`` after :func:`normalize_answer` (SQuAD's convention)."""
    return normalize_answer(prediction) == normalize_answer(answer)


def exact_match_by_type(rows: Iterable[Mapping[str, str]]) -> dict[str, float]:
    """Exact-match accuracy per question ``type`` (in order of first appearance) and over ``"all"`` rows.

    Each row has ``type``, ``prediction`` and ``answer``.
    """
    hits: dict[str, list[bool]] = {}
    for i, row in enumerate(rows):
        missing = [f for f in ("type", "prediction", "answer") if f not in row]
        if missing:
            raise KeyError(f"row {i} lacks {missing}")
        t = str(row["type"])
        if t == "all":
            raise ValueError(f"row {i}: 'all' is reserved for the overall accuracy, not a type")
        hits.setdefault(t, []).append(exact_match(row["prediction"], row["answer"]))
    if not hits:
        raise ValueError("exact_match_by_type needs at least one row")
    out = {t: sum(h) / len(h) for t, h in hits.items()}
    every = [x for h in hits.values() for x in h]
    out["all"] = sum(every) / len(every)
    return out


# --------------------------------------------------------------------------------------------- CLIP-S
def clip_score(image_emb: torch.Tensor, text_emb: torch.Tensor, w: float = 2.5) -> torch.Tensor:
    """CLIP-S per pair (Hessel et al. 2021): ``w * max(cos(image_i, text_i), 0)``, shape (N,).

    The reported CLIP-S is the mean. Embeddings need not be normalised.
    """
    if image_emb.ndim != 2 or image_emb.shape != text_emb.shape:
        raise ValueError(f"need paired (N, D) embeddings, got {tuple(image_emb.shape)} and "
                         f"{tuple(text_emb.shape)}")
    dtype = torch.promote_types(torch.promote_types(image_emb.dtype, text_emb.dtype), torch.float32)
    a = F.normalize(image_emb.to(dtype), dim=1)
    b = F.normalize(text_emb.to(a.device, dtype), dim=1)
    return w * (a * b).sum(1).clamp(min=0)


def clip_score_from_teacher(
    teacher: Any,
    images_uint8: torch.Tensor,
    captions: Sequence[str],
    w: float = 2.5,
    batch_size: int = 64,
    prefix: str = "A photo depicts ",
) -> float:
    """Mean CLIP-S of ``captions[i]`` for ``images_uint8[i]`` (N, 3, H, W) with a CLIP teacher.

    ``teacher`` has ``encode(uint8 images) -> (N, D)`` and ``encode_text(list[str]) -> (N, D)``, e.g.
    :class:`~neurovision.pretrained.teachers.OpenCLIPImageTeacher`. ``prefix`` is prepended to every caption, as in
    Hessel et al.'s reference code (``"A photo depicts "``); pass ``""`` for raw captions.
    """
    if isinstance(captions, str):
        raise TypeError("captions must be a list of strings, not a single string")
    n = len(captions)
    if n == 0 or images_uint8.ndim != 4 or len(images_uint8) != n:
        raise ValueError(f"need N >= 1 images (N, 3, H, W) and N captions, got images "
                         f"{tuple(images_uint8.shape)} and {n} captions")
    scores = []
    for i in range(0, n, batch_size):
        img = teacher.encode(images_uint8[i:i + batch_size])
        txt = teacher.encode_text([prefix + c for c in captions[i:i + batch_size]])
        scores.append(clip_score(torch.as_tensor(img), torch.as_tensor(txt), w=w).cpu())
    return float(torch.cat(scores).double().mean())


# --------------------------------------------------------------------------------------------- Metric
def _caption_key(row: dict[str, Any]) -> Hashable:
    return json.dumps(row["key"], sort_keys=True) if "key" in row else object()  # no key: never de-padded


class CaptionScores(RowMetric):
    """:func:`caption_metrics` as a torchmetrics ``Metric``: ``update(predictions, references, keys)`` with one
    candidate caption and its list of references per item; ``compute()`` scores every rank's items (gathered
    as text; de-padded by ``keys`` when gathered from several ranks, so give keys under DDP) in one call
    (BLEU is corpus level, CIDEr's IDF comes from all references). ``spice``/``meteor``/``tokenizer`` as in
    :func:`caption_metrics`."""

    def __init__(self, spice: bool | Literal["auto"] = "auto", meteor: bool | Literal["auto"] = "auto",
                 tokenizer: Literal["ptb", "python"] = "ptb", **kwargs: Any) -> None:
        super().__init__(key=_caption_key, **kwargs)
        self.options = {"spice": spice, "meteor": meteor, "tokenizer": tokenizer}

    def update(self, predictions: Sequence[str], references: Sequence[Sequence[str]],  # type: ignore[override]
               keys: Sequence[Hashable] | None = None) -> None:
        if isinstance(predictions, str):
            raise TypeError("predictions must be a list of strings, not a single string")
        if len(predictions) != len(references) or (keys is not None and len(keys) != len(predictions)):
            raise ValueError(f"need as many references{' and keys' if keys is not None else ''} as predictions, got "
                             f"{len(predictions)} predictions, {len(references)} reference lists"
                             + (f", {len(keys)} keys" if keys is not None else ""))
        rows: list[dict[str, Any]] = [{"prediction": p, "references": list(r)}
                                      for p, r in zip(predictions, references, strict=True)]
        if keys is not None:
            for row, k in zip(rows, keys, strict=True):
                row["key"] = k
        super().update(rows)

    def score(self, rows: list[dict[str, Any]]) -> dict[str, float | None]:
        cands = {i: r["prediction"] for i, r in enumerate(rows)}
        refs = {i: r["references"] for i, r in enumerate(rows)}
        return caption_metrics(cands, refs, **self.options)  # type: ignore[arg-type]
