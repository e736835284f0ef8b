"""The scale rehearsal's stage-2/3 rows (benchmarks/scale/rows_models.py): the cost arithmetic (fast) and a smoke
of the three rows at a tiny size (slow)."""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from benchmarks.scale import rows_models as rm
from benchmarks.scale.common import PROJECTED_KEYS, Scale

FLOPS = {"unet": 2.0e12, "vae": 5.0e12, "clip": 1.6e11, "text": 4.5e10, "metrics": 3.7e11}
BETAS = (0.0, 0.3, 0.5, 0.7, 0.85, 0.93, 1.0)


def _arm(**kw):
    base = dict(name="a", betas=BETAS, steps=25, guidance_scale=7.5, num_candidates=1, conditions=("average",),
                prompted=False)
    return rm.Arm(**{**base, **kw})


@pytest.mark.parametrize("steps", [25, 50])
def test_unet_steps_match_the_reconstructor_timesteps(steps):
    from diffusers import DDIMScheduler

    from neurovision.pretrained.unclip import UnCLIPReconstructor, denoising_steps

    duck = SimpleNamespace(scheduler=DDIMScheduler(), device="cpu")
    for beta in (*BETAS, 0.1, 0.55, 0.99):
        n = len(UnCLIPReconstructor.timesteps(duck, beta, steps))
        assert rm.unet_steps(beta, steps) == n == denoising_steps(beta, steps), beta


def test_beta_zero_adds_no_unet_calls_and_one_decode():
    zero = rm.item_calls(_arm(betas=(0.0,)))
    assert zero["unet"] == 0 and zero["vae"] == 1 and zero["text"] == 0
    with_zero = rm.item_calls(_arm(betas=(0.0, 0.5)))
    without = rm.item_calls(_arm(betas=(0.5,)))
    assert with_zero["unet"] == without["unet"] == 12 * 2  # int(25 * 0.5) steps x 2 CFG rows
    assert with_zero["vae"] == without["vae"] + 1


def test_item_calls_guidance_and_candidates():
    one = rm.item_calls(_arm(betas=(0.93,), guidance_scale=1.0))
    assert one["unet"] == 23
    assert rm.item_calls(_arm(betas=(0.93,)))["unet"] == 2 * 23
    best = rm.item_calls(_arm(betas=(0.93,), num_candidates=8))
    assert best["unet"] == 8 * 2 * 23 and best["vae"] == 8 and best["select"] == 8
    assert rm.item_calls(_arm())["unet"] == 2 * sum(math.floor(25 * b + 1e-9) for b in BETAS)


def test_sweep_cost_is_linear_in_items_and_moves_with_every_input():
    arm = _arm(conditions=("average", "single"))
    base = rm.arm_cost(arm, FLOPS)
    doubled = rm.arm_cost(dataclasses.replace(arm, items_per_subject=2 * arm.items_per_subject), FLOPS)
    assert doubled["gpu_hours"] == pytest.approx(2 * base["gpu_hours"])
    assert base["items"] == Scale.subjects * Scale.test_items * 2
    assert rm.arm_cost(arm, FLOPS, subjects=8)["gpu_hours"] == pytest.approx(2 * base["gpu_hours"])
    more_unet = rm.arm_cost(arm, {**FLOPS, "unet": 2 * FLOPS["unet"]})
    assert more_unet["gpu_hours"] > 1.8 * base["gpu_hours"]  # the UNet dominates
    fifty = rm.arm_cost(dataclasses.replace(arm, steps=50), FLOPS)
    assert fifty["unet_evals"] == pytest.approx(2 * base["unet_evals"], rel=0.03)
    assert sum(base["per_beta_gpu_hours"].values()) < base["gpu_hours"]  # + text encoder + metrics


def test_sweep_arms_read_the_shipped_nsd_sweep():
    arms, source = rm.sweep_arms()
    assert "beta_nsd.yaml" in source
    raw = yaml.safe_load(rm.SWEEP_YAML.read_text())
    assert len(arms) == len(raw["runs"])
    for arm, run in zip(arms, raw["runs"], strict=True):
        b = run["model.init_args.beta"]
        assert arm.betas == tuple(float(x) for x in (b if isinstance(b, list) else [b]))
        assert arm.num_candidates == run["model.init_args.num_candidates"]
        assert arm.prompted == (run["model.init_args.prompts"] is not None)
        assert list(arm.conditions) == run["data.init_args.eval_conditions"]
    s3 = yaml.safe_load(rm.STAGE3_YAML.read_text())["model"]["init_args"]
    assert {a.steps for a in arms} == {s3["steps"]}
    assert {a.guidance_scale for a in arms} == {s3["guidance_scale"]}


def test_sweep_arms_fall_back_to_the_brief_without_the_file(tmp_path):
    arms, source = rm.sweep_arms(tmp_path / "missing.yaml")
    assert "absent" in source and arms == rm.default_arms()
    cost = rm.sweep_cost(arms, FLOPS)
    # per image: 2 x 7 β (average, single) + 7 β prompted + best-of-8 at 0.93
    per_image = 3 * 2 * sum(rm.unet_steps(b, 25) for b in BETAS) + 8 * 2 * 23
    assert cost["unet_evals"] == Scale.subjects * Scale.test_items * per_image


