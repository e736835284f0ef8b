#!/usr/bin/env python
"""Benchmark stage 2: peak memory and speed of a phase-B training step (projector + LoRA adapters).

One step = frozen ViT3D forward (penultimate tokens) -> projector -> ``<fmri>`` splice into the LLM's input
embeddings -> causal-LM loss on the answer tokens -> backward -> AdamW step on the trainable parameters, exactly
the path of :class:`~neurovision.tasks.instruct.InstructTask` (same ``splice_fmri``, ``Projector``, peft
``get_peft_model``). Weights are random (memory and time do not depend on the values).

Configs: ``tiny`` is the demo preset's LLM (4 x 192 Llama) with the demo ViT3D (128 x 4, 76 patch tokens);
``8b`` is a Llama-3-8B-shaped config (32 x 4096, GQA 8 KV heads, vocab 128256) in bf16 with LoRA r 16 on every
projection and the paper's ViT3D (16 x 768), for a GPU. Peak memory: the process's peak RSS growth on CPU
(``resource.getrusage``, measured from just before the model is built), ``torch.cuda.max_memory_allocated`` on
GPU.

Usage::

    python benchmarks/bench_stage2.py [--config tiny|8b] [--device cpu|cuda] [--batch-size 16] [--steps 5]

Results: a table on stdout and JSON at ``benchmarks/results/stage2_<config>_<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

import neurovision

neurovision.setup_environment()  # the torchvision fix, before lightning (the tasks) imports torchvision

from neurovision.data.atomic import atomic_path  # noqa: E402
from neurovision.models import ViT3D  # noqa: E402
from neurovision.tasks.instruct import Projector, splice_fmri  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": {"llm": dict(vocab_size=1024, hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4),
             "vit": dict(dim=128, depth=4, heads=4), "patches": 76, "patch_size": 6, "dtype": "float32",
             "lora_r": 16, "text_tokens": 64},
    "8b": {"llm": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8),
           "vit": dict(dim=768, depth=16, heads=12), "patches": 78, "patch_size": 14, "dtype": "bfloat16",
           "lora_r": 16, "text_tokens": 128},
}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run(config: str, device: torch.device, batch_size: int, steps: int, grad_ckpt: bool) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = CONFIGS[config]
    dtype = getattr(torch, cfg["dtype"])
    torch.manual_seed(0)
    rss0 = _rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    coords = [(i % 6, (i // 6) % 8, i // 48) for i in range(cfg["patches"])]
    vit = ViT3D(cfg["patch_size"] ** 3, coords, **cfg["vit"]).to(device).eval().requires_grad_(False)
    with torch.device(device):
        llm = LlamaForCausalLM(LlamaConfig(**cfg["llm"], max_position_embeddings=1024)).to(dtype)
    if grad_ckpt:
        llm.gradient_checkpointing_enable()
        llm.enable_input_require_grads()
    llm = get_peft_model(llm, LoraConfig(r=cfg["lora_r"], lora_alpha=2 * cfg["lora_r"], task_type="CAUSAL_LM",
                                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                         "up_proj", "down_proj"]))
    width = cfg["llm"]["hidden_size"]
    proj = Projector(vit.dim, width, width).to(device)
    params = [p for p in [*llm.parameters(), *proj.parameters()] if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    n_train = sum(p.numel() for p in params)
    n_total = sum(p.numel() for p in llm.parameters()) + sum(p.numel() for p in proj.parameters()) + \
        sum(p.numel() for p in vit.parameters())
    g = torch.Generator(device="cpu").manual_seed(0)
    t_tokens = cfg["text_tokens"]
    fmri_id = 3
    times = []
    for step in range(steps + 1):  # step 0 warms up
        patches = torch.randn(batch_size, cfg["patches"], cfg["patch_size"] ** 3, generator=g).to(device)
        ids = torch.randint(10, cfg["llm"]["vocab_size"], (batch_size, t_tokens), generator=g).to(device)
        ids[:, 5] = fmri_id
        mask = torch.ones_like(ids)
        labels = ids.clone()
        labels[:, : t_tokens // 2] = -100
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            with torch.no_grad():
                h = vit(patches).penultimate
            fm = proj(h)
            emb = llm.get_input_embeddings()(ids)
            e, m, lab = splice_fmri(emb, ids, mask, labels, fm, fmri_id)
            loss = llm(inputs_embeds=e, attention_mask=m, labels=lab).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step:
            times.append(time.perf_counter() - t0)
    seq = t_tokens - 1 + cfg["patches"] + 1
    out = {
        "config": config, "device": str(device), "dtype": cfg["dtype"], "batch_size": batch_size,
        "sequence_length": seq, "gradient_checkpointing": grad_ckpt, "steps": steps,
        "params_total_M": round(n_total / 1e6, 2), "params_trainable_M": round(n_train / 1e6, 3),
        "seconds_per_step": round(sum(times) / len(times), 4), "samples_per_s": round(batch_size * len(times) / sum(times), 2),
        "peak_rss_growth_MB": round(_rss_mb() - rss0, 1), "peak_rss_MB": round(_rss_mb(), 1),
    }
    if device.type == "cuda":
        out["peak_gpu_allocated_GB"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/stage2_<config>_<device>.json)")
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    if a.config == "8b" and device.type != "cuda":
        sys.exit("bench_stage2: --config 8b needs --device cuda (16 GB of bf16 weights)")
    r = run(a.config, device, a.batch_size, a.steps, a.gradient_checkpointing)
    r["host"] = platform.node()
    for k, v in r.items():
        print(f"  {k:26s} {v}")
    out = Path(a.out) if a.out else REPO / "benchmarks" / "results" / f"stage2_{a.config}_{device.type}.json"
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(r, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
