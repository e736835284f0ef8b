"""Instruction data for stage 2: chat-formatted samples built from a store's annotations.

One generator per instruction type of Shen et al. (NeurIPS 2024): brief caption, detailed description, complex
reasoning (QA), multi-round dialogue, reconstruction prompt and concept localisation. Every sample is a list of
chat messages (``{"role": "user" | "assistant", "content": str}``) whose first user message carries the
``<fmri>`` placeholder where the fMRI tokens are spliced in. :func:`encode_chat` renders a sample with the
tokenizer's own chat template and labels only the assistant tokens, so the loss is on answers only.

The template banks paraphrase LLaVA's (the paper used 14 brief and 20 detailed templates).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

FMRI_TOKEN = "<fmri>"
IGNORE_INDEX = -100

InstructionType = Literal["caption", "description", "reasoning", "dialogue", "sd_prompt", "concept"]
INSTRUCTION_TYPES: tuple[str, ...] = ("caption", "description", "reasoning", "dialogue", "sd_prompt", "concept")

BRIEF_TEMPLATES: tuple[str, ...] = (
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Offer a succinct explanation of the picture presented.",
    "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.",
    "Share a concise interpretation of the image provided.",
    "Present a compact description of the photo's key features.",
    "Relay a brief, clear account of the picture shown.",
    "Render a clear and concise summary of the photo.",
    "Write a terse but informative summary of the picture.",
    "Create a compact narrative representing the image presented.",
    "What is in the image? Answer in one sentence.",
    "Caption the image.",
    "Write a short caption for what the subject saw.",
)
DETAILED_TEMPLATES: tuple[str, ...] = (
    "Describe the following image in detail.",
    "Provide a detailed description of the given image.",
    "Give an elaborate explanation of the image you see.",
    "Share a comprehensive rundown of the presented image.",
    "Offer a thorough analysis of the image.",
    "Explain the various aspects of the image before you.",
    "Clarify the contents of the displayed image with great detail.",
    "Characterize the image using a well-detailed description.",
    "Break down the elements of the image in a detailed manner.",
    "Walk through the important details of the image.",
    "Portray the image with a rich, descriptive narrative.",
    "Narrate the contents of the image with precision.",
    "Analyze the image in a comprehensive and detailed manner.",
    "Illustrate the image through a descriptive explanation.",
    "Examine the image closely and share its details.",
    "Write an exhaustive depiction of the given image.",
    "Describe everything the subject saw, object by object.",
    "List the objects in the image with their colours, sizes and places.",
    "What does the image show? Be thorough.",
    "Give a complete account of the scene in the image.",
)
SD_PROMPT_TEMPLATES: tuple[str, ...] = (
    "Write a Stable Diffusion prompt that would reproduce the image.",
    "Give a text-to-image prompt for this picture.",
    "Write a prompt a diffusion model could use to redraw the image.",
)
CONCEPT_TEMPLATES: tuple[str, ...] = ("Locate the concept of {concept}.",)


@dataclass
class Sample:
    """One instruction sample: its type, chat messages and (for scoring) what its answers are."""

    type: str
    messages: list[dict[str, str]]
    meta: dict[str, Any] = field(default_factory=dict)


def _with_fmri(text: str) -> str:
    return f"{FMRI_TOKEN}\n{text}"


def _chat(question: str, answer: str | None) -> list[dict[str, str]]:
    msgs = [{"role": "user", "content": _with_fmri(question)}]
    if answer is not None:
        msgs.append({"role": "assistant", "content": answer})
    return msgs


def as_list(value: Any) -> list[Any]:
    """An annotation that holds one text (or one conversation) or several (imported data), as a list."""
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, list) and value and isinstance(value[0], dict):  # one conversation
        return [value]
    return list(value or [])


def _pick(values: Sequence[Any], rng: np.random.Generator) -> Any:
    return values[int(rng.integers(len(values)))]


def caption(ann: Mapping[str, Any], rng: np.random.Generator, answer: bool = True) -> Sample:
    caps = ann["captions"]
    q = BRIEF_TEMPLATES[int(rng.integers(len(BRIEF_TEMPLATES)))]
    a = caps[int(rng.integers(len(caps)))]
    return Sample("caption", _chat(q, a if answer else None), {"references": list(caps)})


def description(ann: Mapping[str, Any], rng: np.random.Generator, answer: bool = True) -> Sample:
    q = DETAILED_TEMPLATES[int(rng.integers(len(DETAILED_TEMPLATES)))]
    refs = as_list(ann["descriptions"])
    return Sample("description", _chat(q, _pick(refs, rng) if answer else None), {"references": refs})


def reasoning(ann: Mapping[str, Any], rng: np.random.Generator, answer: bool = True) -> Sample:
    pairs = ann["qa"]
    p = pairs[int(rng.integers(len(pairs)))]
    return Sample("reasoning", _chat(p["q"], p["a"] if answer else None), {"answer": p["a"], "qtype": p["type"]})


def dialogue(ann: Mapping[str, Any], rng: np.random.Generator, answer: bool = True) -> Sample:
    convs = as_list(ann["dialogues"])
    turns = _pick(convs, rng) if convs else []
    msgs: list[dict[str, str]] = []
    for i, t in enumerate(turns):
        role = "user" if t["from"] == "human" else "assistant"
        text = _with_fmri(t["value"]) if i == 0 else t["value"]
        msgs.append({"role": role, "content": text})
    if not answer and msgs and msgs[-1]["role"] == "assistant":
        msgs = msgs[:-1]
    return Sample("dialogue", msgs, {"answer": turns[-1]["value"] if turns else ""})


def sd_prompt(ann: Mapping[str, Any], rng: np.random.Generator, answer: bool = True) -> Sample:
    q = SD_PROMPT_TEMPLATES[int(rng.integers(len(SD_PROMPT_TEMPLATES)))]
    refs = as_list(ann["sd_prompts"])
    return Sample("sd_prompt", _chat(q, _pick(refs, rng) if answer else None), {"references": refs})


# the 3x3 cells of an image, row-major from the top left: the words of every position question and concept answer
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right",
)


def cell_of(box: Sequence[float]) -> int:
    """The 3x3 cell (row-major, 0 = top left) holding the centre of ``box`` (x0, y0, x1, y1 in [0, 1])."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return min(2, max(0, int(cy * 3))) * 3 + min(2, max(0, int(cx * 3)))


