"""The tiny Llama of the demo (a stand-in, not the product): a byte-level BPE tokenizer + small ``LlamaConfig``
built and pre-trained on a store's text for CPU runs.

The tiny model stands in for Llama-3-8B on a laptop: the same classes (``LlamaForCausalLM``,
``PreTrainedTokenizerFast`` with a Llama-3-style chat template), saved with ``save_pretrained`` and loaded with
``from_pretrained`` exactly like a real checkpoint. Pre-training it for a few minutes on the phantom's captions,
descriptions and QA (training split only) gives it the language a real LLM brings, and on the same instructions
rendered with its chat template (without fMRI) the instruction following of the instruction-tuned LLMs the paper
uses (Llama-3-8B-Instruct, Vicuna); stage 2 then only has to teach it to read fMRI tokens.

    neurovision tiny llm --store data/phantom_demo.h5 --out teachers/phantom_demo/tiny_llm
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from neurovision.data.atomic import atomic_dir
from neurovision.data.instructions import FMRI_TOKEN, corpus
from neurovision.pretrained.llm import CHAT_TEMPLATE

SPECIAL_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|eot_id|>", "<|pad|>", FMRI_TOKEN)


def train_tokenizer(texts: Sequence[str], vocab_size: int = 1024) -> Any:
    """A byte-level BPE tokenizer trained on ``texts`` (milliseconds), with the chat special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<|pad|>",
        additional_special_tokens=[FMRI_TOKEN, "<|start_header_id|>", "<|end_header_id|>", "<|end_of_text|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_llama_config(vocab_size: int, hidden: int = 192, layers: int = 4, heads: int = 4,
                      max_positions: int = 1024, **overrides: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 8 * 8,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=max_positions, rms_norm_eps=1e-5, tie_word_embeddings=True, **overrides,
    )


def _store_texts(store_path: str | os.PathLike[str], splits: Sequence[str] = ("train",)) -> list[str]:
    return _store_corpus(store_path, splits)[0]


def _store_corpus(store_path: str | os.PathLike[str], splits: Sequence[str] = ("train",), per_type: int = 2,
                  seed: int = 0) -> tuple[list[str], list[list[dict[str, str]]]]:
    """The answer texts of the training images, and ``per_type`` instruction conversations per image and
    instruction type (the stage-2 generators, seeded), without the fMRI placeholder."""
    import numpy as np

    from neurovision.data.instructions import GENERATORS, NEEDS, concept_vocabulary
    from neurovision.data.store import Store
    from neurovision.tiny.teachers import stimuli_of

    store = Store(store_path)
    try:
        stim = stimuli_of(store, splits)
        kinds = [k for k in ("captions", "descriptions", "qa", "dialogues", "sd_prompts", "concepts", "boxes")
                 if k in store.annotation_kinds]
        ann = {k: [store.annotations(k, int(i)) for i in stim] for k in kinds}
        vocabulary = concept_vocabulary(store)
    finally:
        store.close()
    texts = corpus({k: v for k, v in ann.items() if k not in ("concepts", "boxes")})
    rng = np.random.default_rng(seed)
    chats: list[list[dict[str, str]]] = []
    types = [t for t, needs in NEEDS.items() if all(k in ann for k in needs)]
    for i in range(len(stim)):
        one = {k: v[i] for k, v in ann.items()}
        for t in types:
            if t in ("reasoning", "description", "sd_prompt", "dialogue") and not one.get(NEEDS[t][0]):
                continue
            for _ in range(per_type):
                kw = {"vocabulary": vocabulary} if t == "concept" else {}
                sample = GENERATORS[t](one, rng, **kw)
                chats.append([{"role": m["role"], "content": m["content"].replace(f"{FMRI_TOKEN}\n", "", 1)}
                              for m in sample.messages])
    return texts, chats


