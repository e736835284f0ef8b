"""Rows of the scale rehearsal for the big models (issue 17): ``stage2_train``, ``stage2_test``, ``stage3_sweep``.

Each row runs the project's real code path with the real architectures (random weights, built from the configs
in ``experiments/models/``) for a few steps on the CPU, and counts FLOPs with ``FlopCounterMode`` on the real
shapes (on the ``meta`` device, where a real-size pass is too slow on a CPU). The projections read the shipped
YAMLs (``experiments/stage2_instruct.yaml`` + its phase-A preset, ``experiments/stage3_reconstruct.yaml`` and the
NSD β sweep ``experiments/sweeps/beta_nsd.yaml``), so they follow what the shipped defaults run.

* ``stage2_train``: Llama-3-8B-shaped ``LlamaForCausalLM`` (real width, heads, GQA, vocab; 1-2 layers on the CPU)
  + LoRA (peft, the YAML's ``LoraConfig``) + the LLaVA projector fed by the paper's ViT3D (16 x 768, 79 tokens),
  gradient checkpointing, forward + backward + AdamW at the real sequence length. FLOPs per step counted on
  ``meta`` at the YAML's batch size for 1 and 2 layers; 32 layers = 32 x per-layer + the rest (embeddings/head),
  checked against a direct 32-layer count.
* ``stage2_test``: greedy ``generate`` with the KV cache on the shaped model; prefill FLOPs counted on ``meta``,
  decode steps projected as max(FLOPs, weight bytes over HBM bandwidth) per step.
* ``stage3_sweep``: the Stable unCLIP-small UNet (``UNet2DConditionModel.from_config``) and the SD-2.1 VAE decoder
  at 768 px counted on ``meta``, one real UNet forward on the CPU, and the β sweep's UNet calls counted exactly as
  :meth:`neurovision.pretrained.unclip.UnCLIPReconstructor.timesteps` runs them.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .common import (
    GB,
    NODE,
    Row,
    Scale,
    count_flops,
    fits,
    gpu_hours,
    h100_hours,
    max_rss_gb,
    projected,
    run_isolated,
    scaling_exponent,
)

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / "experiments" / "models"
STAGE2_YAML = REPO / "experiments" / "stage2_instruct.yaml"
PHASE_A_YAML = REPO / "experiments" / "presets" / "stage2_instruct_phase_a.yaml"
STAGE3_YAML = REPO / "experiments" / "stage3_reconstruct.yaml"
SWEEP_YAML = REPO / "experiments" / "sweeps" / "beta_nsd.yaml"

# ---- stated assumptions (estimates, not measurements; each is printed in the arithmetic where used)
FMRI_TOKENS = 1 + Scale.active_patches  # CLS + active patches: the ViT3D's penultimate token states
TEXT_TOKENS = 120        # text tokens of one training conversation (chat headers + instruction + answer)
PROMPT_TOKENS = 40       # text tokens of one evaluation prompt (chat headers + question + generation prompt)
QA_PER_IMAGE = 12        # reasoning questions per NSD test image (sources/coco.py asks at most 15; assumed ~3 categories)
A100_HBM_TBPS = 2.039    # A100-80GB HBM2e bandwidth (public spec); decoding streams the weights each step
CUDA_OVERHEAD_GB = 2.0   # CUDA context + allocator/cuBLAS workspaces per process (estimate)
PROCESS_RAM_GB = 4.0     # host RAM of one rank besides its model copy: interpreter, CUDA host state, loaders
LOGIT_BYTES = 14         # bytes per logit in the LM loss: bf16 logits + fp32 upcast + log-softmax + fp32 grad
VAL_FRACTION = Scale.val_fraction
# SD-2.1's text encoder (OpenCLIP ViT-H/14 text tower as transformers.CLIPTextModel; public config values)
SD21_TEXT_ENCODER = {"vocab_size": 49408, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
                     "num_attention_heads": 16, "max_position_embeddings": 77, "hidden_act": "gelu",
                     "projection_dim": 512}
# MindEye's metric networks at the input sizes neurovision.metrics.images uses
METRIC_NETS = (("alexnet", {}, 256), ("inception_v3", {"aux_logits": False, "init_weights": False}, 299),
               ("efficientnet_b1", {}, 240), ("resnet50", {}, 224))
# the NSD β sweep the brief describes; used only when experiments/sweeps/beta_nsd.yaml does not exist
DEFAULT_SWEEP = {"betas": [0.0, 0.3, 0.5, 0.7, 0.85, 0.93, 1.0], "steps": 25, "guidance_scale": 7.5,
                 "best_of": 8, "best_of_beta": 0.93}


def _size(args: argparse.Namespace, smoke: Any, quick: Any, default: Any) -> Any:
    if getattr(args, "smoke", False):
        return smoke
    return quick if args.quick else default


def _log(args: argparse.Namespace, msg: str) -> None:
    if getattr(args, "progress", False):
        print(f"  [{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ============================================================================================ configs
def model_config(name: str) -> dict[str, Any]:
    """A real model config from ``experiments/models/<name>.json`` (architecture only)."""
    path = MODELS / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model config missing (experiments/models/ ships the real configs)")
    return json.loads(path.read_text())


def _yaml(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        raise FileNotFoundError(f"{path}: YAML the scale rehearsal projects from is missing")
    return _inline_refs(yaml.safe_load(path.read_text()) or {}, path.parent)


def _inline_refs(cfg: Any, base: Path) -> Any:
    """Values that name another YAML file (``data: data/nsd_instruct.yaml``, a teacher block), read in place
    relative to the referencing file, as jsonargparse resolves them."""
    if isinstance(cfg, Mapping):
        return {k: _inline_refs(v, base) for k, v in cfg.items()}
    if isinstance(cfg, list):
        return [_inline_refs(v, base) for v in cfg]
    if isinstance(cfg, str) and cfg.endswith((".yaml", ".yml")) and (base / cfg).is_file():
        return _yaml(base / cfg)
    return cfg


def _merge(a: Any, b: Any) -> Any:
    """LightningCLI-like config merge: mappings merge key by key, anything else replaces."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        out = dict(a)
        for k, v in b.items():
            out[k] = _merge(a.get(k), v) if k in a else v
        return out
    return b


