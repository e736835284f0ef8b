"""Procedural scenes for the phantom: shapes x colours x positions x sizes, rendered, and described in words.

Every scene comes with several grammar captions, a detailed description, QA/reasoning pairs, a multi-turn
dialogue, a reconstruction ("Stable Diffusion") prompt, its concept words and object boxes, all derived from
the same scene graph, so language targets are exactly as informative as the image.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from neurovision.data.instructions import POSITIONS

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 180, 70), "blue": (40, 80, 225), "yellow": (235, 210, 40),
}
SIZES: tuple[str, ...] = ("small", "large")
_POS_PHRASE = (
    "in the top left", "at the top", "in the top right", "on the left", "in the center", "on the right",
    "in the bottom left", "at the bottom", "in the bottom right",
)
_SIZE_SYN = {"small": ("small", "little", "small"), "large": ("large", "big", "large")}
_NUM = ("zero", "one", "two", "three", "four")
BACKGROUND = (128, 128, 128)
CONCEPTS: tuple[str, ...] = (*COLOURS, *SHAPES, *SIZES)


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    position: int  # 0..8, row-major over a 3x3 layout
    dx: float = 0.0  # jitter, fraction of the image
    dy: float = 0.0

    @property
    def where(self) -> str:
        return POSITIONS[self.position]

    @property
    def phrase(self) -> str:
        return _POS_PHRASE[self.position]

    @property
    def centre(self) -> tuple[float, float]:
        """(x, y) centre as fractions of the image width/height."""
        row, col = divmod(self.position, 3)
        return (col + 0.5) / 3 + self.dx, (row + 0.5) / 3 + self.dy


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]

    def to_json(self) -> list[dict[str, Any]]:
        return [asdict(o) for o in self.objects]

    @property
    def key(self) -> tuple[tuple[str, str, str, int], ...]:
        """What the words can tell apart: (shape, colour, size, cell) per object, jitter left out."""
        return tuple((o.shape, o.colour, o.size, o.position) for o in self.objects)


def sample_scene(rng: np.random.Generator, max_objects: int = 2) -> Scene:
    n = int(rng.integers(1, max_objects + 1))
    cells = rng.choice(9, size=n, replace=False)
    objs = []
    for cell in cells:
        objs.append(SceneObject(
            shape=SHAPES[rng.integers(len(SHAPES))], colour=list(COLOURS)[rng.integers(len(COLOURS))],
            size=SIZES[rng.integers(len(SIZES))], position=int(cell),
            dx=float(rng.uniform(-0.03, 0.03)), dy=float(rng.uniform(-0.03, 0.03)),
        ))
    return Scene(tuple(sorted(objs, key=lambda o: o.position)))


def sample_distinct(rng: np.random.Generator, n: int, max_objects: int = 2) -> list[Scene]:
    """``n`` scenes no two of which share a :attr:`Scene.key` (a test set of distinct images, like NSD's
    shared1000: otherwise retrieval would have to tell apart scenes that differ only by sub-cell jitter)."""
    out: list[Scene] = []
    seen: set[tuple[tuple[str, str, str, int], ...]] = set()
    for _ in range(100 * n + 1000):
        if len(out) == n:
            return out
        sc = sample_scene(rng, max_objects)
        if sc.key not in seen:
            seen.add(sc.key)
            out.append(sc)
    raise ValueError(f"scenes: cannot draw {n} distinct scenes with at most {max_objects} objects")


# --------------------------------------------------------------------------------------------- rendering
def render(scene: Scene, size: int) -> np.ndarray:
    """uint8 (size, size, 3) image of the scene on a plain grey background."""
    img = np.empty((size, size, 3), np.uint8)
    img[:] = BACKGROUND
    yy, xx = (np.mgrid[0:size, 0:size] + 0.5) / size
    for o in scene.objects:
        cx, cy = o.centre
        r = 0.14 if o.size == "large" else 0.075
        dx, dy = xx - cx, yy - cy
        if o.shape == "circle":
            m = dx**2 + dy**2 <= r**2
        elif o.shape == "square":
            m = (np.abs(dx) <= r * 0.88) & (np.abs(dy) <= r * 0.88)
        elif o.shape == "triangle":
            h = 1.8 * r  # apex up; base at cy + 0.8r
            t = (dy + h / 2) / h
            m = (t >= 0) & (t <= 1) & (np.abs(dx) <= t * r)
        elif o.shape == "cross":
            w = r * 0.35
            m = ((np.abs(dx) <= r) & (np.abs(dy) <= w)) | ((np.abs(dy) <= r) & (np.abs(dx) <= w))
        else:  # pragma: no cover - guarded by SHAPES
            raise ValueError(o.shape)
        img[m] = COLOURS[o.colour]
    return img


def boxes(scene: Scene) -> list[dict[str, Any]]:
    """Object boxes (x0, y0, x1, y1 as image fractions) with their label and concept words."""
    out = []
    for o in scene.objects:
        cx, cy = o.centre
        r = 0.14 if o.size == "large" else 0.075
        out.append({"label": f"{o.size} {o.colour} {o.shape}",
                    "box": [round(cx - r, 4), round(cy - r, 4), round(cx + r, 4), round(cy + r, 4)],
                    "concepts": [o.colour, o.shape, o.size]})
    return out


# --------------------------------------------------------------------------------------------- language
def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def captions(scene: Scene) -> list[str]:
    """Five grammar captions (COCO-like: lower case, no final period)."""
    objs = scene.objects
    n = len(objs)
    c1 = _join([f"a {o.size} {o.colour} {o.shape} {o.phrase}" for o in objs])
    c2 = f"{_NUM[n]} shape{'s' if n > 1 else ''} on a grey background: " + _join(
        [f"a {o.colour} {o.shape} {o.phrase}" for o in objs])
    c3 = "there is " + _join([f"a {_SIZE_SYN[o.size][1]} {o.colour} {o.shape} {o.phrase}" for o in objs])
    c4 = "a picture of " + _join([f"a {o.colour} {o.shape}" for o in objs]) + " on grey"
    c5 = _join([f"{o.phrase} a {o.size} {o.colour} {o.shape}" for o in objs])
    return [c1, c2, c3, c4, c5]


def description(scene: Scene) -> str:
    objs = scene.objects
    n = len(objs)
    s = [f"The image shows {_NUM[n]} object{'s' if n > 1 else ''} on a plain grey background."]
    for o in objs:
        s.append(f"{o.phrase.capitalize()} there is a {o.size} {o.colour} {o.shape}.")
    if n == 2:
        a, b = objs
        s += relations(f"{a.colour} {a.shape}", a.centre, f"{b.colour} {b.shape}", b.centre)
    return " ".join(s)


def relations(a: str, a_centre: tuple[float, float], b: str, b_centre: tuple[float, float]) -> list[str]:
    """'The <a> is above the <b>.' and 'The <a> is to the left of the <b>.' (either way round) where the centres
    (x, y as image fractions) are more than 0.2 apart along that axis."""
    (ax, ay), (bx, by) = a_centre, b_centre
    out = []
    if abs(ay - by) > 0.2:
        upper, lower = (a, b) if ay < by else (b, a)
        out.append(f"The {upper} is above the {lower}.")
    if abs(ax - bx) > 0.2:
        left, right = (a, b) if ax < bx else (b, a)
        out.append(f"The {left} is to the left of the {right}.")
    return out


def qa(scene: Scene) -> list[dict[str, str]]:
    """Question/answer pairs with a ``type``: count, colour, shape, position, size, relation."""
    objs = scene.objects
    n = len(objs)
    out = [{"type": "count", "q": "How many objects are in the image?", "a": _NUM[n]}]
    for o in objs:
        out += [
            {"type": "colour", "q": f"What colour is the {o.shape} {o.phrase}?", "a": o.colour},
            {"type": "shape", "q": f"What shape is the {o.colour} object {o.phrase}?", "a": o.shape},
            {"type": "position", "q": f"Where is the {o.colour} {o.shape}?", "a": o.where},
            {"type": "size", "q": f"Is the {o.colour} {o.shape} small or large?", "a": o.size},
        ]
    if n == 2:
        a, b = objs
        left = a if a.centre[0] <= b.centre[0] else b
        out.append({"type": "relation", "q": f"Which is further left, the {a.colour} {a.shape} or the "
                    f"{b.colour} {b.shape}?", "a": f"the {left.colour} {left.shape}"})
        same = "yes" if a.colour == b.colour else "no"
        out.append({"type": "relation", "q": "Do the two objects have the same colour?", "a": same})
    return out


def dialogue(scene: Scene, rng: np.random.Generator, turns: int = 3) -> list[dict[str, str]]:
    """A multi-turn conversation (LLaVA style: alternating ``human``/``gpt`` turns)."""
    pairs = qa(scene)
    pick = rng.choice(len(pairs), size=min(turns, len(pairs)), replace=False)
    conv: list[dict[str, str]] = []
    for i in sorted(pick):
        conv.append({"from": "human", "value": pairs[i]["q"]})
        conv.append({"from": "gpt", "value": pairs[i]["a"]})
    return conv


def sd_prompt(scene: Scene) -> str:
    body = ", ".join(f"{o.size} {o.colour} {o.shape} {o.where}" for o in scene.objects)
    return f"{body}, flat colours, plain grey background, simple geometric shapes"


def concepts(scene: Scene) -> list[str]:
    """Concept words present in the scene (colours, shapes, sizes), in :data:`CONCEPTS` order."""
    present = {w for o in scene.objects for w in (o.colour, o.shape, o.size)}
    return [c for c in CONCEPTS if c in present]


def presence(scene: Scene) -> np.ndarray:
    """(len(CONCEPTS),) float32: how many objects carry each concept."""
    v = np.zeros(len(CONCEPTS), np.float32)
    for o in scene.objects:
        for w in (o.colour, o.shape, o.size):
            v[CONCEPTS.index(w)] += 1
    return v