def pretrain(model: Any, tokenizer: Any, texts: Sequence[str], *, steps: int = 2000, batch_size: int = 32,
             block: int = 128, lr: float = 2e-3, max_minutes: float | None = None, seed: int = 0,
             progress: bool = True) -> dict[str, float]:
    """Causal-LM pre-training on ``texts`` packed into blocks (AdamW, warm-up + cosine, gradients clipped at
    norm 1, batches of blocks drawn with replacement) on :func:`neurovision.tiny.loop.fit`; returns the losses.

    The budget is ``steps`` and the schedule a function of the step alone, so the same seed gives the same
    weights on an idle or a loaded machine (a wall-clock budget gave a loaded machine a fraction of the steps
    and an early decay). ``max_minutes`` is deprecated and ignored (accepted for one release).
    """
    from neurovision.tiny.loop import (
        DrawBatches,
        StepModule,
        deprecated_max_minutes,
        fit,
        warmup_times_cosine,
    )

    deprecated_max_minutes(max_minutes, "pretrain")
    if steps < 1:
        raise ValueError(f"pretrain: steps must be >= 1, got {steps}")

    g = torch.Generator().manual_seed(seed)
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for t in texts:
        ids += tokenizer(t, add_special_tokens=False)["input_ids"] + [eos]
    data = torch.tensor(ids, dtype=torch.long)
    n_blocks = len(data) // block
    if n_blocks < 1:
        raise ValueError(f"pretrain: {len(data)} tokens, fewer than one block of {block}")
    data = data[: n_blocks * block].view(n_blocks, block)

    def step_fn(sel: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        x = data[sel]
        loss = model(input_ids=x, labels=x).loss
        return loss, {"loss": loss.item()}

    warm = max(1, steps // 20)
    module = StepModule(model, step_fn, lr=lr, weight_decay=0.01, betas=(0.9, 0.98),
                        schedule=lambda k: warmup_times_cosine(k, steps, warm))
    t0 = time.monotonic()
    done = fit(module, DrawBatches(n_blocks, batch_size, steps, g), desc="pretrain tiny LLM", progress=progress,
               gradient_clip_val=1.0)
    model.eval()
    losses = module.losses
    return {"first_loss": losses[0], "final_loss": losses[-1], "steps": done, "tokens": int(len(ids)),
            "torch_threads": torch.get_num_threads(), "train_wall_s": round(time.monotonic() - t0, 1)}


def build_tiny_llm(store: str | os.PathLike[str], out: str | os.PathLike[str], *, vocab_size: int = 1024,
                   hidden: int = 192, layers: int = 4, heads: int = 4, steps: int = 1500,
                   max_minutes: float | None = None, seed: int = 0, progress: bool = True,
                   chat: bool = True) -> Path:
    """Train a tokenizer and pre-train a tiny Llama on the store's training-split text; save to ``out``.

    ``steps`` is the budget (see :func:`pretrain`); ``max_minutes`` is deprecated and ignored. ``chat``: also
    pre-train on the stage-2 instructions of the training images rendered with the chat template, without fMRI
    (two per image and type), as the instruction-tuned LLMs of the paper are; the model then answers each
    instruction type in its form before stage 2, which only has to teach it what the fMRI says.
    """
    from transformers import LlamaForCausalLM

    from neurovision.tiny.loop import deprecated_max_minutes

    deprecated_max_minutes(max_minutes, "build_tiny_llm")

    torch.manual_seed(seed)
    texts, chats = _store_corpus(store, seed=seed) if chat else (_store_texts(store), [])
    tok = train_tokenizer(texts + [m["content"] for c in chats for m in c], vocab_size)
    if chats:  # instruction tuning: the chat-rendered conversations beside the plain texts
        texts = texts + [tok.apply_chat_template(c, tokenize=False) for c in chats]
    cfg = tiny_llama_config(len(tok), hidden, layers, heads, bos_token_id=tok.bos_token_id,
                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg)
    stats = pretrain(model, tok, texts, steps=steps, seed=seed, progress=progress)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out) as tmp:  # written whole, renamed into place
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "pretrain_metrics.json").write_text(json.dumps({**stats, "store": str(store), "texts": len(texts), "chats": len(chats)},
                                                              indent=1))
    return out


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="neurovision tiny llm", description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", required=True, help="store whose training-split text the tiny LLM learns")
    ap.add_argument("--out", required=True, help="output directory (save_pretrained layout)")
    ap.add_argument("--vocab-size", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=192)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--steps", type=int, default=1500, help="pre-training budget in optimiser steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-chat", action="store_true",
                    help="pre-train on the plain texts only (no chat-rendered instructions: not instruction-tuned)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's choice); the count can change the weights")
    a = ap.parse_args(argv)
    for flag, v in (("--steps", a.steps), ("--threads", a.threads)):
        if v is not None and v < 1:
            ap.error(f"{flag} must be >= 1, got {v}")
    from neurovision.tiny.loop import set_threads

    set_threads(a.threads)
    out = build_tiny_llm(a.store, a.out, vocab_size=a.vocab_size, hidden=a.hidden, layers=a.layers,
                         heads=a.heads, steps=a.steps, seed=a.seed, chat=not a.no_chat)
    print(f"wrote {out}: {(out / 'pretrain_metrics.json').read_text()}")