def test_stage3_variants_cost_more():
    arms = rm.default_arms()
    costs = rm.stage3_costs(FLOPS, arms)
    assert costs["steps_50"]["gpu_hours"] > 1.8 * costs["default"]["gpu_hours"]
    assert costs["best_of_8_every_beta"]["gpu_hours"] > costs["default"]["gpu_hours"]


def test_llama_param_count_is_llama3_8b():
    cfg = rm.model_config("llama3_8b")
    p = rm.llama_params(cfg, extra_tokens=0)
    assert p["total"] == 8_030_261_248  # Meta-Llama-3-8B's published parameter count


def test_lora_params_match_peft_and_extrapolation_matches_a_direct_count():
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora = dict(r=4, lora_alpha=8, target_modules=targets, task_type="CAUSAL_LM")
    m = get_peft_model(LlamaForCausalLM(LlamaConfig(**cfg)), LoraConfig(**lora))
    n = sum(p.numel() for name, p in m.named_parameters() if "lora_" in name)
    assert rm.lora_params(cfg, 4, targets) == n
    with pytest.raises(ValueError, match="target_modules"):
        rm.lora_params(cfg, 4, ["qkv"])
    del m
    torch.manual_seed(0)
    f = {layers: rm._meta_llm_flops(cfg, layers, 2, 24, "lora", lora, True) for layers in (1, 2, 3)}
    _, _, total = rm.extrapolate_layers(f[1], f[2], 3)
    assert total == pytest.approx(f[3], rel=1e-6)
    fwd = rm._meta_llm_flops(cfg, 1, 2, 24, "forward", None, False)
    assert 2.5 * fwd < f[1] < 4.5 * fwd  # checkpointed fwd + recompute + backward (input grads)


def test_stage2_memory_terms():
    cfg = rm.model_config("llama3_8b")
    m16 = rm.stage2_gpu_memory_gb(cfg, 16, 198, 60e6)
    assert m16["weights"] == pytest.approx(16.06, abs=0.01)  # 8.03 B bf16
    m32 = rm.stage2_gpu_memory_gb(cfg, 32, 198, 60e6)
    assert m32["activations"] == pytest.approx(2 * m16["activations"])
    assert m32["logits_loss"] == pytest.approx(2 * m16["logits_loss"])
    full = rm.stage2_gpu_memory_gb(cfg, 16, 198, 60e6, checkpointing=False)
    assert full["activations"] > 10 * m16["activations"]
    assert m16["total"] == pytest.approx(sum(v for k, v in m16.items() if k != "total"))


def test_decode_is_bandwidth_bound_at_the_yaml_batch():
    cfg = rm.model_config("llama3_8b")
    s16, f16, b16 = rm.decode_step_seconds(16, 300, cfg)
    s32, _, _ = rm.decode_step_seconds(32, 300, cfg)
    assert s16 == pytest.approx(b16 / (0.4 * rm.A100_HBM_TBPS * 1e12))
    assert s32 < 1.2 * s16  # reading the weights dominates, not the batch


def test_stage2_settings_follow_the_yaml(tmp_path):
    st = rm.stage2_settings()
    raw = yaml.safe_load(rm.STAGE2_YAML.read_text())
    if isinstance(raw["data"], str):  # the stage's data group file, relative to the stage YAML
        raw["data"] = yaml.safe_load((rm.STAGE2_YAML.parent / raw["data"]).read_text())
    assert st["batch_size"] == raw["data"]["init_args"]["batch_size"] > 0
    assert st["epochs_b"] == raw["trainer"]["max_epochs"]
    assert st["phase_a"] == "projector" and st["lora"]["r"] == raw["model"]["init_args"]["lora"]["init_args"]["r"]
    changed = tmp_path / "s2.yaml"
    raw["trainer"]["max_epochs"] = 7
    changed.write_text(yaml.safe_dump(raw))
    assert rm.stage2_settings(changed)["epochs_b"] == 7
    with pytest.raises(FileNotFoundError, match="missing"):
        rm.stage2_settings(tmp_path / "nope.yaml")
    with pytest.raises(ValueError, match="eval_tasks"):
        rm.eval_prompts_per_item(["caption", "poetry"])


@pytest.mark.slow
def test_rows_smoke(tmp_path):
    ns = argparse.Namespace(quick=True, smoke=True, workdir=Path(tmp_path), seed=0, progress=False)
    for name, fn in rm.ROWS.items():
        row = fn(ns)
        assert row.stage == name
        assert set(row.projected) == set(PROJECTED_KEYS)
        assert row.projected["gpu_hours"] > 0 and row.projected["gpu_mem_gb"] > 0
        assert row.measured["seconds"] > 0 and row.measured["peak_rss_gb"] > 0
        assert row.fits_node, (name, row.arithmetic)
        assert row.arithmetic and all(isinstance(a, str) for a in row.arithmetic)
