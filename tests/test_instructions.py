"""Stage-2 instruction data: generators, answer-only labels, the fMRI splice, batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neurovision.data import instructions as ins
from neurovision.sources import scenes


@pytest.fixture(scope="module")
def tokenizer():
    from neurovision.tiny.llm import train_tokenizer

    sc = [scenes.sample_scene(np.random.default_rng(i)) for i in range(40)]
    texts = [c for s in sc for c in scenes.captions(s)] + [scenes.description(s) for s in sc]
    return train_tokenizer(texts, vocab_size=300)


def _ann(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    s = scenes.sample_scene(rng)
    return {"captions": scenes.captions(s), "descriptions": scenes.description(s), "qa": scenes.qa(s),
            "dialogues": scenes.dialogue(s, rng), "sd_prompts": scenes.sd_prompt(s),
            "concepts": scenes.concepts(s), "boxes": scenes.boxes(s)}


def test_template_banks_have_the_papers_sizes():
    assert len(ins.BRIEF_TEMPLATES) == 14 and len(set(ins.BRIEF_TEMPLATES)) == 14
    assert len(ins.DETAILED_TEMPLATES) == 20 and len(set(ins.DETAILED_TEMPLATES)) == 20


@pytest.mark.parametrize("kind", ins.INSTRUCTION_TYPES)
def test_every_generator_puts_one_fmri_placeholder_first_and_answers_from_the_annotations(kind):
    ann = _ann(3)
    kw = {"vocabulary": scenes.CONCEPTS} if kind == "concept" else {}
    s = ins.GENERATORS[kind](ann, np.random.default_rng(1), **kw)
    assert s.type == kind
    assert s.messages[0]["role"] == "user" and s.messages[0]["content"].startswith(ins.FMRI_TOKEN)
    assert sum(m["content"].count(ins.FMRI_TOKEN) for m in s.messages) == 1
    assert s.messages[-1]["role"] == "assistant"
    answer = s.messages[-1]["content"]
    if kind == "caption":
        assert answer in ann["captions"]
    elif kind == "description":
        assert answer == ann["descriptions"]
    elif kind == "reasoning":
        assert {"q": s.messages[0]["content"].split("\n", 1)[1], "a": answer} in \
            [{"q": p["q"], "a": p["a"]} for p in ann["qa"]]
    elif kind == "dialogue":
        assert [m["content"] for m in s.messages[1:]] == [t["value"] for t in ann["dialogues"][1:]]
    elif kind == "sd_prompt":
        assert answer == ann["sd_prompts"]
    elif kind == "concept":
        word = s.meta["concept"]
        assert word in scenes.CONCEPTS
        assert (word in ann["concepts"]) == (not answer.startswith("There is no"))


def test_concept_answer_names_the_position_of_each_object_with_the_concept():
    objs = scenes.boxes(scenes.Scene((scenes.SceneObject("circle", "red", "small", 0),
                                      scenes.SceneObject("square", "red", "large", 8, dx=0.03, dy=-0.03))))
    a = ins.concept_answer(objs, "red")
    assert a == "The concept of red is at the top left (small red circle) and at the bottom right (large red square)."
    assert "bottom right" in ins.concept_answer(objs, "square") and "top left" not in ins.concept_answer(objs, "square")
    assert ins.concept_answer(objs, "blue") == "There is no blue in the image."
    # a COCO box: the cell of its centre, its category as the label
    coco = [{"label": "dog", "box": [0.62, 0.0, 0.99, 0.3], "concepts": ["dog"]}]
    assert ins.concept_answer(coco, "dog") == "The concept of dog is at the top right (dog)."


def test_concept_eval_words_are_the_small_vocabulary_or_a_fixed_half_present_draw():
    small = list(scenes.CONCEPTS)
    assert ins.eval_concepts(["red"], small, key=3) == small
    vocab = [f"w{i}" for i in range(80)]
    present = ["w3", "w40", "w41"]
    words = ins.eval_concepts(present, vocab, key=5)
    assert len(words) == ins.MAX_EVAL_CONCEPTS and set(present) <= set(words)
    assert words == ins.eval_concepts(present, vocab, key=5)  # the same every run
    assert words != ins.eval_concepts(present, vocab, key=6)  # another image asks about other absent words


def test_labels_cover_exactly_the_assistant_answers(tokenizer):
    ann = _ann(5)
    s = ins.dialogue(ann, np.random.default_rng(0))
    ids, labels = ins.encode_chat(tokenizer, s.messages)
    assert len(ids) == len(labels)
    answered = tokenizer.decode([i for i, lab in zip(ids, labels, strict=True) if lab != ins.IGNORE_INDEX])
    eot = tokenizer.eos_token
    expected = "".join(m["content"] + eot for m in s.messages if m["role"] == "assistant")
    assert answered == expected
    # the whole conversation round-trips
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(s.messages, tokenize=False)
    # a prompt (ends with a user turn) has no labels and ends with the generation prompt
    p_ids, p_labels = ins.encode_chat(tokenizer, s.messages[:1])
    assert all(lab == ins.IGNORE_INDEX for lab in p_labels)
    assert tokenizer.decode(p_ids).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_a_template_that_is_not_prefix_consistent_is_refused(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = "{% for m in messages|reverse %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ValueError, match="prefix-consistently"):
        ins.encode_chat(tok, ins.caption(_ann(), np.random.default_rng(0)).messages)


def test_check_types_names_unknown_types_and_missing_annotations():
    with pytest.raises(ValueError, match="data.init_args.tasks"):
        ins.check_types(["poetry"], ["captions"], "x.h5")
    with pytest.raises(ValueError, match=r"x\.h5: field 'annotations/qa'"):
        ins.check_types(["reasoning"], ["captions"], "x.h5")


def test_splice_replaces_the_placeholder_by_the_fmri_tokens_brute_force():
    from neurovision.tasks.instruct import splice_fmri

    g = torch.Generator().manual_seed(0)
    fmri_id = 7
    ids = torch.tensor([[1, 2, 7, 3, 4, 0], [7, 5, 6, 8, 9, 2]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    labels = torch.tensor([[-100, -100, -100, 3, 4, -100], [-100, -100, 6, 8, 9, 2]])
    emb = torch.randn(2, 6, 4, generator=g)
    fmri = torch.randn(2, 3, 4, generator=g)
    e, m, lab = splice_fmri(emb, ids, mask, labels, fmri, fmri_id)
    for b in range(2):
        p = int((ids[b] == fmri_id).nonzero())
        want_e = torch.cat([emb[b, :p], fmri[b], emb[b, p + 1:]])
        want_m = torch.cat([mask[b, :p], torch.ones(3, dtype=torch.long), mask[b, p + 1:]])
        want_l = torch.cat([labels[b, :p], torch.full((3,), -100), labels[b, p + 1:]])
        torch.testing.assert_close(e[b], want_e)
        assert torch.equal(m[b], want_m) and torch.equal(lab[b], want_l)
    with pytest.raises(ValueError, match="exactly one <fmri>"):
        splice_fmri(emb, torch.tensor([[1, 2, 3, 4, 5, 6], [7, 7, 1, 1, 1, 1]]), mask, None, fmri, fmri_id)


def test_collate_pads_answers_right_and_prompts_left():
    from data_modules.instruct import Collate

    items = [{"patches": torch.zeros(2, 3), "subject": 0, "stimulus": 1, "trial": 2, "input_ids": [5, 6, 7],
              "labels": [-100, 6, 7], "prompt_ids": [5], "meta": {"type": "caption"}},
             {"patches": torch.ones(2, 3), "subject": 1, "stimulus": 3, "trial": 4, "input_ids": [8],
              "labels": [8], "prompt_ids": [8, 9, 10], "meta": {"type": "reasoning"}}]
    b = Collate(pad_id=0)(items)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert b["prompt_ids"].tolist() == [[0, 0, 5], [8, 9, 10]]
    assert b["prompt_mask"].tolist() == [[0, 0, 1], [1, 1, 1]]
    assert b["patches"].shape == (2, 2, 3) and [m["type"] for m in b["meta"]] == ["caption", "reasoning"]


def test_eval_samples_are_deterministic_and_cover_every_question():
    from neurovision.data.instructions import eval_samples

    ann = _ann(9)
    a = eval_samples(ann, ["caption", "reasoning", "concept"], scenes.CONCEPTS)
    b = eval_samples(ann, ["caption", "reasoning", "concept"], scenes.CONCEPTS)
    assert [s.messages for s in a] == [s.messages for s in b]
    assert sum(s.type == "reasoning" for s in a) == len(ann["qa"])
    assert sum(s.type == "concept" for s in a) == len(scenes.CONCEPTS)
    cap = next(s for s in a if s.type == "caption")
    assert cap.meta["references"] == ann["captions"]


def test_shuffled_fmri_control_pairs_every_prompt_with_another_images_fmri(tiny_store, tokenizer):
    from data_modules.fmri import FMRITrials
    from data_modules.instruct import EvalInstructions
    from neurovision.data.store import Store

    store = Store(tiny_store)
    trials = FMRITrials(store, "test", [0, 1], "average")
    true = EvalInstructions(trials, tokenizer, ["caption"], 160)
    shuf = EvalInstructions(trials, tokenizer, ["caption"], 160, shuffle_fmri=True)
    assert len(true) == len(shuf) == len(trials)
    patches = torch.stack([trials[i]["patches"] for i in range(len(trials))])
    for i in range(len(shuf)):
        a, b = true[i], shuf[i]
        assert a["stimulus"] == b["stimulus"] and a["input_ids"] == b["input_ids"]  # same prompt and answer
        torch.testing.assert_close(a["patches"], patches[i])
        assert not torch.equal(b["patches"], patches[i])  # another item's fMRI...
        assert any(torch.equal(b["patches"], p) for p in patches)  # ...of the same split
    assert sorted(shuf.source.values()) == list(range(len(trials)))  # a permutation
    few = EvalInstructions(trials, tokenizer, ["caption"], 160, max_items=3)
    assert sorted({few[i]["subject"] for i in range(len(few))}) == [0, 1]  # spread over the subjects


def test_tiny_llm_is_instruction_tuned_on_the_training_images_chats_without_fmri(tiny_store, tmp_path):
    """The tiny LLM's corpus: the plain answer texts plus, per training image and instruction type, two
    conversations from the stage-2 generators with the fMRI placeholder removed (an instruction-tuned stand-in)."""
    import json

    from neurovision.data.store import Store
    from neurovision.tiny.llm import _store_corpus, build_tiny_llm
    from neurovision.tiny.teachers import stimuli_of

    texts, chats = _store_corpus(tiny_store)
    store = Store(tiny_store)
    n_train = len(stimuli_of(store, ("train",)))
    store.close()
    first_questions = [c[0]["content"] for c in chats]
    assert not any(ins.FMRI_TOKEN in m["content"] for c in chats for m in c)
    assert any(q in ins.BRIEF_TEMPLATES for q in first_questions)
    assert any(q in ins.DETAILED_TEMPLATES for q in first_questions)
    assert all(c[0]["role"] == "user" and c[-1]["role"] == "assistant" for c in chats)
    assert len(chats) == 2 * len(ins.INSTRUCTION_TYPES) * n_train  # the tiny phantom has every type
    assert _store_corpus(tiny_store)[1] == chats  # seeded
    out = build_tiny_llm(tiny_store, tmp_path / "llm", vocab_size=384, hidden=48, layers=2, heads=2, steps=2,
                         progress=False)
    meta = json.loads((out / "pretrain_metrics.json").read_text())
    assert meta["chats"] == len(chats) and meta["texts"] == len(texts) + len(chats)
    plain = build_tiny_llm(tiny_store, tmp_path / "plain", vocab_size=384, hidden=48, layers=2, heads=2, steps=2,
                           progress=False, chat=False)
    assert json.loads((plain / "pretrain_metrics.json").read_text())["chats"] == 0
