"""Stage 2 end to end on the tiny phantom: phase A (projector), phase B (LoRA), test metrics, predict JSONL."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from tests.helpers import last_version, run_cli, run_dirs

S1 = ["-c", "experiments/stage1_vit3d.yaml", "-c", "experiments/presets/stage1_vit3d_tiny.yaml"]
S2 = ["-c", "experiments/stage2_instruct.yaml", "-c", "experiments/presets/stage2_instruct_tiny.yaml"]
PHASE_A = ["-c", "experiments/presets/stage2_instruct_phase_a.yaml"]


_root = run_dirs
_version = last_version


@pytest.fixture(scope="module")
def parts(tiny_store, tmp_path_factory):
    """A 1-epoch tiny stage-1 checkpoint and a tiny Llama built from the tiny store's text."""
    from neurovision.tiny.llm import build_tiny_llm

    root = tmp_path_factory.mktemp("stage2")
    s1 = root / "s1"
    assert run_cli(["fit", *S1, *_root(s1), f"--data.init_args.store={tiny_store}", "--trainer.max_epochs=1",
                    "--trainer.limit_train_batches=4"]) == 0
    llm = build_tiny_llm(tiny_store, root / "tiny_llm", vocab_size=384, hidden=48, layers=2, heads=2, steps=3,
                         progress=False)
    common = [*S2, f"--data.init_args.store={tiny_store}", f"--model.init_args.llm={llm}",
              f"--model.init_args.stage1={_version(s1) / 'checkpoints' / 'last.ckpt'}",
              "--data.init_args.max_eval_items=4", "--model.init_args.max_new_tokens=6"]
    short = ["--trainer.limit_train_batches=6", "--trainer.limit_val_batches=1"]
    a = root / "a"
    assert run_cli(["fit", *common, *PHASE_A, *_root(a), *short]) == 0
    a_ckpt = _version(a) / "checkpoints" / "last.ckpt"
    b = root / "b"
    assert run_cli(["fit", *common, *_root(b), *short, f"--model.init_args.init_from={a_ckpt}"]) == 0
    return {"root": root, "llm": llm, "s1": _version(s1) / "checkpoints" / "last.ckpt", "common": common,
            "a": _version(a), "b": _version(b), "store": tiny_store}


def _state(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


def test_phase_a_trains_the_projector_only(parts):
    sd = _state(parts["a"] / "checkpoints" / "last.ckpt")
    assert any(k.startswith("projector.") for k in sd)
    assert not any(k.startswith("llm.") for k in sd), "frozen LLM weights must stay out of the checkpoint"
    s1 = _state(parts["s1"])
    for k, v in s1.items():  # the ViT3D is frozen: identical to stage 1
        if k.startswith("encoder."):
            torch.testing.assert_close(sd[k], v, rtol=0, atol=0)
    # the projector moved away from its initialisation
    from neurovision.tasks.instruct import InstructTask  # noqa: F401  (import check)

    assert (parts["a"] / "adapters" / "fmri_projector.safetensors").is_file()
    assert not (parts["a"] / "adapters" / "llm").exists()


def test_phase_b_trains_lora_adapters_from_the_phase_a_projector(parts):
    sd = _state(parts["b"] / "checkpoints" / "last.ckpt")
    lora = {k: v for k, v in sd.items() if "lora_" in k}
    assert lora and all(k.startswith("llm.") for k in lora)
    assert not [k for k in sd if k.startswith("llm.") and "lora_" not in k], "base LLM weights must not be saved"
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k), "LoRA B starts at 0 and must move"
    assert (parts["b"] / "adapters" / "llm" / "adapter_config.json").is_file()


def _task(parts, phase="lora", **kw):
    from peft import LoraConfig

    from data_modules import InstructionDataModule
    from neurovision.data.store import Store
    from neurovision.tasks.instruct import InstructTask

    dm = InstructionDataModule(parts["store"])
    spec = dm.spec
    Store(parts["store"]).close()
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    return InstructTask(spec, llm=str(parts["llm"]), stage1=str(parts["s1"]), phase=phase, lora=cfg,
                        max_new_tokens=6, **kw)