def _set_dotted(cfg: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    d = cfg
    for p in parts[:-1]:
        if not isinstance(d.get(p), dict):
            d[p] = {}
        d = d[p]
    d[parts[-1]] = value


def _get(cfg: Mapping[str, Any], key: str, default: Any = None) -> Any:
    d: Any = cfg
    for p in key.split("."):
        if not isinstance(d, Mapping) or p not in d:
            return default
        d = d[p]
    return d


def stage2_settings(main: Path = STAGE2_YAML, phase_a: Path = PHASE_A_YAML) -> dict[str, Any]:
    """What the shipped stage-2 YAMLs run: batch, epochs of phases A and B, LoRA, precision, generation."""
    b = _yaml(main)
    a = _merge(b, _yaml(phase_a))
    lora = _get(b, "model.init_args.lora.init_args") or {}
    return {
        "batch_size": int(_get(b, "data.init_args.batch_size", 16)),
        "epochs_a": int(_get(a, "trainer.max_epochs", 1)),
        "epochs_b": int(_get(b, "trainer.max_epochs", 1)),
        "phase_a": str(_get(a, "model.init_args.phase", "projector")),
        "phase_b": str(_get(b, "model.init_args.phase", "lora")),
        "lora": dict(lora),
        "gradient_checkpointing": bool(_get(b, "model.init_args.gradient_checkpointing", False)),
        "llm_dtype": str(_get(b, "model.init_args.llm_dtype", "float32")),
        "max_new_tokens": int(_get(b, "model.init_args.max_new_tokens", 64)),
        "eval_tasks": list(_get(b, "data.init_args.eval_tasks", ["caption"])),
        "eval_conditions": list(_get(b, "data.init_args.eval_conditions", ["average"])),
        "lr": float(_get(b, "model.init_args.optimizer.init_args.lr", 2e-4)),
    }


def eval_prompts_per_item(tasks: Sequence[str]) -> int:
    """Evaluation prompts per (subject, image) item, as :func:`neurovision.data.instructions.eval_samples` makes them:
    one per caption/description/sd_prompt, every QA pair for reasoning (:data:`QA_PER_IMAGE`, assumed), every
    concept word evaluated per image for concept (:data:`~neurovision.data.instructions.MAX_EVAL_CONCEPTS` of COCO's 80)."""
    from neurovision.data.instructions import MAX_EVAL_CONCEPTS

    per = {"caption": 1, "description": 1, "sd_prompt": 1, "reasoning": QA_PER_IMAGE, "concept": MAX_EVAL_CONCEPTS}
    unknown = [t for t in tasks if t not in per]
    if unknown:
        raise ValueError(f"{STAGE2_YAML}: data.init_args.eval_tasks: unknown type {unknown[0]!r}")
    return sum(per[t] for t in tasks)


# ============================================================================================ stage 2 arithmetic
def llama_params(cfg: Mapping[str, Any], extra_tokens: int = 1) -> dict[str, float]:
    """Parameter counts of a ``LlamaConfig`` (``extra_tokens``: ``<fmri>`` added by ``load_llm``)."""
    h, i, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = cfg["num_key_value_heads"] * (h // cfg["num_attention_heads"])
    layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h  # q, o; k, v; gate, up, down; two RMSNorms
    v = cfg["vocab_size"] + extra_tokens
    emb = v * h
    head = 0 if cfg.get("tie_word_embeddings") else v * h
    return {"layer": float(layer), "layers": float(n * layer), "embed": float(emb), "head": float(head),
            "total": float(n * layer + emb + head + h)}


def lora_params(cfg: Mapping[str, Any], r: int, targets: Sequence[str]) -> float:
    """LoRA parameters (A: r x in, B: out x r) over every layer for ``targets``."""
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    kv = cfg["num_key_value_heads"] * (h // cfg["num_attention_heads"])
    shapes = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h), "gate_proj": (h, i),
              "up_proj": (h, i), "down_proj": (i, h)}
    unknown = [t for t in targets if t not in shapes]
    if unknown:
        raise ValueError(f"{STAGE2_YAML}: model.init_args.lora.init_args.target_modules: {unknown[0]!r} is not a "
                         f"Llama projection ({sorted(shapes)})")
    return float(cfg["num_hidden_layers"] * sum(r * (a + b) for a, b in (shapes[t] for t in targets)))


def extrapolate_layers(flops_1: float, flops_2: float, layers: int) -> tuple[float, float, float]:
    """(per-layer, rest, total at ``layers``) from counts of the same step with 1 and 2 decoder layers:
    per-layer = F(2) - F(1); rest (embeddings, LM head, loss, projector) = F(1) - per-layer."""
    per = flops_2 - flops_1
    rest = flops_1 - per
    return per, rest, layers * per + rest


def stage2_gpu_memory_gb(cfg: Mapping[str, Any], batch: int, seq: int, trainable: float, *,
                         weight_bytes: int = 2, act_bytes: int = 2, checkpointing: bool = True,
                         frozen_extra: float = 0.0, overhead_gb: float = CUDA_OVERHEAD_GB) -> dict[str, float]:
    """Peak memory of one training step per GPU (estimate; each term in GB):

    weights (frozen LLM at ``weight_bytes``) + trainable params with grads and AdamW moments in fp32 (16 B each)
    + saved activations: with checkpointing one hidden state per layer (B·S·H) plus one layer's full set during
    its recompute (B·S·(6H + 2·kv + 4I)), without it that set for every layer; + the LM loss over the vocabulary
    (B·S·V·:data:`LOGIT_BYTES`) + ``frozen_extra`` bytes (ViT3D) + the CUDA overhead.
    """
    h, i, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = cfg["num_key_value_heads"] * (h // cfg["num_attention_heads"])
    p = llama_params(cfg)
    tokens = batch * seq
    layer_act = tokens * (6 * h + 2 * kv + 4 * i) * act_bytes
    acts = (n * tokens * h * act_bytes + layer_act) if checkpointing else n * layer_act
    logits = tokens * (cfg["vocab_size"] + 1) * LOGIT_BYTES * act_bytes / 2
    out = {"weights": p["total"] * weight_bytes / GB, "trainable_states": trainable * 16 / GB,
           "activations": acts / GB, "logits_loss": logits / GB, "frozen_extra": frozen_extra / GB,
           "overhead": overhead_gb}
    out["total"] = sum(out.values())
    return out


def decode_step_seconds(batch: int, context: int, cfg: Mapping[str, Any], weight_bytes: int = 2,
                        efficiency: float = NODE["efficiency"]) -> tuple[float, float, float]:
    """(seconds, flops, bytes) of one greedy decode step of ``batch`` sequences at ``context`` tokens on an A100:
    the step reads every weight and the KV cache once (bandwidth) and does 2 FLOPs per weight per sequence plus
    attention (compute); the slower of the two at ``efficiency`` of the peak."""
    p = llama_params(cfg)
    h, n = cfg["hidden_size"], cfg["num_hidden_layers"]
    kv = cfg["num_key_value_heads"] * (h // cfg["num_attention_heads"])
    flops = 2 * batch * (p["layers"] + p["head"]) + 4 * batch * n * context * h
    nbytes = (p["layers"] + p["head"]) * weight_bytes + batch * n * context * 2 * kv * weight_bytes
    sec = max(flops / (efficiency * NODE["gpu_tflops_bf16"] * 1e12), nbytes / (efficiency * A100_HBM_TBPS * 1e12))
    return sec, float(flops), float(nbytes)


# ============================================================================================ stage 3 arithmetic
def unet_steps(beta: float, steps: int) -> int:
    """UNet denoising steps img2img runs at strength β: ``min(int(round(steps·β, 6)), steps)`` (0 for β = 0: the
    predicted latent is only decoded), as :meth:`UnCLIPReconstructor.timesteps` does with a first-order
    scheduler (DDIM). The fallback of :func:`neurovision.pretrained.unclip.denoising_steps`."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"β must be in [0, 1], got {beta}")
    return min(int(round(steps * beta, 6)), int(steps)) if beta > 0 else 0


@dataclass(frozen=True)
class Arm:
    """One run of the β sweep: every test item of ``conditions`` (each subject) through every β of ``betas`` in
    one pass (``UnCLIPReconstructor.reconstruct_betas``: the stage-1 prediction, conditioning and prompt encoding
    are shared by the β)."""

    name: str
    betas: tuple[float, ...]
    steps: int
    guidance_scale: float
    num_candidates: int
    conditions: tuple[str, ...]
    prompted: bool
    items_per_subject: int = Scale.test_items


def item_calls(arm: Arm) -> dict[str, int]:
    """Network evaluations per item of one arm: UNet rows (steps x candidates per β > 0, x 2 with classifier-free
    guidance), VAE decodes (one per candidate of each β > 0, one for β = 0), selector CLIP images (best-of-N:
    every candidate), text-encoder sequences (once per item, x 2 with guidance) and metric evaluations (one
    reconstruction per β). Uses ``neurovision.pretrained.unclip.unet_evaluations`` / ``vae_decodes`` (the stage-3
    cost model) when they exist, else the same count here."""
    n = max(1, int(arm.num_candidates))
    cfg = 2 if arm.guidance_scale > 1.0 else 1
    diffused = [b for b in arm.betas if b > 0]
    try:
        from neurovision.pretrained.unclip import unet_evaluations, vae_decodes

        unet = int(unet_evaluations(list(arm.betas), arm.steps, n, arm.guidance_scale))
        vae = int(vae_decodes(list(arm.betas), n))
    except ImportError:
        unet = sum(unet_steps(b, arm.steps) for b in diffused) * n * cfg
        vae = n * len(diffused) + (1 if len(diffused) < len(arm.betas) else 0)
    return {"unet": unet, "vae": vae, "select": n * len(diffused) if n > 1 else 0,
            "text": cfg if diffused else 0, "metrics": len(arm.betas)}


def arm_cost(arm: Arm, flops: Mapping[str, float], subjects: int = Scale.subjects) -> dict[str, Any]:
    """FLOPs and A100-hours of one arm, with the UNet share of each β. ``flops`` per single evaluation: ``unet``
    (one row), ``vae`` (one 768-px decode), ``clip`` (one selector image), ``text`` (one prompt), ``metrics``
    (the metric networks on one reconstruction and its stimulus)."""
    c = item_calls(arm)
    items = subjects * arm.items_per_subject * len(arm.conditions)
    per_item = (c["unet"] * flops["unet"] + c["vae"] * flops["vae"] + c["select"] * flops["clip"]
                + c["text"] * flops["text"] + c["metrics"] * flops["metrics"])
    total = items * per_item
    cfg = 2 if arm.guidance_scale > 1.0 else 1
    per_beta = {b: gpu_hours(items * (unet_steps(b, arm.steps) * max(1, arm.num_candidates) * cfg * flops["unet"]
                                      + (max(1, arm.num_candidates) if b > 0 else 1) * flops["vae"]))
                for b in arm.betas}
    return {"items": float(items), "unet_evals": float(items * c["unet"]), "flops": float(total),
            "gpu_hours": gpu_hours(total), "per_beta_gpu_hours": per_beta, "calls": c}


def sweep_cost(arms: Sequence[Arm], flops: Mapping[str, float], subjects: int = Scale.subjects) -> dict[str, Any]:
    per = {a.name: arm_cost(a, flops, subjects) for a in arms}
    return {"arms": per, "gpu_hours": sum(v["gpu_hours"] for v in per.values()),
            "unet_evals": sum(v["unet_evals"] for v in per.values()), "flops": sum(v["flops"] for v in per.values())}


def default_arms(spec: Mapping[str, Any] = DEFAULT_SWEEP) -> list[Arm]:
    """The NSD β sweep of the brief: every β on {average, single} without prompt and on average with the LLM's
    prompt, one candidate; best-of-N at one β on average without prompt."""
    betas = tuple(float(b) for b in spec["betas"])
    st, g = int(spec["steps"]), float(spec["guidance_scale"])
    return [Arm("betas", betas, st, g, 1, ("average", "single"), False),
            Arm("betas_prompt", betas, st, g, 1, ("average",), True),
            Arm(f"best{spec['best_of']}", (float(spec["best_of_beta"]),), st, g, int(spec["best_of"]),
                ("average",), False)]


def _parse_args(argv: Sequence[str]) -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {}
    it = iter(argv)
    for a in it:
        if not a.startswith("--"):
            continue
        if "=" in a:
            k, v = a[2:].split("=", 1)
        else:
            k, v = a[2:], next(it, "")
        out[k] = yaml.safe_load(v)
    return out


def sweep_arms(path: Path = SWEEP_YAML) -> tuple[list[Arm], str]:
    """The arms of a β sweep file: its configs merged, then its ``args``, then each run's overrides (runs x grid,
    as ``neurovision sweep`` expands them). Falls back to :func:`default_arms` when the file does not exist."""
    if not Path(path).is_file():
        return default_arms(), f"{Path(path).name} absent: the brief's sweep (DEFAULT_SWEEP)"
    from neurovision.runs.sweep import expand, load_sweep

    sweep = load_sweep(path)
    base: dict[str, Any] = {}
    for c in sweep.configs:
        base = _merge(base, _yaml(Path(c)))
    for k, v in _parse_args(sweep.args).items():
        _set_dotted(base, k, v)
    arms = []
    for run in expand(sweep):
        cfg = json.loads(json.dumps(base))
        for k, v in run.overrides.items():
            _set_dotted(cfg, k, v)
        def m(k: str, d: Any = None, cfg: dict[str, Any] = cfg) -> Any:
            return _get(cfg, f"model.init_args.{k}", d)

        conds = _get(cfg, "data.init_args.eval_conditions", ["average"])
        max_items = _get(cfg, "data.init_args.max_eval_items")
        items = Scale.test_items if max_items is None else min(Scale.test_items, int(max_items))
        beta = m("beta", 0.93)
        betas = tuple(float(b) for b in (beta if isinstance(beta, list) else [beta]))
        arms.append(Arm(run.name, betas, int(m("steps", 50)), float(m("guidance_scale", 1.0)),
                        int(m("num_candidates", 1)), tuple(conds), m("prompts") is not None, items))
    return arms, str(Path(path).relative_to(REPO) if Path(path).is_relative_to(REPO) else path)


# ============================================================================================ children (spawned)
def _patch_coords(n: int) -> list[tuple[int, int, int]]:
    return [(i % 6, (i // 6) % 8, i // 48) for i in range(n)]


def _no_packed_check() -> Any:
    """On ``meta`` tensors transformers' packed-sequence probe calls ``.item()``; it only picks the mask form (no
    FLOPs), so it is switched off while counting."""
    import contextlib
    from unittest import mock

    import transformers.masking_utils as mu

    if not hasattr(mu, "find_packed_sequence_indices"):  # another transformers: nothing to switch off
        return contextlib.nullcontext()
    return mock.patch.object(mu, "find_packed_sequence_indices", lambda *a, **k: None)


def _meta_llm_flops(cfg: dict[str, Any], layers: int, batch: int, seq: int, mode: str,
                    lora: dict[str, Any] | None, checkpointing: bool) -> int:
    """FLOPs of one LLM pass on ``meta``: ``mode`` = ``lora`` (phase B step), ``projector`` (phase A step: frozen
    LLM, gradients flow to the input embeddings) or ``forward`` (no grad: validation / prefill)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    c = LlamaConfig(**{**cfg, "num_hidden_layers": layers, "vocab_size": cfg["vocab_size"] + 1})
    with torch.device("meta"):
        m = LlamaForCausalLM(c).to(torch.bfloat16)
    m.requires_grad_(False)
    train = mode != "forward"
    if train and checkpointing:
        m.gradient_checkpointing_enable()
        m.enable_input_require_grads()
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        m = get_peft_model(m, LoraConfig(**(lora or {})))
    m.train(train)
    with torch.device("meta"):
        emb = torch.randn(batch, seq, cfg["hidden_size"], dtype=torch.bfloat16, requires_grad=train)
        labels = torch.randint(0, 1000, (batch, seq))

    def step() -> None:
        if train:
            m(inputs_embeds=emb, labels=labels).loss.backward()
        else:
            with torch.no_grad():
                m(inputs_embeds=emb, use_cache=False)

    with _no_packed_check():
        return count_flops(step)[1]


def _fmri_side(batch: int, dim: int, llm_width: int, train: bool) -> tuple[Any, Any, int]:
    """(ViT3D, projector, FLOPs of ViT3D forward + projector forward(+backward)) at ``batch`` on the CPU."""
    import torch

    from neurovision.models import ViT3D
    from neurovision.tasks.instruct import Projector

    vit = _random_module(lambda: ViT3D.paper(Scale.patch_voxels, _patch_coords(Scale.active_patches)), 1)
    vit = vit.eval().requires_grad_(False)
    proj = Projector(vit.dim, llm_width, llm_width)
    patches = torch.randn(1, Scale.active_patches, Scale.patch_voxels)

    def f() -> None:
        with torch.no_grad():
            h = vit(patches).penultimate
        out = proj(h)
        if train:
            out.sum().backward()

    fl = count_flops(f)[1]
    proj.zero_grad(set_to_none=True)
    return vit, proj, fl * batch


def _random_module(factory: Callable[[], Any], seed: int) -> Any:
    """``factory()`` with its weights drawn fast: the per-module normal / truncated-normal inits of a 1-billion-
    parameter embedding + head and of the 86 M ViT3D take ~20 s each on a small CPU; uniform weights of the same
    std (0.02), zero biases and unit 1-D weights take a fraction of that (the values do not matter for time,
    memory or FLOPs)."""
    import torch
    from transformers.initialization import no_init_weights

    with no_init_weights():  # torch.nn.init.* and transformers' init_weights are no-ops inside
        m = factory()
    g = torch.Generator().manual_seed(seed)
    a = 0.02 * math.sqrt(3.0)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.ndim == 1:
                p.fill_(1.0)
            else:
                p.uniform_(-a, a, generator=g)
    return m


def stage2_child(layers: int, batches: Sequence[int], new_tokens: int, seed: int, train: bool,
                 settings: dict[str, Any], warmup: bool = True, direct: bool = True) -> dict[str, Any]:
    """Spawned: count FLOPs on ``meta`` (YAML batch, real sequence, 1/2/32 layers) and run the real CPU path on
    a ``layers``-layer Llama-3-8B-shaped model: training steps at ``batches`` (``train``) or greedy generation of
    ``new_tokens`` tokens at ``batches``."""
    import neurovision

    neurovision.setup_environment()  # a spawned process: the torchvision fix before peft/transformers import it
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from neurovision.tasks.instruct import splice_fmri

    torch.manual_seed(seed)
    cfg = model_config("llama3_8b")
    cfg.pop("torch_dtype", None)
    lora = settings["lora"]
    b_yaml = settings["batch_size"]
    out: dict[str, Any] = {"flops": {}}
    ckpt = settings["gradient_checkpointing"]
    t0 = time.perf_counter()
    if train:
        seq = TEXT_TOKENS - 1 + FMRI_TOKENS
        for mode in ("lora", "projector", "forward"):
            f1 = _meta_llm_flops(cfg, 1, b_yaml, seq, mode, lora, ckpt)
            f2 = _meta_llm_flops(cfg, 2, b_yaml, seq, mode, lora, ckpt)
            out["flops"][mode] = (f1, f2)
        out["flops"]["lora_double_batch"] = _meta_llm_flops(cfg, 1, 2 * b_yaml, seq, "lora", lora, ckpt)
        if direct:
            out["flops"]["lora_full"] = _meta_llm_flops(cfg, cfg["num_hidden_layers"], b_yaml, seq, "lora", lora,
                                                        ckpt)
    else:
        seq = PROMPT_TOKENS - 1 + FMRI_TOKENS
        out["flops"]["prefill"] = (_meta_llm_flops(cfg, 1, b_yaml, seq, "forward", None, False),
                                   _meta_llm_flops(cfg, 2, b_yaml, seq, "forward", None, False))
        out["flops"]["prefill_double_batch"] = _meta_llm_flops(cfg, 1, 2 * b_yaml, seq, "forward", None, False)
    out["seq"] = seq
    out["count_seconds"] = time.perf_counter() - t0

    # ---- the real CPU path (fp32: this CPU has no bf16 units; FLOPs do not depend on the dtype)
    rss0 = max_rss_gb()
    t0 = time.perf_counter()
    # load_llm grows the vocabulary by the <fmri> token: the same shapes straight from the config
    c = LlamaConfig(**{**cfg, "num_hidden_layers": layers, "vocab_size": cfg["vocab_size"] + 1})
    llm = _random_module(lambda: LlamaForCausalLM(c), seed)
    fmri_id = cfg["vocab_size"]
    llm.requires_grad_(False)
    if train:
        llm = get_peft_model(llm, LoraConfig(**lora))
        if ckpt:
            llm.gradient_checkpointing_enable()
            llm.enable_input_require_grads()
    vit, proj, fl_side = _fmri_side(1, 768, cfg["hidden_size"], train)
    out["flops"]["fmri_side_per_sample"] = fl_side
    params = [p for p in [*llm.parameters(), *proj.parameters()] if p.requires_grad]
    out["trainable_params_shaped"] = sum(p.numel() for p in params)
    out["build_seconds"] = time.perf_counter() - t0
    out["rss_built_gb"] = max_rss_gb()
    out["rss_before_build_gb"] = rss0
    g = torch.Generator().manual_seed(seed)
    text = TEXT_TOKENS if train else PROMPT_TOKENS

    def batch(b: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(10, cfg["vocab_size"], (b, text), generator=g)
        ids[:, 5] = fmri_id
        labels = ids.clone()
        labels[:, : text // 2] = -100
        return {"patches": torch.randn(b, Scale.active_patches, Scale.patch_voxels, generator=g), "ids": ids,
                "mask": torch.ones_like(ids), "labels": labels}

    def embeds(x: dict[str, torch.Tensor], labels: bool) -> tuple[Any, Any, Any]:
        with torch.no_grad():
            h = vit(x["patches"]).penultimate
        fm = proj(h)
        emb = llm.get_input_embeddings()(x["ids"])
        return splice_fmri(emb, x["ids"], x["mask"], x["labels"] if labels else None, fm, fmri_id)

    times: dict[int, float] = {}
    step_flops: dict[int, int] = {}
    if train:
        opt = torch.optim.AdamW(params, lr=settings["lr"])
        llm.train()
        for i, b in enumerate([batches[0], *batches] if warmup else batches):  # the first step warms up
            x = batch(b)
            t = time.perf_counter()

            def step(x: dict[str, torch.Tensor] = x) -> torch.Tensor:
                e, m, lab = embeds(x, True)
                loss = llm(inputs_embeds=e, attention_mask=m, labels=lab).loss
                loss.backward()
                return loss

            loss, fl_step = count_flops(step)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i or not warmup:
                times[b] = time.perf_counter() - t
                step_flops[b] = fl_step
        out["loss"] = float(loss)
    else:
        llm.eval()
        gen: dict[int, tuple[float, float]] = {}
        for b in batches:
            x = batch(b)
            per = []
            for n in (1, new_tokens):
                t = time.perf_counter()
                with torch.no_grad():
                    e, m, _ = embeds(x, False)
                    res, fl = count_flops(llm.generate, inputs_embeds=e, attention_mask=m, max_new_tokens=n,
                                          min_new_tokens=n, do_sample=False, pad_token_id=0)
                per.append((time.perf_counter() - t, fl, int(res.shape[1])))
            (t1, f1, _), (tn, fn, length) = per
            gen[b] = ((tn - t1) / max(1, new_tokens - 1), (fn - f1) / max(1, new_tokens - 1))
            times[b] = tn
            step_flops[b] = fn
            out["generated_tokens"] = length
        out["decode"] = {b: {"seconds_per_token": v[0], "flops_per_token": v[1]} for b, v in gen.items()}
    out["step_seconds"] = times
    out["step_flops"] = step_flops
    out["rss_peak_gb"] = max_rss_gb()
    return out


def _fake_activation_gb(ucfg: dict[str, Any], vcfg: dict[str, Any], items: int, dtype: Any) -> dict[str, float]:
    """Peak activation GB of one UNet forward (``items`` x 2 rows, CFG) and one VAE decode of ``items`` latents at
    the configs' sizes, tracked by ``torch.distributed._tools.mem_tracker.MemTracker`` on fake tensors (the CPU's
    fused attention, like GPU flash/memory-efficient attention, keeps no score matrix)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    def act(mt: Any) -> float:
        snap = mt.get_tracker_snapshot("peak")
        return sum(float(v) for s in snap.values() for k, v in s.items() if str(k).endswith("ACT")) / GB

    s, c = int(ucfg["sample_size"]), int(ucfg["in_channels"])
    out = {}
    with FakeTensorMode():
        old = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            unet = UNet2DConditionModel.from_config(ucfg).eval()
            vae = AutoencoderKL.from_config(vcfg).eval()
        finally:
            torch.set_default_dtype(old)
        b = 2 * items
        x = (torch.randn(b, c, s, s, dtype=dtype), torch.full((b,), 500),
             torch.randn(b, 77, int(ucfg["cross_attention_dim"]), dtype=dtype),
             torch.randn(b, int(ucfg["projection_class_embeddings_input_dim"]), dtype=dtype))
        mt = MemTracker()
        mt.track_external(unet)
        with mt, torch.no_grad():
            unet(x[0], x[1], encoder_hidden_states=x[2], class_labels=x[3])
        out["unet"] = act(mt)
        mt = MemTracker()
        mt.track_external(vae)
        with mt, torch.no_grad():
            vae.decode(torch.randn(items, int(vcfg["latent_channels"]), s, s, dtype=dtype))
        out["vae"] = act(mt)
    return out


def stage3_child(latent: int, batches: Sequence[int], seed: int, vae_latent: int, items_batch: int,
                 dtype_name: str, full_size: bool = False) -> dict[str, Any]:
    """Spawned: FLOPs of the UNet (batch 2, 96 x 96), VAE decoder (768 px), text encoder, selector CLIP and the
    metric networks on ``meta``; peak activation memory of the UNet (``items_batch`` x 2 CFG rows) and of the VAE
    decode (``items_batch`` images) at 768 px in ``dtype_name`` with ``MemTracker`` under ``FakeTensorMode`` (no
    real memory); then real CPU forwards of the unCLIP UNet at ``latent`` (batch ``batches``) and of the VAE
    decoder at ``vae_latent``."""
    import neurovision

    neurovision.setup_environment()  # a spawned process: the torchvision fix before open_clip/torchvision load
    import open_clip
    import torch
    import torchvision
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    ucfg, vcfg = model_config("sd21_unclip_small_unet"), model_config("sd21_vae")
    s = int(ucfg["sample_size"])
    cross, cls_dim = int(ucfg["cross_attention_dim"]), int(ucfg["projection_class_embeddings_input_dim"])
    out: dict[str, Any] = {"flops": {}, "params": {}}
    t0 = time.perf_counter()

    def unet_inputs(b: int, size: int, device: str) -> tuple[Any, ...]:
        with torch.device(device):
            return (torch.randn(b, ucfg["in_channels"], size, size), torch.full((b,), 500),
                    torch.randn(b, 77, cross), torch.randn(b, cls_dim))

    def unet_fwd(unet: Any, x: Any, t: Any, h: Any, c: Any) -> Any:
        with torch.no_grad():
            return unet(x, t, encoder_hidden_states=h, class_labels=c).sample

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(ucfg)
        vae = AutoencoderKL.from_config(vcfg)
        text = CLIPTextModel(CLIPTextConfig(**SD21_TEXT_ENCODER))
        clip = open_clip.model.CLIP(**open_clip.get_model_config("ViT-L-14-quickgelu"))
    out["params"] = {"unet": sum(p.numel() for p in unet.parameters()),
                     "vae": sum(p.numel() for p in vae.parameters()),
                     "vae_decoder": sum(p.numel() for p in [*vae.decoder.parameters(),
                                                             *vae.post_quant_conv.parameters()]),
                     "text_encoder": sum(p.numel() for p in text.parameters()),
                     "clip": sum(p.numel() for p in clip.parameters())}
    out["flops"]["unet_cfg_batch2"] = count_flops(unet_fwd, unet, *unet_inputs(2, s, "meta"))[1]
    lat = torch.randn(1, vcfg["latent_channels"], s, s, device="meta")
    with torch.no_grad():
        out["flops"]["vae_decode"] = count_flops(lambda: vae.decode(lat).sample)[1]
        out["flops"]["text"] = count_flops(lambda: text(torch.zeros(1, 77, dtype=torch.long, device="meta")))[1]
        out["flops"]["clip"] = count_flops(lambda: clip.encode_image(torch.randn(1, 3, 224, 224, device="meta")))[1]
        metric = 2 * out["flops"]["clip"]  # the metric CLIP on reconstruction and stimulus
        mparams = 0
        for name, kw, size in METRIC_NETS:
            with torch.device("meta"):
                net = getattr(torchvision.models, name)(weights=None, **kw).eval()
            mparams += sum(p.numel() for p in net.parameters())
            metric += 2 * count_flops(lambda: net(torch.randn(1, 3, size, size, device="meta")))[1]  # noqa: B023
    out["flops"]["metrics"] = metric
    out["params"]["metric_nets"] = mparams
    out["count_seconds"] = time.perf_counter() - t0
    unet = vae = text = clip = None  # free the meta modules

    # ---- peak activation memory at the real shapes: MemTracker under FakeTensorMode (shapes only, no data)
    t0 = time.perf_counter()
    out["activation_gb"] = _fake_activation_gb(ucfg, vcfg, items_batch, getattr(torch, dtype_name))
    out["memtrack_seconds"] = time.perf_counter() - t0

    # ---- real CPU forwards (fp32)
    rss0 = max_rss_gb()
    t0 = time.perf_counter()
    unet = UNet2DConditionModel.from_config(ucfg).eval()
    out["build_seconds"] = time.perf_counter() - t0
    out["rss_unet_built_gb"] = max_rss_gb()
    out["rss_before_build_gb"] = rss0
    out["unet_seconds"] = {}
    unet_fwd(unet, *unet_inputs(1, 8, "cpu"))  # warm-up
    out["unet_flops"] = {}
    for b in batches:
        x = unet_inputs(b, latent, "cpu")
        t = time.perf_counter()
        y, out["unet_flops"][b] = count_flops(unet_fwd, unet, *x)
        out["unet_seconds"][b] = time.perf_counter() - t
        if not torch.isfinite(y).all():
            raise RuntimeError("unCLIP UNet forward produced non-finite values")
    if full_size:  # the real CFG pair at the real latent size (4 x 96 x 96: 768 px)
        t = time.perf_counter()
        y = unet_fwd(unet, *unet_inputs(2, s, "cpu"))
        out["unet_full_seconds"] = time.perf_counter() - t
        if not torch.isfinite(y).all():
            raise RuntimeError("unCLIP UNet forward produced non-finite values")
    out["rss_unet_peak_gb"] = max_rss_gb()
    unet = None
    vae = AutoencoderKL.from_config(vcfg).eval()
    t = time.perf_counter()
    with torch.no_grad():
        img = vae.decode(torch.randn(1, vcfg["latent_channels"], vae_latent, vae_latent)).sample
    out["vae_seconds"] = time.perf_counter() - t
    out["vae_image"] = list(img.shape)
    out["rss_peak_gb"] = max_rss_gb()
    return out


# ============================================================================================ rows
def _fmt(x: float) -> str:
    return f"{x:.3g}"


def stage2_train(args: argparse.Namespace) -> Row:
    st = stage2_settings()
    cfg = model_config("llama3_8b")
    full = not (args.quick or getattr(args, "smoke", False))
    layers = 2 if full else 1
    batches = (1, 2) if full else (1,)
    _log(args, f"stage2_train: Llama-3-8B-shaped, {layers} layer(s), CPU steps at batch {batches}, LoRA r "
               f"{st['lora'].get('r')}")
    res, seconds, peak = run_isolated(stage2_child, layers, batches, 0, args.seed, True, st, full, full)
    n_layers = cfg["num_hidden_layers"]
    seq = res["seq"]
    b = st["batch_size"]
    fl = res["flops"]
    per_b, rest_b, full_b = extrapolate_layers(*fl["lora"], n_layers)
    per_a, rest_a, full_a = extrapolate_layers(*fl["projector"], n_layers)
    per_v, rest_v, full_v = extrapolate_layers(*fl["forward"], n_layers)
    side_train = fl["fmri_side_per_sample"]
    # FLOPs per training sequence (phase A / B), per validation sequence
    seq_a = full_a / b + side_train
    seq_b = full_b / b + side_train
    seq_v = full_v / b + side_train / 3
    trials = Scale.train_trials
    prompts = eval_prompts_per_item(st["eval_tasks"])
    val_items = round(VAL_FRACTION * Scale.train_patterns)  # held-out images (all subjects)
    val_seqs = val_items * len(st["eval_conditions"]) * prompts
    flops_a = st["epochs_a"] * trials * seq_a
    flops_b = st["epochs_b"] * trials * seq_b
    flops_v = (st["epochs_a"] + st["epochs_b"]) * val_seqs * seq_v
    total = flops_a + flops_b + flops_v
    gh = gpu_hours(total)
    p = llama_params(cfg)
    lp = lora_params(cfg, int(st["lora"].get("r", 16)), st["lora"].get("target_modules", []))
    proj_params = 768 * 4096 + 4096 + 4096 * 4096 + 4096
    vit_params = 86e6
    mem = stage2_gpu_memory_gb(cfg, b, seq, lp + proj_params, checkpointing=st["gradient_checkpointing"],
                               frozen_extra=vit_params * 4)
    # the same formula at the rehearsal size (fp32, the shaped model, no CUDA) against the measured RSS
    shaped = {**cfg, "num_hidden_layers": layers}
    mem_cpu = stage2_gpu_memory_gb(shaped, max(batches), seq, res["trainable_params_shaped"], weight_bytes=4,
                                   act_bytes=4, checkpointing=st["gradient_checkpointing"],
                                   frozen_extra=vit_params * 4, overhead_gb=0.0)
    t1, t2 = res["step_seconds"][batches[0]], res["step_seconds"][batches[-1]]
    exponent = scaling_exponent(b, fl["lora"][0], 2 * b, fl["lora_double_batch"])
    t_exponent = scaling_exponent(batches[0], t1, batches[-1], t2) if len(batches) > 1 else None
    direct = fl.get("lora_full")
    measured = {"seconds": round(seconds, 2), "peak_rss_gb": round(peak, 3), "layers": layers,
                "hidden": cfg["hidden_size"], "vocab": cfg["vocab_size"] + 1, "sequence": seq,
                "batches": list(batches), "step_seconds": {str(k): round(v, 3) for k, v in res["step_seconds"].items()},
                "scaling_exponent": round(exponent, 3),
                "time_exponent": None if t_exponent is None else round(t_exponent, 3),
                "loss": round(res["loss"], 4),
                "rss_growth_gb": round(res["rss_peak_gb"] - res["rss_before_build_gb"], 3),
                "flops_step_lora_1_2_layers": list(fl["lora"]), "flops_step_lora_32_layers_direct": direct,
                "step_flops_cpu": {str(k): v for k, v in res["step_flops"].items()},
                "phase_seconds": {k: round(res[k], 2) for k in ("count_seconds", "build_seconds")}}
    arithmetic = [
        f"shipped YAMLs: phase A ({st['phase_a']}) {st['epochs_a']} epoch(s) + phase B ({st['phase_b']}, LoRA r "
        f"{st['lora'].get('r')} on {len(st['lora'].get('target_modules', []))} projections) {st['epochs_b']} "
        f"epoch(s), batch {b} per GPU, {st['llm_dtype']}, gradient checkpointing {st['gradient_checkpointing']}",
        f"sequence = {TEXT_TOKENS} text tokens (assumed) - 1 <fmri> + {FMRI_TOKENS} fMRI tokens = {seq}",
        f"FLOPs/step counted on meta (FlopCounterMode, batch {b}): phase B 1 layer {fl['lora'][0]:.3e}, 2 layers "
        f"{fl['lora'][1]:.3e} -> per layer {per_b:.3e}, rest (embeddings, LM head, loss) {rest_b:.3e}",
        f"32 layers = 32 x {per_b:.3e} + {rest_b:.3e} = {full_b:.3e}" + (
            f" (direct 32-layer meta count {direct:.3e}, {100 * (full_b / direct - 1):+.2f}%)" if direct else ""),
        f"per token per layer {per_b / (b * seq):.3e} FLOPs = {per_b / (b * seq) / p['layer']:.2f} x the "
        f"{p['layer'] / 1e6:.0f} M layer weights (forward + checkpoint recompute + input-gradient backward = 6, "
        f"+ LoRA and attention)",
        f"batch {b} -> {2 * b} (1 layer, meta): FLOPs exponent {exponent:.3f} (the fits check)",
        f"phase A (LLM frozen, grads to the projector) 32 layers = {full_a:.3e}/step; ViT3D fwd + projector "
        f"fwd/bwd {side_train:.3e}/sample (counted on CPU)",
        f"per sequence: A {seq_a:.3e}, B {seq_b:.3e}; {trials:,} training trials x ({st['epochs_a']} x A + "
        f"{st['epochs_b']} x B) = {flops_a + flops_b:.3e}",
        f"validation: {val_items} held-out images x {len(st['eval_conditions'])} conditions x {prompts} prompts "
        f"x {st['epochs_a'] + st['epochs_b']} epochs x {seq_v:.3e} (forward) = {flops_v:.3e}",
        f"GPU-hours = {total:.3e} / ({NODE['efficiency']} x {NODE['gpu_tflops_bf16']} TFLOP/s, estimated "
        f"utilisation) = {gh:.2f} A100-h ({h100_hours(total):.2f} H100-h; {gh / NODE['gpus']:.2f} h wall on 8 GPUs)"
        f"; each phase-B epoch {gpu_hours(trials * seq_b):.2f} A100-h, phase A {gpu_hours(flops_a):.2f}",
        "GPU memory/GPU (estimate) = " + " + ".join(f"{k} {v:.2f}" for k, v in mem.items() if k != "total")
        + f" = {mem['total']:.1f} GB (LoRA {lp / 1e6:.1f} M + projector {proj_params / 1e6:.1f} M trainable, "
        f"8B frozen weights {p['total'] / 1e9:.2f} B params bf16)",
        f"check: the same formula at the rehearsal size (fp32, {layers} layer(s), batch {max(batches)}) gives "
        f"{mem_cpu['total']:.2f} GB; measured RSS growth {measured['rss_growth_gb']:.2f} GB",
        "CPU steps (fp32; this CPU has no bf16 units): " + ", ".join(
            f"batch {k} {v:.1f} s ({res['step_flops'][k] / v / 1e9:.0f} GFLOP/s)" for k, v in res["step_seconds"].items())
        + ("" if t_exponent is None else f"; time exponent {t_exponent:.2f} (a shared 2-core CPU: noisy)"),
    ]
    ram = NODE["gpus"] * (p["total"] * 2 / GB + PROCESS_RAM_GB)
    arithmetic.append(f"RAM: {NODE['gpus']} ranks each load the bf16 weights on the CPU before moving them "
                      f"({p['total'] * 2 / GB:.1f} GB) + {PROCESS_RAM_GB} GB process/loaders = {ram:.0f} GB")
    proj = projected(ram_gb=ram, gpu_mem_gb=mem["total"], disk_gb=0.5, gpu_hours=gh)
    notes = (f"paper (Shen et al.): 8xA100 ~4 h + ~36 h for the LLM (~320 A100-h); projection {gh:.1f} A100-h "
             f"at 40% MFU. Disk: LoRA adapters + projector checkpoints.")
    row = Row("stage2_train", f"Llama-3-8B-shaped LlamaForCausalLM ({layers} of {n_layers} layers, real width/"
              f"GQA/vocab) + LoRA + projector from the 16x768 ViT3D, {len(batches)} CPU step(s) at the real "
              f"sequence; FLOPs on meta",
              measured, proj, arithmetic, True, notes,
              extra={"flops": {"phase_a_step": full_a, "phase_b_step": full_b, "val_seq": seq_v},
                     "memory_gb": mem, "settings": st})
    row.fits_node = fits(row)
    return row


def stage2_test(args: argparse.Namespace) -> Row:
    st = stage2_settings()
    cfg = model_config("llama3_8b")
    new = _size(args, 3, 4, 12)
    batches = _size(args, (1,), (1,), (1, 2))
    _log(args, f"stage2_test: greedy generate {new} tokens, batches {batches}")
    res, seconds, peak = run_isolated(stage2_child, 1, batches, new, args.seed, False, st)
    b = st["batch_size"]
    n_layers = cfg["num_hidden_layers"]
    _, _, prefill_step = extrapolate_layers(*res["flops"]["prefill"], n_layers)
    prompts = eval_prompts_per_item(st["eval_tasks"])
    rows = Scale.subjects * Scale.test_items * len(st["eval_conditions"]) * prompts
    batches_n = math.ceil(rows / b)
    max_new = st["max_new_tokens"]
    ctx = res["seq"] + max_new // 2  # mean context over the decode steps
    dsec, dflops, dbytes = decode_step_seconds(b, ctx, cfg)
    prefill_sec = prefill_step / (NODE["efficiency"] * NODE["gpu_tflops_bf16"] * 1e12)
    side = res["flops"]["fmri_side_per_sample"] * b
    per_batch = prefill_sec + max_new * dsec + side / (NODE["efficiency"] * NODE["gpu_tflops_bf16"] * 1e12)
    gh = batches_n * per_batch / 3600
    # the decode FLOPs formula against the count on the CPU generate (1 layer, batch b_cpu)
    b_cpu = batches[-1]
    shaped = {**cfg, "num_hidden_layers": 1}
    _, f_formula, _ = decode_step_seconds(b_cpu, res["seq"] + new // 2, shaped)
    f_counted = res["decode"][b_cpu]["flops_per_token"]
    t_tok = {bb: v["seconds_per_token"] for bb, v in res["decode"].items()}
    exponent = scaling_exponent(b, res["flops"]["prefill"][0], 2 * b, res["flops"]["prefill_double_batch"])
    t_exponent = None
    if len(batches) > 1:
        t_exponent = scaling_exponent(batches[0], res["step_seconds"][batches[0]], batches[-1],
                                      res["step_seconds"][batches[-1]])
    kv_cache = b * n_layers * (res["seq"] + max_new) * 2 * cfg["num_key_value_heads"] * \
        (cfg["hidden_size"] // cfg["num_attention_heads"]) * 2
    clip_s = 427.6e6 * 4  # the CLIP-S scorer (ViT-L/14, fp32)
    mem = (llama_params(cfg)["total"] * 2 + kv_cache + b * (cfg["vocab_size"] + 1) * 4 * 2 + clip_s) / GB \
        + CUDA_OVERHEAD_GB
    measured = {"seconds": round(seconds, 2), "peak_rss_gb": round(peak, 3), "layers": 1, "batches": list(batches),
                "prompt_sequence": res["seq"], "new_tokens": new,
                "decode_seconds_per_token": {str(k): round(v, 4) for k, v in t_tok.items()},
                "generate_seconds": {str(k): round(v, 3) for k, v in res["step_seconds"].items()},
                "scaling_exponent": round(exponent, 3),
                "time_exponent": None if t_exponent is None else round(t_exponent, 3),
                "decode_flops_per_token_counted": f_counted,
                "phase_seconds": {k: round(res[k], 2) for k in ("count_seconds", "build_seconds")}}
    arithmetic = [
        f"test rows = {Scale.subjects} subjects x {Scale.test_items} items x {len(st['eval_conditions'])} "
        f"conditions x {prompts} prompts ({'+'.join(st['eval_tasks'])}; reasoning = {QA_PER_IMAGE} QA, assumed) "
        f"= {rows:,} -> {batches_n:,} batches of {b}",
        f"prompt = {PROMPT_TOKENS} text tokens (assumed) - 1 + {FMRI_TOKENS} fMRI = {res['seq']}; prefill FLOPs per "
        f"batch (meta, 32 layers = 32 x per-layer + rest) {prefill_step:.3e} -> {prefill_sec * 1e3:.0f} ms",
        f"decode step (batch {b}, mean context {ctx}): {dflops:.3e} FLOPs, {dbytes / GB:.1f} GB read (bf16 weights"
        f" + KV cache) -> max(FLOPs / (0.4 x 312 TFLOP/s), bytes / (0.4 x {A100_HBM_TBPS} TB/s)) = "
        f"{dsec * 1e3:.1f} ms (estimated utilisation)",
        f"per batch {prefill_sec:.2f} + {max_new} (max_new_tokens, YAML) x {dsec * 1e3:.1f} ms = {per_batch:.2f} s;"
        f" x {batches_n:,} = {gh:.2f} A100-h (upper bound: every answer runs to max_new_tokens)",
        f"check: decode FLOPs/token formula at 1 layer, batch {b_cpu}: {f_formula:.3e}; counted on the CPU "
        f"generate {f_counted:.3e}",
        f"CPU (fp32, 1 layer): decode {', '.join(f'batch {k}: {v * 1e3:.0f} ms/token' for k, v in t_tok.items())}"
        + f"; prefill FLOPs batch {b} -> {2 * b} exponent {exponent:.3f} (the fits check)"
        + ("" if t_exponent is None else f"; time exponent {t_exponent:.2f} (shared CPU: noisy)"),
        f"GPU memory/GPU: bf16 weights {llama_params(cfg)['total'] * 2 / GB:.1f} + KV cache {kv_cache / GB:.2f} + "
        f"last-token logits + CLIP-S scorer {clip_s / GB:.1f} + {CUDA_OVERHEAD_GB} CUDA = {mem:.1f} GB (estimate)",
    ]
    row = Row("stage2_test", f"greedy generate (KV cache, {new} new tokens) on the Llama-3-8B-shaped model "
              f"(1 layer) + LoRA-free eval path; prefill FLOPs on meta, decode bandwidth-bound",
              measured, projected(ram_gb=NODE["gpus"] * (llama_params(cfg)["total"] * 2 / GB + PROCESS_RAM_GB),
                                  gpu_mem_gb=mem, disk_gb=0.1, gpu_hours=gh), arithmetic, True,
              "generation is bandwidth-bound: the time per token hardly grows with the batch",
              extra={"rows": rows, "per_batch_seconds": per_batch})
    row.fits_node = fits(row)
    return row


def stage3_costs(flops: Mapping[str, float], arms: Sequence[Arm]) -> dict[str, Any]:
    """The default sweep's cost plus its variants: every arm at 50 steps, and best-of-8 at every β > 0 on the
    averaged condition without prompt."""
    base = sweep_cost(arms, flops)
    fifty = sweep_cost([replace(a, steps=50) for a in arms], flops)
    bo = [a for a in arms if a.num_candidates > 1]
    n_best = max([a.num_candidates for a in bo], default=8)
    every_beta = tuple(sorted({b for a in arms for b in a.betas if b > 0}))
    variant = [replace(a, betas=every_beta) if a.num_candidates > 1 else a for a in arms]
    if not bo:
        variant.append(Arm(f"best{n_best}", every_beta, arms[0].steps, arms[0].guidance_scale, n_best,
                           ("average",), False))
    every = sweep_cost(variant, flops)
    return {"default": base, "steps_50": fifty, f"best_of_{n_best}_every_beta": every}


def _arm_label(a: Arm) -> str:
    return (f"{len(a.betas)} β x{a.num_candidates} {'+'.join(a.conditions)}{' +prompt' if a.prompted else ''}")


def stage3_sweep(args: argparse.Namespace) -> Row:
    latent = _size(args, 8, 16, 32)
    batches = (1, 2)
    vae_latent = _size(args, 8, 8, 16)
    s3 = _yaml(STAGE3_YAML)
    items_batch = int(_get(s3, "data.init_args.batch_size", 8))
    dtype_name = str(_get(s3, "model.init_args.dtype", "float16"))
    _log(args, f"stage3_sweep: unCLIP UNet forwards at 4x{latent}x{latent}, batches {batches}; VAE decode at "
               f"{8 * vae_latent} px; FLOPs/memory at 768 px on meta/fake tensors")
    full_size = not (args.quick or getattr(args, "smoke", False))
    res, seconds, peak = run_isolated(stage3_child, latent, batches, args.seed, vae_latent, items_batch, dtype_name,
                                      full_size)
    exponent = scaling_exponent(batches[0], res["unet_flops"][batches[0]], batches[-1],
                                res["unet_flops"][batches[-1]])
    t_exponent = scaling_exponent(batches[0], res["unet_seconds"][batches[0]], batches[-1],
                                  res["unet_seconds"][batches[-1]])
    fl = res["flops"]
    flops = {"unet": fl["unet_cfg_batch2"] / 2, "vae": fl["vae_decode"], "clip": fl["clip"], "text": fl["text"],
             "metrics": fl["metrics"]}
    arms, source = sweep_arms()
    costs = stage3_costs(flops, arms)
    base = costs["default"]
    gh = base["gpu_hours"]
    pr = res["params"]
    dtype_bytes = 2 if dtype_name in ("float16", "bfloat16") else 4
    weights = (pr["unet"] + pr["vae"] + pr["text_encoder"]) * dtype_bytes + (pr["clip"] + pr["metric_nets"]) * 4
    act = res["activation_gb"]
    mem = weights / GB + max(act["unet"], act["vae"]) + CUDA_OVERHEAD_GB
    # the ranks keep their share of a run's reconstructions (uint8, 768 px, every β) until the epoch ends; rank 0
    # then gathers the stimuli and one β at a time to score and write them: the run's RAM peak over the node
    img = 3 * (8 * int(model_config("sd21_unclip_small_unet")["sample_size"])) ** 2
    gather = max(Scale.subjects * a.items_per_subject * len(a.conditions) * (len(a.betas) + 2) * img for a in arms)
    disk = sum(Scale.subjects * a.items_per_subject * len(a.conditions) * len(a.betas) * img for a in arms)
    ram = gather / GB + NODE["gpus"] * (weights / GB + PROCESS_RAM_GB)
    b_meas = batches[-1]
    real_flops = fl["unet_cfg_batch2"] * (latent / 96) ** 2 * b_meas / 2
    sec_meas = res["unet_seconds"][b_meas]
    measured = {"seconds": round(seconds, 2), "peak_rss_gb": round(peak, 3), "unet_params": pr["unet"],
                "latent": [4, latent, latent], "batches": list(batches),
                "unet_forward_seconds": {str(k): round(v, 3) for k, v in res["unet_seconds"].items()},
                "scaling_exponent": round(exponent, 3), "time_exponent": round(t_exponent, 3),
                "vae_decode_px": res["vae_image"][-1], "vae_decode_seconds": round(res["vae_seconds"], 3),
                "unet_flops_cfg_batch2_768px": fl["unet_cfg_batch2"], "vae_decode_flops_768px": fl["vae_decode"],
                "activation_gb_768px": {k: round(v, 3) for k, v in act.items()},
                "phase_seconds": {k: round(res[k], 2) for k in ("count_seconds", "memtrack_seconds", "build_seconds")}}
    if "unet_full_seconds" in res:
        measured["unet_forward_seconds_cfg_pair_768px"] = round(res["unet_full_seconds"], 2)
    c = base["arms"]
    arithmetic = [
        f"sweep: {source}: {len(arms)} runs, each all its β in one pass per item; items = {Scale.subjects} "
        f"subjects x {Scale.test_items} x conditions",
        f"FLOPs (meta, FlopCounterMode): UNet forward at batch 2 (CFG), 4x96x96 = {fl['unet_cfg_batch2']:.3e} "
        f"({pr['unet'] / 1e6:.0f} M params); VAE decode 768 px = {fl['vae_decode']:.3e}; selector CLIP ViT-L/14 "
        f"{fl['clip']:.3e}/image; text encoder {fl['text']:.3e}/prompt; metric networks (CLIP, AlexNet, "
        f"Inception, EfficientNet, SwAV on recon + stimulus) {fl['metrics']:.3e}/item/β",
        "UNet rows per item = Σ_β int(steps·β) x candidates x 2 (CFG) (neurovision.pretrained.unclip."
        "unet_evaluations); VAE decodes = candidates per β > 0 + 1 for β = 0 (vae_decodes)",
    ]
    for a in arms:
        ca = c[a.name]
        calls = ca["calls"]
        arithmetic.append(
            f"  [{_arm_label(a)}] β {list(a.betas)} ({'+'.join(str(unet_steps(b, a.steps)) for b in a.betas)} of "
            f"{a.steps} steps): {calls['unet']} UNet rows + {calls['vae']} VAE decodes/item x "
            f"{int(ca['items']):,} items -> {ca['gpu_hours']:.2f} A100-h (UNet+VAE per β: "
            + ", ".join(f"{b}: {h:.2f}" for b, h in ca["per_beta_gpu_hours"].items()) + ")")
    arithmetic += [
        f"total {base['unet_evals']:.3e} UNet rows, {base['flops']:.3e} FLOPs / (0.4 x 312 TFLOP/s fp16, "
        f"estimated utilisation) = {gh:.2f} A100-h ({h100_hours(base['flops']):.2f} H100-h; "
        f"{gh / NODE['gpus']:.2f} h wall on 8 GPUs)",
        f"variants: every run at 50 steps {costs['steps_50']['gpu_hours']:.2f} A100-h; "
        + "; ".join(f"{k.replace('_', ' ')} (the best-of run over every β > 0) {v['gpu_hours']:.2f} A100-h"
                    for k, v in costs.items() if k.startswith("best")),
        f"GPU memory/GPU: weights (UNet + VAE + text encoder in {dtype_name}, CLIP + metric nets fp32) "
        f"{weights / GB:.2f} GB + max(UNet {act['unet']:.2f}, VAE decode {act['vae']:.2f}) GB activations at "
        f"{items_batch} items (x 2 CFG rows), tracked on fake tensors + {CUDA_OVERHEAD_GB} CUDA = {mem:.1f} GB",
        f"RAM: the ranks' shares of a run's reconstructions (uint8 768 px, every β) + rank 0's gathered stimuli "
        f"and one gathered β = {gather / GB:.0f} GB for the largest run + {NODE['gpus']} ranks x (weights {weights / GB:.1f} + {PROCESS_RAM_GB}) GB = "
        f"{ram:.0f} GB; disk (npz, uncompressed bound) {disk / GB:.0f} GB",
        f"CPU (fp32): UNet forward batch {b_meas} at 4x{latent}x{latent} {sec_meas:.1f} s ({real_flops:.3e} "
        f"FLOPs); batch 1 -> 2: FLOPs exponent {exponent:.2f} (the fits check), time exponent {t_exponent:.2f} (a shared 2-core CPU: noisy); VAE decode at {res['vae_image'][-1]} px "
        f"{res['vae_seconds']:.1f} s" + (f"; the CFG pair at 4x96x96 (768 px) {res['unet_full_seconds']:.1f} s "
                                          f"({fl['unet_cfg_batch2'] / res['unet_full_seconds'] / 1e9:.0f} GFLOP/s)"
                                          if "unet_full_seconds" in res else ""),
    ]
    row = Row("stage3_sweep", f"Stable unCLIP-small UNet ({pr['unet'] / 1e6:.0f} M, from_config) real CPU forwards "
              f"at 4x{latent}x{latent} + SD-2.1 VAE decode; FLOPs at 768 px on meta, memory on fake tensors; the "
              f"β sweep counted as the reconstructor runs it", measured,
              projected(ram_gb=ram, gpu_mem_gb=mem, disk_gb=disk / GB, gpu_hours=gh),
              arithmetic, True,
              f"the β sweep = {gh:.1f} A100-h with its defaults; {costs['steps_50']['gpu_hours']:.1f} at 50 steps",
              extra={"costs": {k: {"gpu_hours": v["gpu_hours"], "unet_evals": v["unet_evals"],
                                   "arms": {_arm_label(a): {"gpu_hours": v["arms"][a.name]["gpu_hours"],
                                                            "per_beta": {str(b): h for b, h in
                                                                         v["arms"][a.name]["per_beta_gpu_hours"]
                                                                         .items()}}
                                            for a in arms if a.name in v["arms"]}}
                               for k, v in costs.items()},
                     "flops": flops})
    row.fits_node = fits(row)
    return row


ROWS: dict[str, Callable[[argparse.Namespace], Row]] = {
    "stage2_train": stage2_train,
    "stage2_test": stage2_test,
    "stage3_sweep": stage3_sweep,
}

__all__ = ["ROWS", "Arm", "arm_cost", "decode_step_seconds", "default_arms", "eval_prompts_per_item",
           "extrapolate_layers", "item_calls", "llama_params", "lora_params", "stage2_gpu_memory_gb",
           "stage2_settings", "sweep_arms", "sweep_cost", "unet_steps"]
