"""The sweep's ``slurm`` launcher run as a cluster runs it: fake ``sbatch``/``srun``/``sacct``/``squeue``/
``scancel``/``scontrol`` (tests/fakes/slurm) on ``PATH`` run submitit's job arrays in the background with the
variables SLURM sets and answer submitit's ``sacct`` queries. Checked: the launcher block, the dry run's sbatch
script (= the one submitted), the results equal the local launcher's, a cancelled sweep resubmitted resumes
(finished work skipped), a preempted job is requeued and resumes its fit; the slow test does it with real
LightningCLI fits."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import submitit
import yaml
from submitit.slurm.slurm import SlurmInfoWatcher

from neurovision.cli.sweep import main as sweep_main
from neurovision.runs import sweep as sw
from tests.fakes.slurm import fake_slurm
from tests.fakes.slurm.jobs import FakeRunJob, fake_command
from tests.test_sweep import ROOT, STAGE1, TINY, _real_yaml, _write

BIN = ROOT / "tests" / "fakes" / "slurm" / "bin"
SLURM = {"name": "slurm", "partition": "gpu", "cpus_per_task": 2, "mem_gb": 8, "timeout_min": 30,
         "array_parallelism": 2, "setup": ["export NV_SETUP_RAN=1"],
         "slurm_additional_parameters": {"mail-type": "END"}}


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The fake SLURM on PATH (state under ``tmp_path``) and a fresh submitit watcher polling sacct every 2 s."""
    state = tmp_path / "slurm_state"
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_DIR", str(state))
    monkeypatch.setenv("FAKE_SLURM_PYTHON", sys.executable)
    monkeypatch.setattr(submitit.SlurmJob, "watcher", SlurmInfoWatcher(delay_s=2))
    return state


def _fake_sweep(tmp_path: Path, name: str, launcher: Any, epochs: int = 2, seeds: tuple[int, ...] = (0, 1),
                commands: tuple[str, ...] = ("fit", "test")) -> Path:
    doc: dict[str, Any] = {"configs": [str(STAGE1), str(TINY)], "commands": list(commands),
                           "args": [f"--trainer.max_epochs={epochs}"], "grid": {"model.init_args.dim": [32]},
                           "seeds": list(seeds), "out": str(tmp_path / name), "metrics": ["test/*", "val/*"]}
    if launcher is not None:
        doc["launcher"] = launcher
    return _write(tmp_path / f"{name}.yaml", doc)


def _results(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "results.csv").sort_values(["run", "metric"]).reset_index(drop=True)


def _status(out: Path, run: str) -> dict[str, Any]:
    return json.loads((out / run / "status.json").read_text())