def _where(box: Sequence[float]) -> str:
    return POSITIONS[cell_of(box)]


def concept_answer(boxes: Sequence[Mapping[str, Any]], concept: str) -> str:
    """Where a concept word occurs in an image (its ``boxes`` annotation: ``label``, ``box``, ``concepts``), in
    words: the 3x3 cell of each box carrying the concept, with the box's label; or that it is absent."""
    hits = [b for b in boxes if concept in b["concepts"]]
    if not hits:
        return f"There is no {concept} in the image."
    return "The concept of {} is at the {}.".format(concept, " and at the ".join(
        f"{_where(b['box'])} ({b['label']})" for b in hits))


def concept(ann: Mapping[str, Any], rng: np.random.Generator, answer: bool = True,
            vocabulary: Sequence[str] | None = None) -> Sample:
    """"Locate the concept of <x>": half the time a concept of the image, otherwise any word of the store's
    concept vocabulary (``vocabulary``; the image's own concepts when none is given)."""
    present = list(ann["concepts"])
    vocab = list(vocabulary or present)
    word = present[int(rng.integers(len(present)))] if present and (rng.random() < 0.5 or not vocab) \
        else vocab[int(rng.integers(len(vocab)))] if vocab else ""
    q = CONCEPT_TEMPLATES[int(rng.integers(len(CONCEPT_TEMPLATES)))].format(concept=word)
    a = concept_answer(ann["boxes"], word)
    return Sample("concept", _chat(q, a if answer else None), {"concept": word, "answer": a})