def _prompt_batch(task, parts):
    from data_modules.fmri import FMRITrials
    from data_modules.instruct import Collate, EvalInstructions
    from neurovision.data.store import Store

    store = Store(parts["store"])
    ds = EvalInstructions(FMRITrials(store, "test", [0, 1], "average"), task.tokenizer, ["caption"], 160, 3)
    return Collate(task.tokenizer.pad_token_id)([ds[i] for i in range(len(ds))])


def test_adapters_round_trip_through_save_pretrained(parts, tmp_path):
    from neurovision.tasks.instruct import InstructTask

    ckpt = torch.load(parts["b"] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    trained = _task(parts)
    trained.load_state_dict(ckpt["state_dict"], strict=False)
    trained.eval()
    saved = trained.save_adapters(tmp_path / "adapters")
    fresh = _task(parts, adapter=str(saved)).eval()
    batch = _prompt_batch(trained, parts)
    assert trained.generate(batch) == fresh.generate(batch)
    for (n1, p1), (n2, p2) in zip(trained.named_parameters(), fresh.named_parameters(), strict=True):
        assert n1 == n2
        torch.testing.assert_close(p1, p2, rtol=0, atol=0)
    untrained = _task(parts).eval()  # adapters really changed something
    assert any(not torch.equal(p1, p2) for (n1, p1), (_, p2) in
               zip(trained.named_parameters(), untrained.named_parameters(), strict=True) if "lora_B" in n1)
    assert isinstance(fresh, InstructTask)


def test_test_writes_generations_and_caption_metrics_per_condition(parts):
    d = parts["root"] / "t"
    ck = parts["b"] / "checkpoints" / "last.ckpt"
    assert run_cli(["test", *parts["common"], *_root(d), f"--ckpt_path={ck}"]) == 0
    v = _version(d)
    rows = list(csv.DictReader(open(v / "metrics_table.csv")))
    names = {r["metric"] for r in rows}
    for cond in ("average", "single"):
        assert f"test/{cond}/caption/CIDEr" in names and f"test/{cond}/caption/BLEU-4" in names
        assert f"test/{cond}/reasoning/exact_match/all" in names
        assert f"test/{cond}/caption/CLIP-S" in names
        gens = [json.loads(line) for line in open(v / f"test_generations_{cond}.jsonl")]
        assert {g["type"] for g in gens} == {"caption", "reasoning"}
        assert sum(g["type"] == "caption" for g in gens) == 4  # max_eval_items (subject, image) items
        assert len({g["subject"] for g in gens}) > 1  # spread over the subjects
        scores = json.loads((v / f"test_scores_{cond}.json").read_text())
        assert "caption/SPICE" in scores  # None where SPICE is unavailable, never a made-up number


def test_predict_writes_one_jsonl_row_per_prompt(parts):
    d = parts["root"] / "p"
    assert run_cli(["predict", *parts["common"], *_root(d), f"--model.init_args.adapter={parts['b'] / 'adapters'}"]) == 0
    rows = [json.loads(line) for line in open(_version(d) / "predictions.jsonl")]
    assert rows and all({"subject", "stimulus", "type", "question", "prediction"} <= set(r) for r in rows)
    assert sum(r["type"] == "caption" for r in rows) == 4


def test_missing_llm_and_stage1_and_mismatched_store_name_the_yaml_key(parts, tmp_path):
    from neurovision.tasks.instruct import InstructTask

    spec = _task(parts).spec
    with pytest.raises(FileNotFoundError, match="model.init_args.llm"):
        InstructTask(spec, llm=str(tmp_path / "nope"), stage1=str(parts["s1"]))
    with pytest.raises(FileNotFoundError, match="stage-1 checkpoint does not exist"):
        InstructTask(spec, llm=str(parts["llm"]), stage1=str(tmp_path / "none.ckpt"))
    import dataclasses

    other = dataclasses.replace(spec, patch_size=spec.patch_size + 1)
    with pytest.raises(ValueError, match="data_spec/patch_size"):
        InstructTask(other, llm=str(parts["llm"]), stage1=str(parts["s1"]))
    with pytest.raises(ValueError, match="lora"):
        InstructTask(spec, llm=str(parts["llm"]), stage1=str(parts["s1"]), phase="lora")


@pytest.mark.parametrize("phase", ["projector", "lora", "full"])
def test_each_phase_trains_what_it_says_and_checkpoints_it(parts, phase):
    t = _task(parts, phase=phase)
    trainable = {n for n, p in t.named_parameters() if p.requires_grad}
    assert any(n.startswith("projector.") for n in trainable)
    assert not any(n.startswith(("encoder.", "clip_head.")) for n in trainable)  # tune_encoder off
    llm = {n for n, _ in t.named_parameters() if n.startswith("llm.")}
    if phase == "projector":
        assert not trainable & llm
    elif phase == "lora":
        assert trainable & llm and all("lora_" in n for n in trainable & llm)
    else:
        assert llm <= trainable
    ckpt = {"state_dict": t.state_dict()}
    t.on_save_checkpoint(ckpt)
    saved_llm = {k for k in ckpt["state_dict"] if k.startswith("llm.")}
    if phase == "full":
        assert llm <= saved_llm  # the whole LLM is trained, so it is saved
    else:
        assert saved_llm == llm & trainable  # only the trained part of the LLM is saved
    t.on_load_checkpoint(ckpt)  # everything trained is there
    ckpt["state_dict"].pop(next(iter(sorted(trainable))))
    with pytest.raises(ValueError, match="state_dict/"):
        t.on_load_checkpoint(ckpt)


def test_an_llm_without_chat_template_needs_one_from_yaml(parts, tmp_path):
    import json as _json
    import shutil

    from neurovision.pretrained.llm import CHAT_TEMPLATE, load_llm

    bare = tmp_path / "bare_llm"
    shutil.copytree(parts["llm"], bare)
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    cfg = _json.loads((bare / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(_json.dumps(cfg))
    with pytest.raises(ValueError, match="model.init_args.chat_template"):
        load_llm(bare)
    (tmp_path / "t.jinja").write_text(CHAT_TEMPLATE)
    _, tok = load_llm(bare, chat_template=str(tmp_path / "t.jinja"))
    assert tok.chat_template == CHAT_TEMPLATE
    with pytest.raises(FileNotFoundError, match="chat template file does not exist"):
        load_llm(bare, chat_template=str(tmp_path / "missing.jinja"))


def test_clip_token_appends_the_stage1_clip_prediction_with_its_readout(parts, tmp_path):
    """`clip_token`: one more fMRI token, the projected stage-1 CLIP prediction (head + read-out); it is saved
    with the adapters, and an adapter folder without it is refused."""
    from neurovision.tasks.instruct import InstructTask

    plain, task = _task(parts).eval(), _task(parts, clip_token=True).eval()
    task.projector.load_state_dict(plain.projector.state_dict())  # two builds draw two random projectors
    assert task.hparams["clip_token"] is True and "clip_token" in InstructTask.IMMUTABLE_HPARAMS
    batch = _prompt_batch(task, parts)
    with torch.no_grad():
        base = plain.fmri_tokens(batch["patches"])
        tok = task.fmri_tokens(batch["patches"])
    assert tok.shape == (base.shape[0], base.shape[1] + 1, base.shape[2])
    torch.testing.assert_close(tok[:, :-1], base, rtol=0, atol=0)  # the ViT3D tokens are unchanged
    with torch.no_grad():
        cls = task.encoder(batch["patches"]).cls
        want = task.clip_projector(torch.nn.functional.normalize(task.clip_head(cls), dim=-1))
    torch.testing.assert_close(tok[:, -1], want)

    class Shift(torch.nn.Module):  # a read-out that moves every prediction: the token must follow it
        def forward(self, patches):
            d = task.clip_head[-1].out_features
            return torch.full((patches.shape[0], d), 5.0) * torch.arange(d).float()

    task.skip = Shift()
    with torch.no_grad():
        moved = task.fmri_tokens(batch["patches"])
    assert not torch.allclose(moved[:, -1], tok[:, -1])
    torch.testing.assert_close(moved[:, :-1], tok[:, :-1], rtol=0, atol=0)
    task.skip = None

    with torch.no_grad():
        for p in task.clip_projector.parameters():
            p.add_(0.1)
    saved = task.save_adapters(tmp_path / "with_clip")
    fresh = _task(parts, clip_token=True, adapter=str(saved)).eval()
    for a, b in zip(task.clip_projector.parameters(), fresh.clip_projector.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    without = plain.save_adapters(tmp_path / "without_clip")
    with pytest.raises(ValueError, match="clip_projector"):
        _task(parts, clip_token=True, adapter=str(without))