def _wait(cond: Any, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _in_thread(args: list[str]) -> tuple[threading.Thread, list[int]]:
    rc: list[int] = []
    t = threading.Thread(target=lambda: rc.append(sweep_main(args)), daemon=True)
    t.start()
    return t, rc


# ------------------------------------------------------------------------------------------- launcher block
@pytest.mark.parametrize("launcher, msg", [
    ({"name": "slurm", "partion": "gpu"}, "launcher: unknown key 'partion'"),
    ({"name": "pbs"}, "launcher: name: expected one of local, slurm, got 'pbs'"),
    ({"partition": "gpu"}, "launcher: 'partition' is a slurm setting; the local launcher takes none"),
    ({"name": "slurm", "gpus_per_node": 0}, "launcher: gpus_per_node: expected a positive number, got 0"),
    ({"name": "slurm", "setup": "module load cuda"}, "launcher: setup: expected a list of shell lines"),
    ({"name": "slurm", "slurm_additional_parameters": ["x"]}, "launcher: slurm_additional_parameters: expected"),
    ([1], "launcher: expected local, slurm or a mapping"),
])
def test_the_launcher_block_is_checked_naming_the_file_and_the_key(tmp_path, launcher, msg, capsys):
    path = _fake_sweep(tmp_path, "s", launcher)
    with pytest.raises(sw.SweepError, match=re.escape(f"{path}: {msg}")):
        sw.load_sweep(path)
    assert sweep_main([str(path), "--dry_run"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_launcher_defaults_and_devices_per_run(tmp_path, capsys, monkeypatch):
    assert sw.load_sweep(_fake_sweep(tmp_path, "a", None)).launcher == sw.Launcher()
    assert sw.load_sweep(_fake_sweep(tmp_path, "b", "slurm")).launcher.name == "slurm"
    doc = yaml.safe_load(_fake_sweep(tmp_path, "c", {"name": "slurm"}).read_text())
    launcher = sw.load_sweep(_write(tmp_path / "c.yaml", {**doc, "devices_per_run": 4})).launcher
    assert launcher.gpus_per_node == 4  # one task with the run's GPUs
    with pytest.raises(sw.SweepError, match="gpus_per_node: 2 is fewer than devices_per_run"):
        sw.load_sweep(_write(tmp_path / "c.yaml", {**doc, "devices_per_run": 4,
                                                   "launcher": {"name": "slurm", "gpus_per_node": 2}}))
    # --parallel is the local launcher's; without sbatch the slurm launcher says so before anything starts
    path = _fake_sweep(tmp_path, "d", SLURM)
    assert sweep_main([str(path), "--parallel", "2"]) == 2
    assert "--parallel is the local launcher's" in capsys.readouterr().err
    monkeypatch.setenv("PATH", "/nonexistent")
    assert sweep_main([str(path)]) == 2
    assert "sbatch is not on PATH" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_dry_run_prints_the_sbatch_script_of_each_array(tmp_path, capsys):
    path = _fake_sweep(tmp_path, "dry", SLURM)
    assert sweep_main([str(path), "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert "2 runs, 2 to run" in out and "# ---- fit: the sbatch script of its job array (2 tasks)" in out
    fit = out.split("# ---- fit:")[1].split("# ---- test:")[0]
    for line in ("#SBATCH --array=0-1%2", "#SBATCH --partition=gpu", "#SBATCH --cpus-per-task=2",
                 "#SBATCH --mem=8GB", "#SBATCH --time=30", "#SBATCH --job-name=nv-dry-fit", "#SBATCH --mail-type=END",
                 "#SBATCH --signal=USR2@90", "export NV_SETUP_RAN=1"):
        assert line in fit, line
    slurm_dir = tmp_path / "dry" / "slurm"
    assert f"#SBATCH --output={slurm_dir}/%A_%a/%A_%a_0_log.out" in fit
    assert re.search(r"srun --unbuffered .* -u -m submitit.core._submit " + re.escape(f"{slurm_dir}/%j"), fit)
    assert "#SBATCH --job-name=nv-dry-test" in out.split("# ---- test:")[1]
    assert not (tmp_path / "dry").exists()  # a dry run writes nothing


# -------------------------------------------------------------------------------- the fake cluster, fast
def test_a_slurm_sweep_gives_the_local_sweeps_results(tmp_path, cluster, monkeypatch, capsys):
    """Two runs, fit then test, through the fake SLURM (one job array per command, the simulated LightningCLI
    command in each job) and through the local launcher: the same tables; status.json records the jobs."""
    monkeypatch.setattr(sw.launch, "run_command", fake_command)  # the local launcher's process
    assert sweep_main([str(_fake_sweep(tmp_path, "local", None)), "--parallel", "2"]) == 0
    monkeypatch.setattr(sw.launch, "RunJob", FakeRunJob)  # the cluster's: the same RunJob with the fake command
    path = _fake_sweep(tmp_path, "cluster", SLURM)
    capsys.readouterr()
    assert sweep_main([str(path), "--dry_run"]) == 0
    dry = capsys.readouterr().out
    assert sweep_main([str(path)]) == 0
    out = tmp_path / "cluster"
    local, remote = _results(tmp_path / "local"), _results(out)
    assert len(local) == 2 * 3 and list(local.columns) == list(remote.columns)
    pd.testing.assert_frame_equal(local, remote)
    # two arrays (fit, then test), submitted as the dry run printed them
    scripts = fake_slurm.submitted_scripts()
    assert len(scripts) == 2 and scripts[0].strip() in dry and scripts[1].strip() in dry
    record = json.loads((out / "slurm" / "submitted.json").read_text())
    assert [a["command"] for a in record["arrays"]] == ["fit", "test"]
    for run in ("dim=32__seed=0", "dim=32__seed=1"):
        st = _status(out, run)
        assert st["state"] == "done"
        for cmd, array in zip(("fit", "test"), record["arrays"], strict=True):
            (job,) = st["commands"][cmd]["jobs"]
            assert job["launcher"] == "slurm" and job["job_id"] == array["jobs"][run]
            assert re.fullmatch(r"\d+_[01]", job["job_id"]) and job["restart"] == 0
            assert Path(job["stdout"]).is_file() and Path(job["stderr"]).is_file()
            assert f"FakeRunJob {run} ['{cmd}']" in Path(job["stderr"]).read_text()
            assert Path(job["submission_file"]).read_text().strip() in dry
        # the LightningCLI process ran inside the SLURM task, with Lightning's SLURM environment off
        fit_log = (out / run / "fit.log").read_text()
        assert f"job {int(st['commands']['fit']['jobs'][0]['job_id'].split('_')[0]) + int(run[-1])} " \
               "name interactive" in fit_log
    # re-run: everything done, nothing submitted
    assert sweep_main([str(path)]) == 0
    assert len(fake_slurm.submitted_scripts()) == 2


def test_a_cancelled_slurm_sweep_resubmitted_resumes(tmp_path, cluster, monkeypatch, capsys):
    """scancel the fit array while the second run's fit is mid-way (the first run's fit done): the sweep reports
    it interrupted; run again, it resubmits only that fit, which resumes from its latest.ckpt, then the tests."""
    monkeypatch.setattr(sw.launch, "run_command", fake_command)
    assert sweep_main([str(_fake_sweep(tmp_path, "local", None, epochs=4))]) == 0
    monkeypatch.setattr(sw.launch, "RunJob", FakeRunJob)
    path = _fake_sweep(tmp_path, "cluster", {**SLURM, "array_parallelism": 1}, epochs=4)
    out = tmp_path / "cluster"
    first, second = out / "dim=32__seed=0", out / "dim=32__seed=1"
    second.mkdir(parents=True)
    (second / "hold").touch()  # its fit waits after each epoch while this exists
    thread, rc = _in_thread([str(path)])
    _wait(lambda: (second / "fit" / "checkpoints" / "latest.ckpt").is_file(), "the second fit's first epoch")
    assert (_status(out, first.name)["commands"]["fit"]["state"]) == "done"
    (array,) = {j.split("_")[0] for j in json.loads((out / "slurm" / "submitted.json").read_text())["arrays"][0]
                ["jobs"].values()}
    squeue = subprocess.run(["squeue", "-h", "-j", array, "-o", "%i %T"], capture_output=True, text=True, check=True)
    assert squeue.stdout.split() == [f"{array}_1", "RUNNING"]
    # what a second `neurovision sweep` (after a Ctrl-C of this one) would refuse to resubmit over
    assert sw.launch.active_jobs(out) == [(f"{array}_1", "RUNNING")]
    subprocess.run(["scancel", array], check=True)
    thread.join(60)
    assert rc == [1]
    err = capsys.readouterr().err
    assert "1 interrupted (run the sweep again to resume)" in err and "INTERRUPTED dim=32__seed=1: " in err
    st = _status(out, second.name)
    assert st["state"] == "interrupted" and st["commands"]["fit"]["state"] == "interrupted"
    assert "test" not in st["commands"] and "test" not in _status(out, first.name)["commands"]
    fit_files = {p: p.stat().st_mtime_ns for p in (first / "fit").rglob("*") if p.is_file()}

    assert sw.launch.active_jobs(out) == []
    (second / "hold").unlink()
    assert sweep_main([str(path)]) == 0  # resubmitted: the second fit (resumed), then both tests
    arrays = json.loads((out / "slurm" / "submitted.json").read_text())["arrays"]
    assert [(a["command"], sorted(a["jobs"])) for a in arrays] == [
        ("fit", [second.name]), ("test", [first.name, second.name])]
    assert {p: p.stat().st_mtime_ns for p in fit_files} == fit_files  # the finished fit was not redone
    st = _status(out, second.name)
    fit = st["commands"]["fit"]
    assert fit["attempts"] == 2 and fit["resumed_from"] == str(second / "fit/checkpoints/latest.ckpt")
    assert [j["job_id"] for j in fit["jobs"]] == [f"{array}_1", arrays[0]["jobs"][second.name]]
    assert _status(out, first.name)["commands"]["fit"]["attempts"] == 1
    pd.testing.assert_frame_equal(_results(tmp_path / "local"), _results(out))


def test_a_preempted_job_is_requeued_and_resumes_its_fit(tmp_path, cluster, monkeypatch):
    """SLURM's preemption/time-limit signal (USR2, as submitit's script asks) to a running fit: submitit calls
    RunJob.checkpoint and requeues the task (same job id); the requeued task resumes the fit from latest.ckpt."""
    monkeypatch.setattr(sw.launch, "run_command", fake_command)
    assert sweep_main([str(_fake_sweep(tmp_path, "local", None, epochs=4, seeds=(0,)))]) == 0
    monkeypatch.setattr(sw.launch, "RunJob", FakeRunJob)
    path = _fake_sweep(tmp_path, "cluster", SLURM, epochs=4, seeds=(0,))
    out = tmp_path / "cluster"
    run = out / "dim=32__seed=0"
    run.mkdir(parents=True)
    (run / "hold").touch()  # the fit waits after its first epoch
    thread, rc = _in_thread([str(path)])
    _wait(lambda: (run / "fit" / "checkpoints" / "latest.ckpt").is_file(), "the fit's first epoch")
    (job_id,) = json.loads((out / "slurm" / "submitted.json").read_text())["arrays"][0]["jobs"].values()
    assert "_" not in job_id  # one run: a plain job, not an array
    subprocess.run(["scancel", job_id, "--signal", "USR2"], check=True)
    (run / "hold").unlink()
    thread.join(90)
    assert rc == [0]
    st = _status(out, run.name)
    fit = st["commands"]["fit"]
    assert fit["attempts"] == 2 and fit["resumed_from"] == str(run / "fit/checkpoints/latest.ckpt")
    assert [(j["job_id"], j["restart"]) for j in fit["jobs"]] == [(job_id, 0), (job_id, 1)]
    assert len(st["preempted"]) == 1 and st["preempted"][0]["job"]["job_id"] == job_id
    assert "Caught signal SIGUSR2" in Path(fit["jobs"][0]["stderr"]).read_text()
    assert len(fake_slurm.submitted_scripts()) == 2  # fit and test arrays: the requeue is not a new submission
    pd.testing.assert_frame_equal(_results(tmp_path / "local"), _results(out))


# ------------------------------------------------------------------------------------ real LightningCLI runs
@pytest.mark.slow
def test_a_real_two_run_sweep_on_the_fake_cluster_equals_the_local_one(tiny_store, tmp_path, cluster):
    """The tiny stage-1 preset (2 seeds, 1-epoch fit) through LightningCLI: local launcher vs the fake SLURM."""
    store = tmp_path / "tiny.h5"  # the teacher cache is written beside the store
    shutil.copy(tiny_store, store)
    local = _real_yaml(tmp_path / "local.yaml", store, ["fit"], 1, ["val/average/*", "!val/*/sub-*"])
    assert sweep_main([str(local), "--out", str(tmp_path / "local"), "--parallel", "2"]) == 0
    doc = yaml.safe_load(local.read_text())
    cluster_yaml = _write(tmp_path / "cluster.yaml", {**doc, "launcher": {**SLURM, "array_parallelism": 2}})
    assert sweep_main([str(cluster_yaml), "--out", str(tmp_path / "cluster")]) == 0
    a, b = _results(tmp_path / "local"), _results(tmp_path / "cluster")
    assert len(a) > 0 and (a.drop(columns="value") == b.drop(columns="value")).all().all()
    assert ((a.value - b.value).abs() < 1e-6).all(), pd.concat([a, b.value], axis=1).to_string()
    for run in ("dim=32__seed=0", "dim=32__seed=1"):
        st = _status(tmp_path / "cluster", run)
        assert st["state"] == "done" and re.fullmatch(r"\d+_[01]", st["commands"]["fit"]["jobs"][0]["job_id"])


# ------------------------------------------------------------------------------------ the multi-node recipe
def test_the_multinode_fit_recipe_resolves_and_matches_its_allocation(monkeypatch):
    """experiments/slurm/fit_multinode.sbatch: its srun line parses with the NeuroVisionCLI parser (SLURM's
    variables filled from the script's own #SBATCH lines), the Lightning flags match the allocation as Lightning's
    SLURMEnvironment checks it, and the requeue signal is the one SLURMEnvironment listens to."""
    import shlex

    from lightning.fabric.plugins.environments import SLURMEnvironment

    path = ROOT / "experiments" / "slurm" / "fit_multinode.sbatch"
    text = path.read_text()
    opts = {k: v for k, v in re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", text, re.M)}
    (line,) = [ln for ln in text.replace("\\\n", " ").splitlines() if ln.lstrip().startswith("srun ")]
    nodes, per_node = int(opts["nodes"]), int(opts["ntasks-per-node"])
    slurm_env = {"SLURM_JOB_NUM_NODES": str(nodes), "SLURM_NNODES": str(nodes), "SLURM_NTASKS_PER_NODE": str(per_node),
                 "SLURM_NTASKS": str(nodes * per_node), "SLURM_JOB_NAME": opts["job-name"]}
    argv = [re.sub(r"\$\{(\w+)\}", lambda m: slurm_env[m.group(1)], a) for a in shlex.split(line)]
    assert argv[:3] == ["srun", "neurovision", "fit"]
    monkeypatch.chdir(ROOT)  # the recipe is submitted from the repository root
    trainer = sw.parse(argv[2:]).trainer
    assert (trainer.num_nodes, str(trainer.devices), trainer.strategy) == (nodes, str(per_node), "ddp")
    assert int(opts["gpus-per-node"]) == per_node and nodes > 1
    for k, v in slurm_env.items():
        monkeypatch.setenv(k, v)
    assert SLURMEnvironment.detect()  # Lightning picks its SLURM environment under srun
    env = SLURMEnvironment()
    env.validate_settings(num_devices=int(trainer.devices), num_nodes=trainer.num_nodes)  # raises on a mismatch
    assert env.auto_requeue and env.requeue_signal is not None and "requeue" in opts
    assert opts["signal"].split("@")[0] == env.requeue_signal.name
