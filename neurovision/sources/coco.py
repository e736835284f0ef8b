"""COCO object annotations -> the instruction annotations of an NSD stimulus.

NSD shows each COCO image cropped to a square (``cropBox`` in ``nsd_stim_info_merged.csv``: the fractions cut
from the top, bottom, left and right) and resized to 425x425. Every COCO instance box is mapped through that
crop into the shown square; an object keeps when at least :data:`MIN_VISIBLE` of its box stays inside and the
visible box covers at least :data:`MIN_AREA` of the square (smaller ones are a few pixels on the screen). What
is left per stimulus (category, box, size word, 3x3 cell) becomes the annotation kinds the phantom has:

- ``boxes``: ``{"label", "box": [x0, y0, x1, y1] (fractions of the shown square), "concepts": [category]}``;
- ``concepts``: the categories present, in COCO category order (the concept words of localisation);
- ``qa``: questions answerable from the boxes, each with a ``type``: ``count``, ``presence``, ``position``,
  ``size``, ``relation``, ``cooccurrence``, ``category`` (short answers, so exact match per type works);
- ``dialogues``: three of those QA pairs as a LLaVA-style conversation;
- ``descriptions`` and ``sd_prompts``: templated text (the first COCO caption, then the objects with their
  number, place and size), not language-model text.

The paper generated its descriptions and dialogues with a language model from captions and boxes; such data
can be imported in the LLaVA format (:mod:`neurovision.sources.llava`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from neurovision.data.instructions import POSITIONS, cell_of
from neurovision.data.store import StoreError
from neurovision.sources.scenes import relations

MIN_VISIBLE = 0.5  # fraction of an object's box that must stay inside the crop
MIN_AREA = 0.005  # visible box area / shown square area below which an object is dropped
SMALL, LARGE = 0.04, 0.25  # box area fractions: < SMALL small, >= LARGE large, else medium
MAX_COUNT_QUESTIONS = 3
MAX_OBJECT_QUESTIONS = 3  # position + size questions for the largest single-instance categories
_POS_PHRASE = ("in the top left", "at the top", "in the top right", "on the left", "in the center", "on the right",
               "in the bottom left", "at the bottom", "in the bottom right")
_NUM = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_PLURAL = {"person": "people", "mouse": "mice", "knife": "knives", "sheep": "sheep", "skis": "skis",
           "scissors": "scissors", "skateboard": "skateboards"}


# --------------------------------------------------------------------------------------------- words
def plural(name: str) -> str:
    head, _, last = name.rpartition(" ")
    if last in _PLURAL:
        p = _PLURAL[last]
    elif re.search(r"(s|sh|ch|x|z)$", last):
        p = last + "es"
    elif re.search(r"[^aeiou]y$", last):
        p = last[:-1] + "ies"
    else:
        p = last + "s"
    return f"{head} {p}" if head else p


def article(name: str) -> str:
    return ("an " if name[:1] in "aeiou" else "a ") + name


def number(n: int) -> str:
    return _NUM[n] if n < len(_NUM) else str(n)


def counted(name: str, n: int) -> str:
    """'a dog', 'two people', '12 cars'."""
    return article(name) if n == 1 else f"{number(n)} {plural(name)}"


def join(parts: Sequence[str]) -> str:
    parts = list(parts)
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def size_of(box: Sequence[float]) -> str:
    a = (box[2] - box[0]) * (box[3] - box[1])
    return "small" if a < SMALL else "large" if a >= LARGE else "medium"


# --------------------------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class CocoObject:
    """One COCO instance as seen in the NSD square: box ``(x0, y0, x1, y1)`` as fractions of the square."""

    category: str
    box: tuple[float, float, float, float]
    crowd: bool = False

    @property
    def area(self) -> float:
        return (self.box[2] - self.box[0]) * (self.box[3] - self.box[1])

    @property
    def cell(self) -> int:
        return cell_of(self.box)

    @property
    def size(self) -> str:
        return size_of(self.box)

    @property
    def centre(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2


def parse_crop_box(text: Any, path: Path, nsd_id: int) -> tuple[float, float, float, float]:
    """``"(top, bottom, left, right)"`` (fractions cut from each side) -> 4 floats, checked."""
    try:
        vals = tuple(float(v) for v in re.findall(r"[-+0-9.eE]+", str(text)))
    except ValueError:
        vals = ()
    if len(vals) != 4 or not all(0 <= v < 1 for v in vals) or vals[0] + vals[1] >= 1 or vals[2] + vals[3] >= 1:
        raise StoreError(path, "cropBox", f"nsdId {nsd_id}: expected '(top, bottom, left, right)' fractions "
                         f"in [0, 1) leaving a non-empty image, got {text!r}")
    return vals


def crop_object(bbox: Sequence[float], width: float, height: float, crop: Sequence[float]
                ) -> tuple[float, float, float, float] | None:
    """A COCO box ``[x, y, w, h]`` (pixels of the ``width`` x ``height`` image) in the cropped square, as
    fractions; None when less than :data:`MIN_VISIBLE` of it or less than :data:`MIN_AREA` of the square
    stays visible."""
    top, bottom, left, right = crop
    cx0, cx1 = left * width, (1 - right) * width
    cy0, cy1 = top * height, (1 - bottom) * height
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        return None
    vx0, vy0, vx1, vy1 = max(x, cx0), max(y, cy0), min(x + w, cx1), min(y + h, cy1)
    if vx1 <= vx0 or vy1 <= vy0 or (vx1 - vx0) * (vy1 - vy0) < MIN_VISIBLE * w * h:
        return None
    cw, ch = cx1 - cx0, cy1 - cy0
    box = ((vx0 - cx0) / cw, (vy0 - cy0) / ch, (vx1 - cx0) / cw, (vy1 - cy0) / ch)
    if (box[2] - box[0]) * (box[3] - box[1]) < MIN_AREA:
        return None
    return tuple(round(v, 4) for v in box)  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------- reading
@dataclass
class Instances:
    """What the instances files say about the wanted images."""

    categories: list[str]  # every COCO category name, in category-id order (the concept vocabulary)
    images: dict[int, tuple[int, int]]  # coco id -> (width, height)
    objects: dict[int, list[tuple[str, list[float], bool]]]  # coco id -> (category, bbox xywh, iscrowd)


def load_instances(paths: Sequence[Path], coco_ids: Sequence[int]) -> Instances:
    """Read COCO ``instances_*.json`` files, keeping the images in ``coco_ids`` (one clear error per bad file)."""
    wanted = {int(c) for c in coco_ids}
    cats: dict[int, str] = {}
    images: dict[int, tuple[int, int]] = {}
    objects: dict[int, list[tuple[str, list[float], bool]]] = {}
    for p in paths:
        try:
            doc = json.loads(Path(p).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise StoreError(p, "<file>", f"not a readable COCO instances JSON file: {e}") from e
        for key in ("images", "annotations", "categories"):
            if not isinstance(doc, dict) or not isinstance(doc.get(key), list):
                raise StoreError(p, key, "missing or not a list (not a COCO instances file)")
        try:
            for c in doc["categories"]:
                cats[int(c["id"])] = str(c["name"])
            for im in doc["images"]:
                if int(im["id"]) in wanted:
                    images[int(im["id"])] = (int(im["width"]), int(im["height"]))
            pending = []
            for i, a in enumerate(doc["annotations"]):
                if int(a["image_id"]) in wanted:
                    bbox = [float(v) for v in a["bbox"]]
                    if len(bbox) != 4:
                        raise ValueError(f"annotations[{i}].bbox has {len(bbox)} numbers, expected 4")
                    pending.append((int(a["image_id"]), int(a["category_id"]), bbox, bool(a.get("iscrowd", 0))))
        except (KeyError, TypeError, ValueError) as e:
            raise StoreError(p, "annotations", f"malformed COCO entry: {e!r}") from e
        for img, cat, bbox, crowd in pending:
            if cat not in cats:
                raise StoreError(p, "annotations", f"category_id {cat} (image {img}) not in 'categories'")
            objects.setdefault(img, []).append((cats[cat], bbox, crowd))
    return Instances([cats[k] for k in sorted(cats)], images, objects)


def objects_in_view(inst: Instances, coco_id: int, crop: Sequence[float]) -> list[CocoObject]:
    """The objects of one COCO image that stay visible in the NSD square, ordered by cell then area (largest
    first)."""
    if coco_id not in inst.images:
        return []
    w, h = inst.images[coco_id]
    out = []
    for cat, bbox, crowd in inst.objects.get(coco_id, []):
        box = crop_object(bbox, w, h, crop)
        if box is not None:
            out.append(CocoObject(cat, box, crowd))
    return sorted(out, key=lambda o: (o.cell, -o.area, o.category))


# --------------------------------------------------------------------------------------------- annotations
def _by_category(objs: Sequence[CocoObject], vocabulary: Sequence[str]) -> list[tuple[str, list[CocoObject]]]:
    order = {c: i for i, c in enumerate(vocabulary)}
    groups: dict[str, list[CocoObject]] = {}
    for o in objs:
        groups.setdefault(o.category, []).append(o)
    return sorted(groups.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0]))


def _count_known(group: Sequence[CocoObject]) -> bool:
    """A crowd region hides how many there are."""
    return not any(o.crowd for o in group)


def boxes(objs: Sequence[CocoObject]) -> list[dict[str, Any]]:
    return [{"label": o.category, "box": list(o.box), "concepts": [o.category]} for o in objs]


def concepts(objs: Sequence[CocoObject], vocabulary: Sequence[str]) -> list[str]:
    return [c for c, _ in _by_category(objs, vocabulary)]


def inventory(objs: Sequence[CocoObject], vocabulary: Sequence[str]) -> str:
    """'two people, a dog and some kites' (crowd regions: 'some')."""
    parts = [counted(c, len(g)) if _count_known(g) else f"some {plural(c)}" for c, g in _by_category(objs, vocabulary)]
    return join(parts) if parts else ""


def _singles(objs: Sequence[CocoObject], vocabulary: Sequence[str]) -> list[CocoObject]:
    """The objects whose category occurs once (so 'the <category>' names one thing), largest first."""
    return sorted((g[0] for c, g in _by_category(objs, vocabulary) if len(g) == 1 and not g[0].crowd),
                  key=lambda o: (-o.area, o.category))


def _sentence(text: str) -> str:
    t = text.strip().rstrip(".")
    return (t[:1].upper() + t[1:] + ".") if t else ""


def description(objs: Sequence[CocoObject], captions: Sequence[str], vocabulary: Sequence[str]) -> str:
    """Templated detailed description: the first caption, the inventory, where each object is, relations."""
    s = [_sentence(captions[0])] if captions else []
    if not objs:
        s.append("No annotated objects are visible.")
        return " ".join(s)
    s.append(f"The image shows {inventory(objs, vocabulary)}.")
    for cat, g in _by_category(objs, vocabulary):
        if len(g) == 1:
            o = g[0]
            s.append(f"The {cat} is {_POS_PHRASE[o.cell]} and {o.size}.")
        elif _count_known(g):
            cells = join(sorted({_POS_PHRASE[o.cell] for o in g}, key=_POS_PHRASE.index))
            s.append(f"The {plural(cat)} are {cells}.")
    singles = _singles(objs, vocabulary)
    if len(singles) >= 2:
        a, b = singles[0], singles[1]
        s += relations(a.category, a.centre, b.category, b.centre)
    return " ".join(s)


def sd_prompt(objs: Sequence[CocoObject], captions: Sequence[str], vocabulary: Sequence[str]) -> str:
    head = captions[0].strip().rstrip(".") if captions else "a photograph"
    inv = inventory(objs, vocabulary)
    return f"{head}, {inv}, photograph, natural light, detailed" if inv else f"{head}, photograph, natural light, detailed"


def qa(objs: Sequence[CocoObject], vocabulary: Sequence[str], rng: np.random.Generator) -> list[dict[str, str]]:
    """Question/answer pairs answerable from the visible objects, each with a ``type``."""
    groups = _by_category(objs, vocabulary)
    present = [c for c, _ in groups]
    absent = [c for c in vocabulary if c not in present]
    out: list[dict[str, str]] = []
    counts = [(c, g) for c, g in groups if _count_known(g)]
    counts.sort(key=lambda cg: (-len(cg[1]), -max(o.area for o in cg[1]), cg[0]))
    for c, g in counts[:MAX_COUNT_QUESTIONS]:
        out.append({"type": "count", "q": f"How many {plural(c)} are in the image?", "a": number(len(g))})
    if present:
        c = present[int(rng.integers(len(present)))]
        out.append({"type": "presence", "q": f"Is there {article(c)} in the image?", "a": "yes"})
    if absent:
        c = absent[int(rng.integers(len(absent)))]
        out.append({"type": "presence", "q": f"Is there {article(c)} in the image?", "a": "no"})
    singles = _singles(objs, vocabulary)
    for o in singles[:MAX_OBJECT_QUESTIONS]:
        out.append({"type": "position", "q": f"Where is the {o.category} in the image?", "a": POSITIONS[o.cell]})
        out.append({"type": "size", "q": f"Is the {o.category} small, medium or large in the image?", "a": o.size})
    if len(singles) >= 2:
        a, b = singles[0], singles[1]
        if abs(a.centre[0] - b.centre[0]) > 0.2:
            left = a if a.centre[0] < b.centre[0] else b
            out.append({"type": "relation", "q": f"Which is further left, the {a.category} or the {b.category}?",
                        "a": f"the {left.category}"})
        if abs(a.centre[1] - b.centre[1]) > 0.2:
            out.append({"type": "relation", "q": f"Is the {a.category} above or below the {b.category}?",
                        "a": "above" if a.centre[1] < b.centre[1] else "below"})
    if present and len(vocabulary) > 1:  # half the time another present category, else any other one
        c, g = groups[0]
        others = [x for x in vocabulary if x != c]
        d = present[1] if len(present) > 1 and rng.random() < 0.5 else others[int(rng.integers(len(others)))]
        the = plural(c) if len(g) > 1 else c
        out.append({"type": "cooccurrence", "q": f"Is there {article(d)} together with the {the}?",
                    "a": "yes" if d in present else "no"})
    if objs:
        big = max(objs, key=lambda o: (o.area, o.category))
        out.append({"type": "category", "q": "What is the largest object in the image?", "a": big.category})
    return out


def dialogue(pairs: Sequence[dict[str, str]], rng: np.random.Generator, turns: int = 3) -> list[dict[str, str]]:
    """A multi-turn conversation (LLaVA style: alternating ``human``/``gpt`` turns) from QA pairs."""
    pick = sorted(rng.choice(len(pairs), size=min(turns, len(pairs)), replace=False).tolist()) if pairs else []
    conv: list[dict[str, str]] = []
    for i in pick:
        conv += [{"from": "human", "value": pairs[i]["q"]}, {"from": "gpt", "value": pairs[i]["a"]}]
    return conv


def annotate(objs: Sequence[CocoObject], captions: Sequence[str], vocabulary: Sequence[str],
             rng: np.random.Generator) -> dict[str, Any]:
    """Every derived annotation kind of one stimulus."""
    pairs = qa(objs, vocabulary, rng)
    return {"boxes": boxes(objs), "concepts": concepts(objs, vocabulary),
            "descriptions": description(objs, captions, vocabulary), "qa": pairs, "dialogues": dialogue(pairs, rng),
            "sd_prompts": sd_prompt(objs, captions, vocabulary)}


DERIVED_KINDS: tuple[str, ...] = ("boxes", "concepts", "descriptions", "dialogues", "qa", "sd_prompts")


__all__ = ["DERIVED_KINDS", "CocoObject", "Instances", "annotate", "cell_of", "crop_object", "load_instances",
           "objects_in_view", "parse_crop_box", "size_of"]
