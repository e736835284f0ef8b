"""Instruction data in the LLaVA conversation format: read, validated, merged into a store's annotations;
and written back out of a store (the same format, so it can be edited or regenerated and imported again).

A file is a JSON list of entries::

    {"id" | "image" | "nsd_id" | "coco_id": ..., "type": optional,
     "conversations": [{"from": "human", "value": "<image>\\nWhat is ...?"}, {"from": "gpt", "value": "..."}, ...]}

``nsd_id`` is NSD's 0-based image id; ``coco_id`` a COCO image id; ``image`` a COCO file name
(``000000033471.jpg``, ``COCO_train2014_000000033471.jpg``) and ``id`` a COCO id as LLaVA writes it
(``"000000033471"``); the first of these present names the image. ``<image>`` markers are removed.
Each entry becomes one instruction type: its ``type`` (``description``, ``reasoning``, ``dialogue``,
``sd_prompt``) when given; otherwise more than one question makes a ``dialogue``, a single question that is
one of the detailed-description (or Stable Diffusion prompt) templates a ``description`` (``sd_prompt``), and
any other single question ``reasoning`` (its ``qtype``, default ``imported``, is the exact-match group).
Imported descriptions, SD prompts and dialogues replace the derived ones of their image; imported QA pairs are
added to the derived ones.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neurovision.data.atomic import write_json

ID_FIELDS: tuple[str, ...] = ("nsd_id", "coco_id", "image", "id")
IMPORT_TYPES: tuple[str, ...] = ("description", "reasoning", "dialogue", "sd_prompt")
MAX_LISTED = 20  # problems listed in one error
_IMAGE_TOKEN = re.compile(r"\s*<image>\s*")


class InstructionFileError(ValueError):
    """Problems of an instruction file, one line each (file, entry index, field)."""


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9 ]", "", text.lower()).strip()


def _clean(text: str) -> str:
    return _IMAGE_TOKEN.sub(" ", text).strip()


@dataclass
class Imported:
    """Imported instruction data per store stimulus row."""

    descriptions: dict[int, list[str]] = field(default_factory=dict)
    sd_prompts: dict[int, list[str]] = field(default_factory=dict)
    dialogues: dict[int, list[list[dict[str, str]]]] = field(default_factory=dict)
    qa: dict[int, list[dict[str, str]]] = field(default_factory=dict)
    n_entries: int = 0
    n_skipped: int = 0  # entries naming images that exist but are not in the store (skipped on request)

    @property
    def kinds(self) -> list[str]:
        return [k for k in ("descriptions", "dialogues", "qa", "sd_prompts") if getattr(self, k)]


def _parse_id(name: str, value: Any) -> int:
    """The integer an id field holds (file names: their last run of digits)."""
    if isinstance(value, bool):
        raise ValueError(f"expected an integer id, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        digits = re.findall(r"\d+", Path(value).stem if name == "image" else value)
        if digits and (name == "image" or value.strip().isdigit()):
            return int(digits[-1])
    raise ValueError(f"cannot read an image id from {value!r}")


@functools.cache
def _template_questions() -> tuple[frozenset[str], frozenset[str]]:
    """The normalised detailed-description and SD-prompt template questions (once, not per entry)."""
    from neurovision.data.instructions import DETAILED_TEMPLATES, SD_PROMPT_TEMPLATES

    return frozenset(map(_norm, DETAILED_TEMPLATES)), frozenset(map(_norm, SD_PROMPT_TEMPLATES))


def _infer_type(turns: list[dict[str, str]]) -> str:
    if sum(t["from"] == "human" for t in turns) > 1:
        return "dialogue"
    q = _norm(turns[0]["value"])
    detailed, sd = _template_questions()
    return "description" if q in detailed else "sd_prompt" if q in sd else "reasoning"


def _check_turns(conv: Any) -> tuple[str, str] | list[dict[str, str]]:
    """The cleaned turns, or (field, problem)."""
    if not isinstance(conv, list) or not conv:
        return "conversations", "expected a non-empty list of turns"
    out = []
    for j, t in enumerate(conv):
        if not isinstance(t, dict):
            return f"conversations[{j}]", f"expected an object with 'from' and 'value', got {type(t).__name__}"
        want = "human" if j % 2 == 0 else "gpt"
        if t.get("from") != want:
            return f"conversations[{j}].from", f"expected {want!r} (turns alternate, human first), got {t.get('from')!r}"
        v = t.get("value")
        if not isinstance(v, str) or not _clean(v):
            return f"conversations[{j}].value", "expected non-empty text"
        out.append({"from": want, "value": _clean(v)})
    if len(out) % 2:
        return f"conversations[{len(out) - 1}]", "the conversation ends with a human turn (no answer)"
    return out


def read_instructions(path: str | Path, resolve: Callable[[str, int], int | None], *,
                      skip_unmatched: bool = False) -> Imported:
    """Read and validate a LLaVA-format file; ``resolve(field, id)`` gives the store row of an image, None for an
    image that exists but is not in the store (skipped), and raises KeyError for an id that names no image
    (an error unless ``skip_unmatched``). Every problem is one line of the :class:`InstructionFileError`."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: field 'instructions': file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InstructionFileError(f"{path}: field '<file>': not a readable JSON file: {err}") from err
    if not isinstance(doc, list):
        raise InstructionFileError(f"{path}: field '<file>': expected a JSON list of entries, got {type(doc).__name__}")
    out = Imported(n_entries=len(doc))
    problems: list[str] = []

    def bad(i: int, fld: str, problem: str) -> None:
        problems.append(f"{path}: entry {i}: field '{fld}': {problem}")

    for i, e in enumerate(doc):
        if not isinstance(e, dict):
            bad(i, "<entry>", f"expected an object, got {type(e).__name__}")
            continue
        name = next((k for k in ID_FIELDS if k in e), None)
        if name is None:
            bad(i, "id", f"no image id (one of {list(ID_FIELDS)})")
            continue
        try:
            ident = _parse_id(name, e[name])
        except ValueError as err:
            bad(i, name, str(err))
            continue
        turns = _check_turns(e.get("conversations"))
        if isinstance(turns, tuple):
            bad(i, *turns)
            continue
        kind = e.get("type")
        if kind is not None and kind not in IMPORT_TYPES:
            bad(i, "type", f"{kind!r} is not one of {list(IMPORT_TYPES)}")
            continue
        kind = kind or _infer_type(turns)
        if kind != "dialogue" and len(turns) != 2:
            bad(i, "conversations", f"type {kind!r} takes one question and one answer, got {len(turns) // 2} rounds")
            continue
        try:
            row = resolve(name, ident)
        except KeyError as err:
            if skip_unmatched:
                out.n_skipped += 1
            else:
                bad(i, name, f"unknown id {e[name]!r}: {err.args[0] if err.args else 'no such image'}")
            continue
        if row is None:
            out.n_skipped += 1
            continue
        q, a = turns[0]["value"], turns[-1]["value"]
        if kind == "description":
            out.descriptions.setdefault(row, []).append(a)
        elif kind == "sd_prompt":
            out.sd_prompts.setdefault(row, []).append(a)
        elif kind == "dialogue":
            out.dialogues.setdefault(row, []).append(turns)
        else:
            qtype = e.get("qtype", "imported")
            if not isinstance(qtype, str) or not qtype:
                bad(i, "qtype", f"expected a non-empty string, got {qtype!r}")
                continue
            out.qa.setdefault(row, []).append({"type": qtype, "q": q, "a": a})
    if problems:
        more = f"\n... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise InstructionFileError(f"{len(problems)} problem(s) in {path}:\n" + "\n".join(problems[:MAX_LISTED]) + more)
    return out