GENERATORS: dict[str, Callable[..., Sample]] = {
    "caption": caption, "description": description, "reasoning": reasoning, "dialogue": dialogue,
    "sd_prompt": sd_prompt, "concept": concept,
}
# the annotation kinds each generator reads
NEEDS: dict[str, tuple[str, ...]] = {
    "caption": ("captions",), "description": ("descriptions",), "reasoning": ("qa",), "dialogue": ("dialogues",),
    "sd_prompt": ("sd_prompts",), "concept": ("concepts", "boxes"),
}
MAX_EVAL_CONCEPTS = 12  # concept prompts per evaluated image; a larger vocabulary is subsampled (see eval_samples)


def concept_vocabulary(store: Any) -> list[str]:
    """The store's concept words: ``extras/concept_names`` (the phantom's words, COCO's categories on NSD), else
    every word of the ``concepts`` annotations, else none."""
    if "concept_names" in store.extras:
        return [n.decode() if isinstance(n, bytes) else str(n) for n in store.extra("concept_names")]
    if "concepts" in store.annotation_kinds:
        return sorted({w for ws in store.annotations("concepts") for w in ws})
    return []


def eval_concepts(present: Sequence[str], vocabulary: Sequence[str], key: int) -> list[str]:
    """The concept words one image is evaluated on: the whole vocabulary when it has at most
    :data:`MAX_EVAL_CONCEPTS` words; otherwise up to half of that from the image's concepts and the rest drawn
    from the words it lacks, by a generator seeded with ``key`` (the stimulus), so every run asks the same."""
    vocab = list(vocabulary) or list(present)
    if len(vocab) <= MAX_EVAL_CONCEPTS:
        return vocab
    rng = np.random.default_rng((int(key), 7))
    have = [w for w in vocab if w in present]
    have = [have[i] for i in sorted(rng.choice(len(have), min(len(have), MAX_EVAL_CONCEPTS // 2), replace=False))]
    lack = [w for w in vocab if w not in present]
    lack = [lack[i] for i in sorted(rng.choice(len(lack), min(len(lack), MAX_EVAL_CONCEPTS - len(have)),
                                               replace=False))]
    return [w for w in vocab if w in have or w in lack]


def eval_samples(ann: Mapping[str, Any], types: Sequence[str], vocabulary: Sequence[str] = (),
                 key: int = 0) -> list[Sample]:
    """The deterministic evaluation prompts of one image (``key``: its stimulus index): the first template of each
    type, every QA pair, and the concept words of :func:`eval_concepts` for ``concept``; each sample ends with its
    reference answer (the first one where there are several)."""
    out: list[Sample] = []
    for t in types:
        if t == "caption":
            q, refs = BRIEF_TEMPLATES[0], list(ann["captions"])
            if refs:
                out.append(Sample(t, _chat(q, refs[0]), {"question": q, "references": refs}))
        elif t in ("description", "sd_prompt"):
            q = DETAILED_TEMPLATES[0] if t == "description" else SD_PROMPT_TEMPLATES[0]
            refs = as_list(ann["descriptions" if t == "description" else "sd_prompts"])
            if refs:
                out.append(Sample(t, _chat(q, refs[0]), {"question": q, "references": refs}))
        elif t == "reasoning":
            for p in ann["qa"]:
                out.append(Sample(t, _chat(p["q"], p["a"]), {"question": p["q"], "answer": p["a"], "qtype": p["type"]}))
        elif t == "concept":
            for c in eval_concepts(ann["concepts"], vocabulary, key):
                q = CONCEPT_TEMPLATES[0].format(concept=c)
                a = concept_answer(ann["boxes"], c)
                out.append(Sample(t, _chat(q, a), {"question": q, "answer": a, "qtype": "concept", "concept": c}))
        else:
            raise ValueError(f"evaluation type {t!r} unknown (YAML key data.init_args.eval_tasks)")
    return out


def needed_annotations(types: Sequence[str]) -> list[str]:
    """The annotation kinds the generators of ``types`` read."""
    return sorted({k for t in types for k in NEEDS[t]})


def check_types(types: Sequence[str], annotation_kinds: Sequence[str], source: str) -> None:
    """Raise one clear error if a type is unknown or the store lacks the annotations it needs."""
    for t in types:
        if t not in GENERATORS:
            raise ValueError(f"instruction type {t!r} unknown (YAML key data.init_args.tasks); "
                             f"choose from {list(GENERATORS)}")
        missing = [k for k in NEEDS[t] if k not in annotation_kinds]
        if missing:
            raise ValueError(f"{source}: field 'annotations/{missing[0]}': missing, needed by instruction type "
                             f"{t!r}; available: {list(annotation_kinds)} (an NSD store has them when converted "
                             "with COCO's instances files or --instructions; to train captions only add -c "
                             "experiments/presets/stage2_instruct_captions_only.yaml)")


# ------------------------------------------------------------------------------------------ tokenisation
def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def chat_pieces(tokenizer: Any, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
    """Split a rendered conversation into (text, is_answer) pieces using the tokenizer's chat template.

    The answer of assistant turn i is what rendering ``messages[:i+1]`` adds to rendering ``messages[:i]`` with
    the generation prompt; the template must render conversations prefix-consistently (LLaMA-3, Vicuna and
    ChatML templates do), otherwise a ValueError says so.
    """
    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], generation_prompt=True)
        full = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ValueError("the tokenizer's chat template does not render conversations prefix-consistently; "
                             "answer-only labels cannot be derived from it")
        pieces.append((prompt[len(done):], False))
        pieces.append((full[len(prompt):], True))
        done = full
    rest = _render(tokenizer, messages, generation_prompt=False)[len(done):] if done else \
        _render(tokenizer, messages, generation_prompt=True)
    if rest:
        pieces.append((rest, False))
    return pieces


def encode_chat(tokenizer: Any, messages: list[dict[str, str]], max_length: int | None = None
                ) -> tuple[list[int], list[int]]:
    """Token ids and labels (``IGNORE_INDEX`` outside the assistant answers) of one conversation.

    If the conversation ends with a user turn the generation prompt is appended (for inference) and no token
    is labelled. Truncation to ``max_length`` keeps the start (where the fMRI placeholder sits).
    """
    ids: list[int] = []
    labels: list[int] = []
    for text, is_answer in chat_pieces(tokenizer, messages):
        t = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += t
        labels += t if is_answer else [IGNORE_INDEX] * len(t)
    if max_length is not None and len(ids) > max_length:
        ids, labels = ids[:max_length], labels[:max_length]
    return ids, labels


def corpus(annotations: Mapping[str, Sequence[Any]]) -> list[str]:
    """Every answer text of the given per-stimulus annotations (for training a tiny tokenizer / LM)."""
    out: list[str] = []
    for kind, values in annotations.items():
        for v in values:
            if kind == "captions":
                out += list(v)
            elif kind in ("descriptions", "sd_prompts"):
                out += as_list(v)
            elif kind == "qa":
                out += [f"{p['q']} {p['a']}" for p in v]
            elif kind == "dialogues":
                out += [" ".join(t["value"] for t in conv) for conv in as_list(v)]
    return out


__all__ = [
    "BRIEF_TEMPLATES", "DETAILED_TEMPLATES", "FMRI_TOKEN", "GENERATORS", "IGNORE_INDEX", "INSTRUCTION_TYPES",
    "Sample", "as_list", "chat_pieces", "check_types", "concept_answer", "concept_vocabulary", "corpus", "eval_concepts", "encode_chat", "eval_samples",
    "needed_annotations",
]
