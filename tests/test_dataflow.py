"""Data flows one way: store -> datamodule -> DataSpec -> task; the stage-2 tokenizer is linked by the CLI.

* no task under ``neurovision/tasks/`` reads ``trainer.datamodule`` (source check);
* a task validates and tests from dataloaders alone (no datamodule), with the same metrics as with one;
* ``DataSpec`` lives in ``neurovision.data.spec``; old imports and old pickles still load; checkpoints keep the
  sizes only;
* the stage-2 datamodule's tokenizer is the model's (same ids), linked from ``model.init_args.llm``.
"""

from __future__ import annotations

import ast
import dataclasses
import pickle
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "neurovision" / "tasks"


def _datamodule_reads(path: Path) -> set[tuple[str, str]]:
    """(file, enclosing function) of every ``<x>.datamodule`` attribute, ``datamodule_of`` name and
    ``getattr(<x>, "datamodule")`` in a module."""
    tree = ast.parse(path.read_text())
    found: set[tuple[str, str]] = set()

    def visit(node: ast.AST, func: str) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            func = node.name
        hit = (isinstance(node, ast.Attribute) and node.attr == "datamodule") \
            or (isinstance(node, ast.Name) and node.id == "datamodule_of") \
            or (isinstance(node, ast.Constant) and node.value == "datamodule")
        if hit:
            found.add((path.name, func))
        for child in ast.iter_child_nodes(node):
            visit(child, func)

    visit(tree, "<module>")
    return found


def test_no_task_reads_the_datamodule():
    reads: set[tuple[str, str]] = set()
    for p in sorted(TASKS.glob("*.py")):
        reads |= _datamodule_reads(p)
    assert len(list(TASKS.glob("*.py"))) >= 5  # the tasks are where the check looks
    assert reads == set(), "tasks read the data through their DataSpec, not trainer.datamodule"


def test_the_source_check_finds_a_read(tmp_path):
    p = tmp_path / "t.py"
    p.write_text("def f(self):\n    return self.trainer.datamodule.store\n"
                 "def g(t):\n    return datamodule_of(t)\n")
    assert _datamodule_reads(p) == {("t.py", "f"), ("t.py", "g")}


# ------------------------------------------------------------------------------------------ DataSpec
def test_dataspec_lives_in_the_data_layer_and_old_imports_and_pickles_load(tiny_store):
    from data_modules import FMRIDataModule
    from neurovision.data.spec import DataSpec
    from neurovision.data.store import Store
    from neurovision.tasks import DataSpec as TasksSpec
    from neurovision.tasks.base import DataSpec as OldSpec

    assert OldSpec is DataSpec and TasksSpec is DataSpec
    dm = FMRIDataModule(store=str(tiny_store), subjects=["sub-01", "sub-02"], eval_conditions=["single", "average"])
    spec = dm.spec
    st = Store(tiny_store)
    assert spec.subject_names == tuple(st.subject_names) and spec.eval_conditions == ("single", "average")
    assert spec.train_subjects == (0, 1) and spec.store == str(tiny_store)
    # an old pickle names neurovision.tasks.base.DataSpec and has the sizes only
    old = dataclasses.replace(spec, subject_names=(), eval_conditions=(), store="", train_subjects=())
    raw = pickle.dumps(old, protocol=0)
    assert b"neurovision.data.spec" in raw
    raw = raw.replace(b"neurovision.data.spec", b"neurovision.tasks.base")
    for name in ("subject_names", "eval_conditions", "store", "train_subjects"):  # fields the old class lacked
        raw = raw.replace(f"V{name}\n".encode(), b"Vunused_" + name.encode() + b"\n")
    back = pickle.loads(raw)
    assert back == spec and back.subject_names == () and back.patch_dim == spec.patch_dim
    # checkpoints keep the sizes (the old hyper_parameters/data_spec): names and conditions may change per run
    assert set(spec.sizes()) == {"num_active_patches", "patch_size", "grid_shape", "patch_coords", "num_subjects",
                                 "image_shape"}
    assert dataclasses.replace(spec, eval_conditions=("average",)) == spec


