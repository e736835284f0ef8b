"""``validate/test/predict --ckpt_path``: values given on the command line or in ``-c`` files apply, the checkpoint
fills only what they leave unset, values fixed by training refuse to change, another store is named (issue 19 §2).

Most tests stop the CLI right before it instantiates anything (the merge is a config decision) and use
hand-written checkpoints holding only ``hyper_parameters``; one runs a real tiny stage-1 fit and test."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import pytest
import torch
import yaml

from neurovision.runs.checkpoints import CheckpointError, check_data_spec
from neurovision.runs.lightning import NeuroVisionCLI
from tests.helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]
EXP = ROOT / "experiments"
STAGE1 = ["-c", str(EXP / "stage1_vit3d.yaml"), "-c", str(EXP / "presets" / "stage1_vit3d_tiny.yaml")]
STAGE2 = ["-c", str(EXP / "stage2_instruct.yaml"), "-c", str(EXP / "presets" / "stage2_instruct_tiny.yaml")]
STAGE3 = ["-c", str(EXP / "stage3_reconstruct.yaml"), "-c", str(EXP / "presets" / "stage3_reconstruct_tiny.yaml")]
INSTANTIATOR = "lightning.pytorch.cli.instantiate_module"


class _Stop(Exception):
    pass


class _ParseOnly(NeuroVisionCLI):
    """Everything up to (and with) the checkpoint merge; stops before anything is instantiated."""

    def before_instantiate_classes(self) -> None:
        raise _Stop(self)


def _merged(argv: list[str]) -> dict:
    """The model init args the CLI would instantiate for ``argv``."""
    with pytest.raises(_Stop) as stop:
        _ParseOnly(args=argv)
    cli = stop.value.args[0]
    return cli.config[argv[0]].model.init_args.as_dict()


def _fake_ckpt(path: Path, class_path: str, **hparams) -> Path:
    torch.save({"epoch": 0, "global_step": 0,
                "hyper_parameters": {"_class_path": class_path, "_instantiator": INSTANTIATOR, **hparams}}, path)
    return path


@pytest.mark.parametrize("cmd", ["validate", "predict"])  # stages 2 and 3: test
def test_stage1_retrieval_draws_from_the_command_line_wins(tmp_path, cmd):
    ckpt = _fake_ckpt(tmp_path / "s1.ckpt", "neurovision.tasks.AlignmentTask", dim=64, retrieval_draws=30,
                      temperature=0.2)
    m = _merged([cmd, *STAGE1, "--model.init_args.retrieval_draws=5", f"--ckpt_path={ckpt}"])
    assert m["retrieval_draws"] == 5  # given: applies (Lightning's merge ran with the checkpoint's 30)
    assert m["temperature"] == 0.2  # given nowhere: the checkpoint's value, as trained
    assert m["dim"] == 64


def test_stage2_max_new_tokens_from_the_command_line_and_from_a_c_file_win(tmp_path):
    ckpt = _fake_ckpt(tmp_path / "s2.ckpt", "neurovision.tasks.InstructTask", llm="x", stage1="y", phase="lora",
                      max_new_tokens=6, clip_score_prefix="")
    assert _merged(["test", *STAGE2, "--model.init_args.max_new_tokens=40", f"--ckpt_path={ckpt}"])[
        "max_new_tokens"] == 40
    extra = tmp_path / "eval.yaml"
    extra.write_text("model:\n  init_args:\n    max_new_tokens: 33\n")
    assert _merged(["test", *STAGE2, "-c", str(extra), f"--ckpt_path={ckpt}"])["max_new_tokens"] == 33


def test_stage3_beta_and_num_candidates_from_the_command_line_win(tmp_path):
    ckpt = _fake_ckpt(tmp_path / "s3.ckpt", "neurovision.tasks.ReconstructionTask", stage1="a.ckpt",
                      reconstructor="r", beta=0.93, num_candidates=1, seed=3, prompt_type="caption")
    m = _merged(["test", *STAGE3, "--model.init_args.beta=[0.5, 1.0]", "--model.init_args.num_candidates=4",
                 f"--ckpt_path={ckpt}"])
    assert m["beta"] == [0.5, 1.0] and m["num_candidates"] == 4
    assert m["seed"] == 0  # the -c file's, not the checkpoint's 3
    assert m["prompt_type"] == "caption"  # unset by the config: the checkpoint's


def test_an_architecture_key_given_otherwise_is_one_error_naming_both_values(tmp_path, capsys):
    ckpt = _fake_ckpt(tmp_path / "s1.ckpt", "neurovision.tasks.AlignmentTask", dim=64, depth=2)
    with pytest.raises(CheckpointError, match=r"hyper_parameters/dim.*dim = 64.*model\.init_args\.dim = 32"):
        _ParseOnly(args=["test", *STAGE1, "--model.init_args.dim=32", f"--ckpt_path={ckpt}"])
    assert run_cli(["test", *STAGE1, "--model.init_args.depth=3", f"--ckpt_path={ckpt}"]) in (1, 2)  # a user error (cli.py: 2)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "depth = 2" in err[0] and "depth = 3" in err[0] and str(ckpt) in err[0]


def test_an_architecture_key_the_config_leaves_unset_comes_from_the_checkpoint(tmp_path):
    ckpt = _fake_ckpt(tmp_path / "s1.ckpt", "neurovision.tasks.AlignmentTask", dim=64, mlp_ratio=2.0)
    assert _merged(["test", *STAGE1, f"--ckpt_path={ckpt}"])["mlp_ratio"] == 2.0


def test_another_model_class_is_an_error(tmp_path):
    ckpt = _fake_ckpt(tmp_path / "lin.ckpt", "neurovision.tasks.LinearDecoder", thumbnail=8)
    with pytest.raises(CheckpointError, match="LinearDecoder.*AlignmentTask"):
        _ParseOnly(args=["test", *STAGE1, f"--ckpt_path={ckpt}"])


def test_data_spec_change_is_an_error_naming_the_field():
    spec = {"num_active_patches": 37, "patch_size": 4, "num_subjects": 4}
    check_data_spec(spec, dict(spec), "a.ckpt")
    with pytest.raises(CheckpointError, match=r"data_spec/num_subjects.*= 4.*= 2"):
        check_data_spec(spec, {**spec, "num_subjects": 2}, "a.ckpt")


# ------------------------------------------------------------------------------------- real runs, end to end
@pytest.mark.slow
def test_stage1_test_runs_with_the_flag_and_saves_what_ran(tiny_store, tmp_path, recwarn):
    """A real tiny stage-1 fit with retrieval_draws=7, then ``test --model.init_args.retrieval_draws=5``: the
    instantiated task, the saved config.yaml and hparams.yaml say 5."""
    store = tmp_path / "tiny.h5"
    shutil.copy(tiny_store, store)
    common = [*STAGE1, f"--data.init_args.store={store}", "--trainer.enable_progress_bar=false",
              "--trainer.enable_model_summary=false", "--trainer.num_sanity_val_steps=0"]
    fit = tmp_path / "fit"
    assert run_cli(["fit", *common, f"--trainer.default_root_dir={fit}", f"--trainer.logger.init_args.save_dir={fit}",
                    "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
                    "--model.init_args.retrieval_draws=7"]) == 0
    ckpt = fit / "tb" / "version_0" / "checkpoints" / "latest.ckpt"
    assert torch.load(ckpt, weights_only=True, mmap=True)["hyper_parameters"]["retrieval_draws"] == 7
    out = tmp_path / "test"
    cli = NeuroVisionCLI(args=["test", *common, f"--trainer.default_root_dir={out}",
                               f"--trainer.logger.init_args.save_dir={out}", "--trainer.limit_test_batches=1",
                               "--model.init_args.retrieval_draws=5", f"--ckpt_path={ckpt}"])
    assert cli.model.retrieval_draws == 5
    run = out / "tb" / "version_0"
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["init_args"]["retrieval_draws"] == 5
    assert yaml.safe_load((run / "hparams.yaml").read_text())["retrieval_draws"] == 5
    assert not [w for w in recwarn if "fingerprint" in str(w.message)]  # same store: nothing to say


LINEAR = ["-c", str(EXP / "baseline_linear.yaml"), "-c", str(EXP / "presets" / "cpu_tiny.yaml")]


@pytest.fixture(scope="module")
def linear_fit(tiny_store, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stores")
    store = tmp / "tiny.h5"
    shutil.copy(tiny_store, store)
    common = [*LINEAR, "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
              "--trainer.num_sanity_val_steps=0", "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1"]
    fit = tmp / "fit"
    assert run_cli(["fit", *common, f"--data.init_args.store={store}", f"--trainer.default_root_dir={fit}",
                    f"--trainer.logger.init_args.save_dir={fit}", "--trainer.max_epochs=1"]) == 0
    ckpt = fit / "tb" / "version_0" / "checkpoints" / "latest.ckpt"
    assert ckpt.is_file()
    return tmp, store, common, ckpt


def _other_store(store: Path, dst: Path) -> Path:
    shutil.copy(store, dst)
    with h5py.File(dst, "r+") as f:
        f.attrs["fingerprint"] = "0" * 64
    return dst


def _run(tmp: Path, name: str) -> list[str]:
    return [f"--trainer.default_root_dir={tmp / name}", f"--trainer.logger.init_args.save_dir={tmp / name}"]


def test_test_on_another_store_warns_once_naming_both(linear_fit, recwarn):
    tmp, store, common, ckpt = linear_fit
    assert run_cli(["test", *common, f"--data.init_args.store={store}", *_run(tmp, "same"),
                    f"--ckpt_path={ckpt}"]) == 0
    assert not [w for w in recwarn if "fingerprint" in str(w.message)]  # the training store: nothing to say
    other = _other_store(store, tmp / "other.h5")
    assert run_cli(["test", *common, f"--data.init_args.store={other}", *_run(tmp, "other"),
                    f"--ckpt_path={ckpt}"]) == 0
    msgs = [str(w.message) for w in recwarn if "fingerprint" in str(w.message)]
    assert len(msgs) == 1 and str(store) in msgs[0] and str(other) in msgs[0]


def test_fit_resume_on_another_store_refuses_naming_both(linear_fit, capsys):
    tmp, store, common, ckpt = linear_fit
    other = _other_store(store, tmp / "other2.h5")
    assert run_cli(["fit", *common, f"--data.init_args.store={other}", *_run(tmp, "fit_other"),
                    "--trainer.max_epochs=2", f"--ckpt_path={ckpt}"]) in (1, 2)  # a user error (cli.py: 2)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(store) in err[0] and str(other) in err[0] and "fingerprint" in err[0]
