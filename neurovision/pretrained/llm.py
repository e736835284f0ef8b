"""Causal language models for stage 2: any Hugging Face causal LM loaded from a local directory, ready for fMRI
tokens (the ``<fmri>`` placeholder, a pad token, a chat template).

The demo's stand-in (a tiny Llama built on the phantom's text) lives in :mod:`neurovision.tiny.llm`; it is saved
with ``save_pretrained`` and loaded here with ``from_pretrained`` exactly like a real checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, cast

import torch

from neurovision.data.instructions import FMRI_TOKEN

# Llama-3 style chat template (role headers, end-of-turn token); renders prefix-consistently
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def load_tokenizer(path: str | os.PathLike[str], key: str = "model.init_args.llm",
                   chat_template: str | None = None) -> Any:
    """The tokenizer of the causal LM in a local directory, ready for fMRI tokens: what :func:`load_llm` returns
    with the model (the stage-2 datamodule loads it from the same path, so both tokenise identically).

    The tokenizer gets the ``<fmri>`` placeholder token (and a pad token) if it lacks them. ``chat_template`` (a
    Jinja string, or the path of a ``.jinja`` file) replaces the tokenizer's own, for models that ship none (e.g.
    Vicuna). A missing directory is one error naming ``key``.
    """
    from transformers import AutoTokenizer

    p = Path(path)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{p}: no causal LM checkpoint (config.json) here (YAML key {key}); build a tiny "
                                f"one with `neurovision tiny llm --store <store> --out {p}`")
    tok = AutoTokenizer.from_pretrained(p, local_files_only=True)
    if chat_template is not None:
        t = Path(chat_template)
        if chat_template.endswith(".jinja") and not t.is_file():
            raise FileNotFoundError(f"{t}: chat template file does not exist (YAML key model.init_args.chat_template)")
        tok.chat_template = t.read_text() if chat_template.endswith(".jinja") else chat_template
    if tok.chat_template is None:
        raise ValueError(f"{p}: field 'chat_template': missing in the tokenizer (YAML key {key}); give one with "
                         "model.init_args.chat_template")
    added = []
    if FMRI_TOKEN not in tok.get_vocab():
        added.append(FMRI_TOKEN)
    if added:
        tok.add_special_tokens({"additional_special_tokens": added})
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_llm(path: str | os.PathLike[str], key: str = "model.init_args.llm", dtype: torch.dtype | None = None,
             chat_template: str | None = None) -> tuple[Any, Any]:
    """(causal LM, tokenizer) from a local directory, ready for fMRI tokens.

    The tokenizer is :func:`load_tokenizer`'s (the ``<fmri>`` placeholder and a pad token added if it lacks them,
    ``chat_template`` replacing its own), and the model's embeddings grow to match. A missing directory is one
    error naming ``key``.
    """
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(path, key, chat_template)
    model = AutoModelForCausalLM.from_pretrained(Path(path), local_files_only=True, dtype=dtype or torch.float32)
    if len(tok) > cast(torch.Tensor, model.get_input_embeddings().weight).shape[0]:
        model.resize_token_embeddings(len(tok))
    return model, tok