# -------------------------------------------------------------------------------- tasks without datamodule
def test_a_task_validates_and_tests_from_dataloaders_alone_with_the_same_metrics(tiny_store, tmp_path):
    import lightning as L

    from data_modules import FMRIDataModule
    from neurovision.pretrained.teachers import OpenCLIPImageTeacher
    from neurovision.tasks import AlignmentTask

    dm = FMRIDataModule(store=str(tiny_store), batch_size=8, eval_conditions=["single", "average"],
                        max_eval_items=6)
    clip = OpenCLIPImageTeacher(model_name="tiny_clip", model_config=str(ROOT / "experiments/teachers/tiny_clip.json"),
                                device="cpu")
    torch.manual_seed(0)
    task = AlignmentTask(data_spec=dm.spec, clip_teacher=clip, vae_teacher=None, dim=32, depth=1, heads=2,
                         head_hidden=32)

    def trainer() -> L.Trainer:
        return L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path))

    with_dm = trainer()
    ref = with_dm.test(task, datamodule=dm, verbose=False)
    dm.setup("test")
    alone = trainer()
    got = alone.test(task, dataloaders=dm.test_dataloader(), verbose=False)
    assert getattr(alone, "datamodule", None) is None
    assert got == ref
    keys = set(got[0]) | set(got[1])
    assert "test/single/retrieval_fmri2img" in keys and "test/average/retrieval_fmri2img" in keys
    assert any(f"/{dm.spec.subject_names[0]}/" in k for k in keys)  # per-subject names from the spec
    val = trainer().validate(task, dataloaders=dm.val_dataloader(), verbose=False)
    assert "val/average/clip_cosine" in set(val[0]) | set(val[1])


# ---------------------------------------------------------------------------------- stage-2 tokenizer
@pytest.fixture(scope="module")
def tiny_llm(tiny_store, tmp_path_factory):
    from neurovision.tiny.llm import build_tiny_llm

    return build_tiny_llm(tiny_store, tmp_path_factory.mktemp("dataflow") / "tiny_llm", vocab_size=384, hidden=48,
                          layers=2, heads=2, steps=1, progress=False)


def test_the_stage2_datamodule_tokenises_as_the_model(tiny_store, tiny_llm, tmp_path):
    from data_modules import InstructionDataModule
    from neurovision.data.instructions import FMRI_TOKEN, encode_chat
    from neurovision.pretrained.llm import CHAT_TEMPLATE, load_llm

    chat = [{"role": "user", "content": f"{FMRI_TOKEN}\nDescribe the image."},
            {"role": "assistant", "content": "A dog runs on the grass."}]
    template = tmp_path / "other.jinja"  # the chat template override reaches both
    template.write_text(CHAT_TEMPLATE.replace("<|start_header_id|>", "<|start_header_id|> "))
    for override in (None, str(template)):
        _, model_tok = load_llm(tiny_llm, chat_template=override)
        dm = InstructionDataModule(str(tiny_store), tokenizer=str(tiny_llm), chat_template=override)
        ids, labels = encode_chat(dm.tokenizer, chat, 256)
        assert (ids, labels) == encode_chat(model_tok, chat, 256)
        assert dm.tokenizer.convert_tokens_to_ids(FMRI_TOKEN) == model_tok.convert_tokens_to_ids(FMRI_TOKEN)
        assert dm.tokenizer.pad_token_id == model_tok.pad_token_id
    assert encode_chat(dm.tokenizer, chat, 256)[0] != encode_chat(load_llm(tiny_llm)[1], chat, 256)[0]
    with pytest.raises(ValueError, match="data.init_args.tokenizer is unset"):
        _ = InstructionDataModule(str(tiny_store)).tokenizer


def test_the_cli_links_the_llm_path_and_chat_template_to_the_datamodule():
    from neurovision.runs.lightning import NeuroVisionCLI

    class Parsed(NeuroVisionCLI):
        def instantiate_classes(self) -> None:  # the parsed config only
            pass

    cli = Parsed(args=["-c", "experiments/stage2_instruct.yaml", "--model.init_args.llm=/x/llm",
                       "--model.init_args.chat_template=/x/t.jinja"], run=False)
    assert cli.config.data.init_args.tokenizer == "/x/llm"
    assert cli.config.data.init_args.chat_template == "/x/t.jinja"
    s1 = Parsed(args=["-c", "experiments/stage1_vit3d.yaml"], run=False)  # no LLM: the links do nothing
    assert "tokenizer" not in s1.config.data.init_args


def test_a_linked_key_given_by_the_user_is_an_error_not_silently_replaced(tmp_path, capsys):
    """`data.init_args.tokenizer` / `chat_template` are filled from the model's keys by the CLI; jsonargparse would
    overwrite a user's value silently, so giving one (flag or -c YAML) is one error naming what to set instead."""
    from tests.helpers import run_cli

    s2 = ["-c", "experiments/stage2_instruct.yaml", "-c", "experiments/presets/stage2_instruct_tiny.yaml"]
    assert run_cli(["fit", *s2, "--data.init_args.tokenizer=/elsewhere", "--print_config"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--data.init_args.tokenizer" in err[0] and "model.init_args.llm" in err[0]
    extra = tmp_path / "tok.yaml"
    extra.write_text("data:\n  init_args:\n    chat_template: '{{ messages }}'\n")
    assert run_cli(["fit", *s2, "-c", str(extra), "--print_config"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(extra) in err[0] and "model.init_args.chat_template" in err[0]
    assert run_cli(["fit", *s2, "--print_config"]) == 0  # the links alone are fine
