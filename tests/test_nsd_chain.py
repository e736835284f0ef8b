"""The chain on a store converted from NSD's public layout (the fake, with COCO instances): stage 2's shipped YAML
trains and evaluates all six instruction types, its SD prompts condition stage 3, and `localize` maps COCO
concept words. Tiny models, a few steps each."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from tests.fakes.nsd import CATEGORIES, make_fake_nsd
from tests.helpers import last_version, run_cli, run_dirs

S1 = ["-c", "experiments/stage1_vit3d.yaml", "-c", "experiments/presets/stage1_vit3d_tiny.yaml"]
S2 = ["-c", "experiments/stage2_instruct.yaml", "-c", "experiments/presets/stage2_instruct_tiny.yaml"]
S3 = ["-c", "experiments/stage3_reconstruct.yaml", "-c", "experiments/presets/stage3_reconstruct_tiny.yaml"]
ITEMS = 4  # evaluated (subject, image) items per condition
EVAL = "[caption, description, reasoning, sd_prompt, concept]"


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from neurovision.sources import nsd
    from neurovision.tiny.llm import build_tiny_llm

    root = tmp_path_factory.mktemp("nsd_chain")
    fake = make_fake_nsd(root / "nsd", subjects=(1, 2), n_sessions=2, trials_per_session=30)
    store = nsd.prepare(fake, root / "nsd.h5", subjects=[1, 2], patch_size=4, image_size=32)
    s1 = root / "s1"
    assert run_cli(["fit", *S1, *run_dirs(s1), f"--data.init_args.store={store}", "--trainer.max_epochs=1",
                    "--trainer.limit_train_batches=3", "--data.init_args.subjects=null"]) == 0
    ckpt = last_version(s1) / "checkpoints" / "last.ckpt"
    llm = build_tiny_llm(store, root / "tiny_llm", vocab_size=384, hidden=48, layers=2, heads=2, steps=3,
                         progress=False)
    common = [*S2, f"--data.init_args.store={store}", f"--model.init_args.llm={llm}",
              f"--model.init_args.stage1={ckpt}", f"--data.init_args.max_eval_items={ITEMS}",
              "--model.init_args.max_new_tokens=6", "--data.init_args.subjects=null",
              f"--data.init_args.eval_tasks={EVAL}"]
    b = root / "b"
    assert run_cli(["fit", *common, *run_dirs(b), "--trainer.limit_train_batches=6", "--trainer.limit_val_batches=1"]) == 0
    return {"root": root, "store": store, "s1": s1, "ckpt": ckpt, "common": common, "b": last_version(b)}


def test_stage2_trains_all_six_types_on_nsd(chain) -> None:
    from data_modules.instruct import InstructionDataModule

    dm = InstructionDataModule(chain["store"], tokenizer=str(chain["root"] / "tiny_llm"), max_length=160)
    dm.setup("fit")
    assert dm.tasks == ["caption", "description", "reasoning", "dialogue", "sd_prompt", "concept"]  # the YAML's
    ds = dm.datasets["train"]
    seen = {ds[(i, 0)]["type"] for i in range(0, len(ds), 3)}
    assert seen == set(dm.tasks)
    cfg = (chain["b"] / "config.yaml").read_text()
    assert "- dialogue" in cfg and "- concept" in cfg


def test_stage2_test_scores_every_type_with_coco_words(chain) -> None:
    d = chain["root"] / "t"
    ck = chain["b"] / "checkpoints" / "last.ckpt"
    assert run_cli(["test", *chain["common"], *run_dirs(d), f"--ckpt_path={ck}",
                    "--data.init_args.eval_conditions=[average]"]) == 0
    v = last_version(d)
    names = {r["metric"] for r in csv.DictReader(open(v / "metrics_table.csv"))}
    for m in ("caption/CIDEr", "description/CIDEr", "sd_prompt/CIDEr", "reasoning/exact_match/all",
              "reasoning/exact_match/count", "reasoning/exact_match/presence"):
        assert f"test/average/{m}" in names, m
    gens = [json.loads(line) for line in open(v / "test_generations_average.jsonl")]
    assert {g["type"] for g in gens} == {"caption", "description", "reasoning", "sd_prompt", "concept"}
    words = {g["concept"] for g in gens if g["type"] == "concept"}
    assert words and words <= set(CATEGORIES.values())  # COCO's words, not the phantom's


def test_stage3_takes_the_llms_prompts_and_localize_takes_coco_words(chain, tmp_path, monkeypatch) -> None:
    import torch

    from neurovision.pretrained.teachers import VAETeacher
    from neurovision.tasks.reconstruct import ReconstructionTask
    from neurovision.tiny.unclip import build_tiny_unclip

    p = chain["root"] / "p"
    assert run_cli(["predict", *chain["common"], *run_dirs(p), f"--model.init_args.adapter={chain['b'] / 'adapters'}",
                    "--data.init_args.eval_tasks=[sd_prompt]", "--data.init_args.eval_conditions=[average]"]) == 0
    preds = last_version(p) / "predictions.jsonl"
    rows = [json.loads(line) for line in open(preds)]
    assert len(rows) == ITEMS and {r["type"] for r in rows} == {"sd_prompt"}

    torch.manual_seed(0)
    vae = VAETeacher(config="tiny", image_size=64, device="cpu")
    rec = build_tiny_unclip(vae.vae, 128, ["a bus", "two people and a dog"], width=32)
    rec.save_pretrained(tmp_path / "unclip")
    common = [*S3, f"--data.init_args.store={chain['store']}", f"--model.init_args.stage1={chain['ckpt']}",
              f"--model.init_args.reconstructor={tmp_path / 'unclip'}", "--model.init_args.beta=0.5",
              "--data.init_args.eval_conditions=[average]", f"--data.init_args.max_eval_items={ITEMS}",
              "--data.init_args.subjects=null"]
    used: dict[tuple[int, int], str] = {}
    original = ReconstructionTask._prompts

    def record(self, subject, stimulus, averaged):
        out = original(self, subject, stimulus, averaged)
        used.update({(int(a), int(b)): t for a, b, t in zip(subject, stimulus, out, strict=True)})
        return out

    monkeypatch.setattr(ReconstructionTask, "_prompts", record)
    assert run_cli(["test", *common, *run_dirs(tmp_path / "r1"), f"--model.init_args.prompts={preds}"]) == 0
    assert used == {(r["subject"], r["stimulus"]): r["prediction"] for r in rows}  # each item, its own prompt
    assert np.load(last_version(tmp_path / "r1") / "reconstructions_average.npz")["images"].shape[0] == ITEMS

    out = tmp_path / "maps"
    assert run_cli(["localize", "--ckpt", str(chain["ckpt"]), "--out", str(out), "--png", "none",
                    "--device", "cpu"]) == 0
    words = {x.name.removesuffix(".nii.gz").replace("_", " ") for x in (out / "subj01").glob("*.nii.gz")}
    from neurovision.data.store import Store

    present = {w for ws in Store(chain["store"]).annotations("concepts") for w in ws}
    assert len(words) >= 3 and words <= present <= set(CATEGORIES.values())  # COCO words of the test images