def _one_or_list(values: list[Any]) -> Any:
    return values[0] if len(values) == 1 else values


def merge(annotations: dict[str, list[Any]], imported: Imported, n_stimuli: int) -> dict[str, list[Any]]:
    """``annotations`` (kind -> one value per stimulus, possibly missing kinds) with the imported data merged in:
    descriptions, SD prompts and dialogues replace the derived ones of their stimulus, QA pairs are added.
    A kind only imported gets an empty value (``""`` / ``[]``) for the stimuli the file does not cover."""
    out = {k: list(v) for k, v in annotations.items()}
    for kind, empty in (("descriptions", ""), ("sd_prompts", ""), ("dialogues", [])):
        got = getattr(imported, kind)
        if not got:
            continue
        col = out.setdefault(kind, [empty] * n_stimuli)
        for row, values in got.items():
            col[row] = _one_or_list(values)
    if imported.qa:
        col = out.setdefault("qa", [[] for _ in range(n_stimuli)])
        for row, pairs in imported.qa.items():
            col[row] = [*col[row], *pairs]
    return out


def export_instructions(store: Any, out: str | Path, types: Sequence[str] = IMPORT_TYPES) -> Path:
    """Write a store's instruction data (``descriptions``, ``qa``, ``dialogues``, ``sd_prompts``) as a LLaVA-format
    file with ``nsd_id`` (the store's stimulus ids), ``coco_id`` (when the store has them) and ``type``."""
    from neurovision.data.instructions import DETAILED_TEMPLATES, SD_PROMPT_TEMPLATES, as_list

    ids = [int(i) for i in store.stimulus_ids]
    coco = [int(c) for c in store.extra("coco_ids")] if "coco_ids" in store.extras else None
    entries: list[dict[str, Any]] = []

    def entry(row: int, kind: str, turns: list[dict[str, str]], **extra: Any) -> None:
        first = {"from": "human", "value": "<image>\n" + turns[0]["value"]}
        e: dict[str, Any] = {"nsd_id": ids[row]}
        if coco is not None:
            e["coco_id"] = coco[row]
        entries.append({**e, "type": kind, **extra, "conversations": [first, *turns[1:]]})

    kinds = {"description": "descriptions", "reasoning": "qa", "dialogue": "dialogues", "sd_prompt": "sd_prompts"}
    for t in types:
        if t not in kinds:
            raise ValueError(f"cannot export instruction type {t!r}; choose from {list(kinds)}")
        if kinds[t] not in store.annotation_kinds:
            continue
        for row, value in enumerate(store.annotations(kinds[t])):
            if t == "reasoning":
                for p in value:
                    entry(row, t, [{"from": "human", "value": p["q"]}, {"from": "gpt", "value": p["a"]}],
                          qtype=p["type"])
                continue
            for v in as_list(value):
                if t == "dialogue":
                    entry(row, t, v)
                else:
                    q = DETAILED_TEMPLATES[0] if t == "description" else SD_PROMPT_TEMPLATES[0]
                    entry(row, t, [{"from": "human", "value": q}, {"from": "gpt", "value": v}])
    write_json(out, entries)
    return Path(out)


__all__ = ["IMPORT_TYPES", "Imported", "InstructionFileError", "export_instructions", "merge",
           "read_instructions"]
