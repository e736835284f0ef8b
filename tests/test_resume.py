"""Checkpoints are written atomically, ``fit --ckpt_path=last`` resumes the newest complete checkpoint of the run in
the run's own folder (also after a SIGKILL), and the checkpoint folder's leftovers cannot be mistaken for a
checkpoint (issue 19 §3)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from callbacks.latest_checkpoint import LatestCheckpoint
from neurovision.runs import checkpoints as ck
from neurovision.runs.lightning import NeuroVisionCLI
from tests.helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]
EXP = ROOT / "experiments"
LINEAR = ["-c", str(EXP / "baseline_linear.yaml"), "-c", str(EXP / "presets" / "cpu_tiny.yaml")]


class RecordStart(L.Callback):
    """Writes the epoch and step a fit starts at (``--trainer.callbacks+=`` in the tests below)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        Path(self.path).write_text(json.dumps({"epoch": trainer.current_epoch, "step": trainer.global_step}))


def _record(path: Path) -> str:
    return "--trainer.callbacks+=" + json.dumps({"class_path": "tests.test_resume.RecordStart",
                                                 "init_args": {"path": str(path)}})


def _common(store: Path, out: Path) -> list[str]:
    return [*LINEAR, f"--data.init_args.store={store}", f"--trainer.default_root_dir={out}",
            f"--trainer.logger.init_args.save_dir={out}", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", "--trainer.num_sanity_val_steps=0"]


# ------------------------------------------------------------------------------------------------ atomic writes
def test_a_failed_checkpoint_write_leaves_the_previous_file_and_no_partial_one(tmp_path, monkeypatch):
    target = tmp_path / "ckpts" / "epoch=1-step=10.ckpt"
    io = ck.AtomicCheckpointIO()
    io.save_checkpoint({"epoch": 1, "w": torch.ones(3)}, target)
    assert ck.is_complete(target) and torch.load(target, weights_only=True)["epoch"] == 1
    before = target.read_bytes()

    def disk_full(obj, f, *a, **k):  # half a checkpoint, then the disk is full
        f.write(b"PK\x03\x04" + b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        io.save_checkpoint({"epoch": 2}, target)
    with pytest.raises(OSError, match="No space"):
        io.save_checkpoint({"epoch": 2}, target.with_name("epoch=2-step=20.ckpt"))
    assert target.read_bytes() == before  # the old checkpoint, whole
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]  # no truncated or temp file


def test_a_full_disk_in_torch_save_is_one_line_naming_the_checkpoint(tmp_path, monkeypatch):
    """torch.save reports a full disk as a RuntimeError without an errno: with the disk (nearly) full it becomes
    the one-line disk-full error the CLI prints; other RuntimeErrors pass unchanged."""
    from neurovision.cli import user_error

    target = tmp_path / "ckpts" / "last.ckpt"

    def stream_writer_failed(obj, f, *a, **k):
        f.write(b"PK\x03\x04" + b"x" * 100)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(torch, "save", stream_writer_failed)
    monkeypatch.setattr(ck.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 10 << 30, 4096))
    with pytest.raises(OSError) as e:
        ck.AtomicCheckpointIO().save_checkpoint({"epoch": 1}, target)
    assert e.value.errno == errno.ENOSPC and str(target) in str(e.value)
    message = user_error(e.value, ["fit"])
    assert message is not None and "\n" not in message and str(target) in message and "disk full" in message
    assert not any(target.parent.iterdir())  # no partial file left
    monkeypatch.setattr(ck.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 1 << 30, 1 << 30))
    with pytest.raises(RuntimeError, match="PytorchStreamWriter"):  # space left: not a full disk
        ck.AtomicCheckpointIO().save_checkpoint({"epoch": 1}, target)


def test_a_killed_writers_temp_file_is_removed_by_the_next_save(tmp_path):
    from neurovision.data.atomic import _host

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".epoch=3-step=30.ckpt.{_host()}-{dead.pid}.abc.partial"  # SIGKILLed mid-write
    live = tmp_path / f".epoch=3-step=30.ckpt.{_host()}-{os.getpid()}.def.partial"  # a writer still running
    stale.write_bytes(b"PK" * 100)
    live.write_bytes(b"PK" * 100)
    ck.AtomicCheckpointIO().save_checkpoint({"epoch": 4}, tmp_path / "epoch=4-step=40.ckpt")
    assert not stale.exists() and live.exists() and ck.is_complete(tmp_path / "epoch=4-step=40.ckpt")


def test_writes_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    ck.AtomicCheckpointIO().save_checkpoint({"epoch": 0}, tmp_path / "a.ckpt")
    assert len(synced) >= 1 and ck.is_complete(tmp_path / "a.ckpt")


def test_a_truncated_checkpoint_is_not_complete(tmp_path):
    p = tmp_path / "a.ckpt"
    torch.save({"w": torch.zeros(1000)}, p)
    assert ck.is_complete(p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    assert not ck.is_complete(p)
    with pytest.raises(ck.CheckpointError, match="not a complete checkpoint"):
        ck.read_meta(p)


def test_every_trainer_writes_atomically_and_fit_keeps_latest(tiny_store, tmp_path):
    common = _common(tiny_store, tmp_path)
    cli = NeuroVisionCLI(args=common, run=False)
    assert isinstance(cli.trainer.strategy.checkpoint_io, ck.AtomicCheckpointIO)
    latest = [cb for cb in cli.trainer.callbacks if isinstance(cb, LatestCheckpoint)]
    assert len(latest) == 1 and cli.trainer.callbacks[-1] is latest[0]
    # the sweep's own LatestCheckpoint is not doubled; no checkpointing: none added (Lightning would refuse one)
    sweep_cb = json.dumps({"class_path": "callbacks.LatestCheckpoint", "init_args": {"dirpath": str(tmp_path)}})
    cli = NeuroVisionCLI(args=[*common, f"--trainer.callbacks+={sweep_cb}"], run=False)
    assert sum(type(cb).__name__ == "LatestCheckpoint" for cb in cli.trainer.callbacks) == 1
    cli = NeuroVisionCLI(args=[*common, "--trainer.enable_checkpointing=false", "--trainer.callbacks=[]"], run=False)
    assert not cli.trainer.checkpoint_callbacks


# ------------------------------------------------------------------------------------------------ which file
def _write(p: Path, epoch: int, complete: bool = True) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": epoch, "global_step": 10 * epoch}, p)
    if not complete:
        p.write_bytes(p.read_bytes()[:-30])
    return p


def test_last_is_the_newest_complete_checkpoint_of_the_newest_run(tmp_path):
    root = tmp_path / "tb"
    layout = ck.run_layout({"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                            "init_args": {"save_dir": str(tmp_path), "name": "tb", "version": None}}, None)
    assert layout.root == root and ck.find_last(layout) is None
    v0 = root / "version_0" / "checkpoints"
    _write(v0 / "epoch=1-step=10.ckpt", 1)  # the best epoch (last.ckpt of a monitored ModelCheckpoint)
    _write(v0 / "last.ckpt", 1)
    _write(v0 / "latest.ckpt", 4)  # the end of the latest epoch
    time.sleep(0.01)
    _write(v0 / "epoch=5-step=50.ckpt", 5, complete=False)  # truncated by a crash (before atomic writes)
    (root / "version_1").mkdir()  # a run killed before its first checkpoint
    _write(root / "version_2" / "checkpoints" / "latest.ckpt", 9, complete=False)
    assert ck.find_last(layout) == (v0 / "latest.ckpt", 0)
    # a run from before latest.ckpt: its newest complete file
    (v0 / "latest.ckpt").unlink()
    time.sleep(0.01)
    _write(v0 / "epoch=3-step=30.ckpt", 3)
    assert ck.find_last(layout) == (v0 / "epoch=3-step=30.ckpt", 0)
    # sharded (FSDP) checkpoints are folders: complete once .metadata and meta.pt are there
    time.sleep(0.01)
    _write(v0 / "epoch=4-step=40.ckpt" / "meta.pt", 4)
    assert ck.find_last(layout) == (v0 / "epoch=3-step=30.ckpt", 0)  # no .metadata yet: being written
    (v0 / "epoch=4-step=40.ckpt" / ".metadata").write_bytes(b"x")
    assert ck.find_last(layout) == (v0 / "epoch=4-step=40.ckpt", 0)
    assert ck.read_meta(v0 / "epoch=4-step=40.ckpt").epoch == 4
    # an explicit path inside a run's folder resumes that run there too; elsewhere: a new version
    assert ck.version_of(v0 / "epoch=3-step=30.ckpt", layout) == 0
    assert ck.version_of(tmp_path / "elsewhere.ckpt", layout) is None
    # a fixed version and no logger: one folder
    assert ck.run_layout({"class_path": "lightning.pytorch.loggers.CSVLogger",
                          "init_args": {"save_dir": "s", "name": None, "version": "fit"}}, None).fixed == \
        Path("s") / "fit" / "checkpoints"
    assert ck.run_layout(False, "d").fixed == Path("d") / "checkpoints"
    assert ck.run_layout(True, "d").root == Path("d") / "lightning_logs"


def test_fit_last_resumes_the_run_in_its_own_folder(tiny_store, tmp_path):
    store = tmp_path / "tiny.h5"
    shutil.copy(tiny_store, store)
    common = [*_common(store, tmp_path), "--trainer.limit_val_batches=1"]
    assert run_cli(["fit", *common, "--trainer.max_epochs=2"]) == 0
    ckdir = tmp_path / "tb" / "version_0" / "checkpoints"
    assert ck.read_meta(ckdir / "latest.ckpt").epoch == 1
    (tmp_path / "tb" / "version_1").mkdir()  # a later attempt killed before it wrote anything
    (ckdir / ".latest.ckpt.host-1.abc.partial").write_bytes(b"PK\x03\x04")  # a killed write's temp file
    start = tmp_path / "start.json"
    assert run_cli(["fit", *common, "--trainer.max_epochs=3", "--ckpt_path=last", _record(start)]) == 0
    assert json.loads(start.read_text())["epoch"] == 2  # continued after epoch 1, not from scratch
    assert sorted(p.name for p in (tmp_path / "tb").iterdir()) == ["version_0", "version_1"]  # its own folder
    assert ck.read_meta(ckdir / "latest.ckpt").epoch == 2
    import yaml

    cfg = yaml.safe_load((tmp_path / "tb" / "version_0" / "config.yaml").read_text())
    assert cfg["ckpt_path"] == str(ckdir / "latest.ckpt") and cfg["trainer"]["logger"]["init_args"]["version"] == 0


def test_test_last_without_any_checkpoint_is_an_error(tiny_store, tmp_path, capsys):
    assert run_cli(["test", *_common(tiny_store, tmp_path), "--ckpt_path=last"]) in (1, 2)
    err = capsys.readouterr().err
    assert "no complete checkpoint" in err and str(tmp_path / "tb") in err


@pytest.mark.slow
def test_sigkill_then_fit_last_resumes(tiny_store, tmp_path):
    """A real SIGKILL of a running fit (a subprocess), then ``fit --ckpt_path=last``."""
    store = tmp_path / "tiny.h5"
    shutil.copy(tiny_store, store)
    common = _common(store, tmp_path)
    cmd = [sys.executable, "-m", "neurovision.cli", "fit", *common]
    latest = tmp_path / "tb" / "version_0" / "checkpoints" / "latest.ckpt"
    proc = subprocess.Popen([*cmd, "--trainer.max_epochs=100000"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 300
        while not latest.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = ck.read_meta(latest)
    start = tmp_path / "start.json"
    res = subprocess.run([*cmd, f"--trainer.max_epochs={done.epoch + 2}", "--ckpt_path=last", _record(start)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"Restoring states from the checkpoint path at {latest}" in res.stdout + res.stderr
    rec = json.loads(start.read_text())
    assert rec["epoch"] == done.epoch + 1 and rec["step"] == done.global_step > 0
    assert [p.name for p in (tmp_path / "tb").iterdir()] == ["version_0"]
    assert ck.read_meta(latest).epoch == done.epoch + 1
