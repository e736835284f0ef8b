"""Teachers, scorers and selectors run on each rank's own device (issue 17, wall 3).

LightningCLI builds the teachers while parsing, before Lightning gives each DDP rank its device: construction must
not touch an accelerator, and a task places its teachers on ``trainer.strategy.root_device`` before using them.
On a CPU every rank's root device is ``cpu``, which would hide a teacher left on the wrong rank's device, so the
tests give each rank a distinct CPU device object (``cpu:0``, ``cpu:1``: the same memory, but a rank that put its
teacher on another rank's device, or left it where it was built, records a different device) and the teachers
record the device of every ``encode`` call.

The recording teachers live in this module (importable by the spawned ranks).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch

from neurovision.pretrained.teachers import (
    OpenCLIPImageTeacher,
    TeacherCache,
    VAETeacher,
    place,
    placed,
    release,
)

ROOT = Path(__file__).resolve().parents[1]
TINY_CLIP = str(ROOT / "experiments" / "teachers" / "tiny_clip.json")


# --------------------------------------------------------------------------------------------- recorders
class _Records:
    """Mixin: every ``encode`` / ``encode_text`` call records the teacher's device (and where its weights were),
    in ``self.calls`` and, with ``record`` set, as a line of ``<record>/rank<r>.jsonl`` (spawned ranks)."""

    record: str | None

    def _note(self, what: str) -> None:
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        entry = {"what": what, "teacher": type(self).__name__, "device": str(self.device),  # type: ignore[attr-defined]
                 "weights": str(self.weights_device), "rank": rank}  # type: ignore[attr-defined]
        self.calls.append(entry)
        if self.record:
            with open(Path(self.record) / f"rank{rank}.jsonl", "a") as f:
                f.write(json.dumps(entry) + "\n")

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        out = super().encode(images)  # type: ignore[misc]
        self._note("encode")
        return out


class RecordingCLIP(_Records, OpenCLIPImageTeacher):
    def __init__(self, record: str | None = None, **kw: Any) -> None:
        super().__init__(**kw)
        self.record, self.calls = record, []

    def encode_text(self, texts: Any) -> torch.Tensor:
        out = super().encode_text(texts)
        self._note("encode_text")
        return out


class RecordingVAE(_Records, VAETeacher):
    def __init__(self, record: str | None = None, **kw: Any) -> None:
        super().__init__(**kw)
        self.record, self.calls = record, []


class _RankState(L.Callback):
    """Each rank writes its root device and where its teachers' weights are once training/testing starts."""

    def __init__(self, out: str) -> None:
        self.out = out

    def _write(self, trainer: L.Trainer, module: Any, hook: str) -> None:
        state = {"hook": hook, "rank": trainer.global_rank, "root": str(trainer.strategy.root_device),
                 "teachers": {k: {"device": str(t.device), "weights": str(t.weights_device)}
                              for k, t in module.teachers().items()}}
        with open(Path(self.out) / f"state{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(state) + "\n")

    def on_train_start(self, trainer: L.Trainer, module: Any) -> None:
        self._write(trainer, module, "train_start")

    def on_test_epoch_end(self, trainer: L.Trainer, module: Any) -> None:
        self._write(trainer, module, "test_epoch_end")


def _clip(record: str | None = None, **kw: Any) -> RecordingCLIP:
    return RecordingCLIP(record, model_name="tiny_clip", model_config=TINY_CLIP, **kw)


def _vae(record: str | None = None, **kw: Any) -> RecordingVAE:
    return RecordingVAE(record, config="tiny", image_size=32, **kw)


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _ddp(n: int) -> Any:
    """2-process gloo DDP on the CPU, rank r on the device object ``cpu:r``."""
    from lightning.pytorch.strategies import DDPStrategy

    return DDPStrategy(start_method="spawn", process_group_backend="gloo",
                       parallel_devices=[torch.device("cpu", r) for r in range(n)])


def _one(device: torch.device) -> Any:
    from lightning.pytorch.strategies import SingleDeviceStrategy

    return SingleDeviceStrategy(device=device)


# --------------------------------------------------------------------------------------------- construction
def test_construction_never_touches_cuda(monkeypatch):
    """With CUDA "available", building teachers (device=None, and an explicit index-less ``cuda``) moves nothing:
    LightningCLI builds them before each rank has its device (they used to land on cuda:0 on every rank)."""
    moved: list[Any] = []
    orig_to = torch.nn.Module.to

    def spy(self, *args, **kw):
        moved.append(args[0] if args else kw.get("device"))
        return orig_to(self, *args, **kw)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.nn.Module, "to", spy)
    for t in (_clip(), _vae(), _clip(device="cuda"), _vae(device="cuda")):
        net = t.model if isinstance(t, OpenCLIPImageTeacher) else t.vae
        assert {p.device.type for p in net.parameters()} == {"cpu"}
        assert t.weights_device == torch.device("cpu")
    assert not [d for d in moved if d is not None and torch.device(d).type == "cuda"], moved
    lazy, pinned = _clip(), _clip(device="cuda")
    assert not lazy.pinned and lazy.device == torch.device("cpu")
    assert pinned.pinned and pinned.device == torch.device("cuda")  # moved at first use, not now


def test_place_moves_unpinned_teachers_and_placed_restores(tiny_store):
    lazy, pinned = _clip(), _clip(device="cpu")
    dev = torch.device("cpu", 1)
    assert place(lazy, dev) is lazy and lazy.device == dev and lazy.weights_device == dev
    assert place(pinned, dev).device == torch.device("cpu")  # an explicit device wins
    release(lazy)
    assert lazy.device == torch.device("cpu") and lazy.weights_device == torch.device("cpu")
    with placed(lazy, dev) as t:
        x = torch.zeros(2, 3, 40, 40, dtype=torch.uint8)
        t.encode(x)
        assert t.calls[-1]["device"] == "cpu:1"
    assert lazy.device == torch.device("cpu") and lazy.weights_device == torch.device("cpu")
    assert place(None, dev) is None


def test_teacher_cache_fills_on_its_device_and_releases(tiny_store, tmp_path):
    """Outside Lightning the cache computes on its ``device`` (default: cuda:LOCAL_RANK when available) and the
    teacher leaves that device afterwards; a cache hit moves nothing."""
    store = tmp_path / "tiny.h5"
    shutil.copy(tiny_store, store)
    clip = _clip()
    dev = torch.device("cpu", 1)
    TeacherCache(device=dev, progress=False).get(store, clip)
    assert clip.calls and {c["device"] for c in clip.calls} == {"cpu:1"}
    assert clip.device == torch.device("cpu") and clip.weights_device == torch.device("cpu")
    n = len(clip.calls)
    TeacherCache(device=dev, progress=False).get(store, clip)  # cached: not encoded, not moved
    assert len(clip.calls) == n


def test_default_device_is_the_local_rank_gpu(monkeypatch):
    from neurovision.pretrained.teachers import default_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert default_device() == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert default_device() == torch.device("cuda", 3)


# --------------------------------------------------------------------------------------------- tasks (fast)
def _alignment(store: Path, clip: Any, vae: Any) -> tuple[Any, Any]:
    from data_modules import FMRIDataModule
    from neurovision.tasks import AlignmentTask

    dm = FMRIDataModule(store=str(store), batch_size=8, num_workers=0)
    task = AlignmentTask(data_spec=dm.spec, clip_teacher=clip, vae_teacher=vae, dim=32, depth=1, heads=2,
                         head_hidden=32)
    return task, dm


def _quiet(**kw: Any) -> dict[str, Any]:
    return {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
            "enable_model_summary": False, **kw}


def test_alignment_fills_the_cache_on_the_rank_device_then_frees_it(tiny_store, tmp_path):
    """Stage 1's cache fill runs on ``trainer.strategy.root_device`` (here ``cpu:1``, a stand-in for a rank's
    GPU), and no teacher stays there for training. Fails if AlignmentTask.setup forgets to pass its device."""
    store = tmp_path / "tiny.h5"
    shutil.copy(tiny_store, store)
    clip, vae = _clip(), _vae()
    task, dm = _alignment(store, clip, vae)
    L.Trainer(accelerator="cpu", strategy=_one(torch.device("cpu", 1)), max_steps=1, limit_val_batches=0,
              **_quiet()).fit(task, dm)
    for t in (clip, vae):
        assert t.calls and {c["device"] for c in t.calls} == {"cpu:1"}, t.calls[:2]
        assert t.device == torch.device("cpu") and t.weights_device == torch.device("cpu")


def _scoring_task(clip: Any) -> Any:
    """A minimal task whose test uses a teacher (like stage 2's CLIP-S and stage 3's best-of-N selector)."""
    from neurovision.tasks.base import BaseTask, DataSpec

    class Scorer(BaseTask):
        def __init__(self, spec: DataSpec, clip_teacher: Any, vae_teacher: Any) -> None:
            self.clip_teacher, self.vae_teacher = clip_teacher, vae_teacher  # before BaseTask.__init__, as tasks do
            self.unused_weights: list[str] = []
            super().__init__(spec)
            self.drop_hparams("clip_teacher", "vae_teacher")

        def configure_models(self) -> None:
            self.lin = torch.nn.Linear(1, 1)

        def test_step(self, batch: Any, batch_idx: int) -> None:
            self.clip_teacher.encode(torch.zeros(1, 3, 40, 40, dtype=torch.uint8))
            self.unused_weights.append(str(self.vae_teacher.weights_device))  # never called in the test

    spec = DataSpec(num_active_patches=1, patch_size=2, grid_shape=(2, 2, 2), patch_coords=((0, 0, 0),),
                    num_subjects=1, image_shape=(40, 40, 3))
    return Scorer(spec, clip, _vae())


def test_scorers_are_placed_at_test_start_and_released_after(tmp_path):
    clip = _clip()
    task = _scoring_task(clip)
    assert task.teachers() == {"clip_teacher": clip, "vae_teacher": task.vae_teacher}
    data = torch.utils.data.DataLoader(torch.zeros(2, 1), batch_size=1)
    L.Trainer(accelerator="cpu", strategy=_one(torch.device("cpu", 1)), **_quiet()).test(task, data)
    assert [(c["device"], c["weights"]) for c in clip.calls] == [("cpu:1", "cpu:1")] * 2
    assert task.unused_weights == ["cpu", "cpu"]  # placed lazily: a teacher the test never calls stays off
    assert clip.weights_device == torch.device("cpu") and clip.device == torch.device("cpu")  # released
    pinned = _clip(device="cpu")  # an explicit device wins
    L.Trainer(accelerator="cpu", strategy=_one(torch.device("cpu", 1)), **_quiet()).test(_scoring_task(pinned), data)
    assert {c["device"] for c in pinned.calls} == {"cpu"}


@pytest.mark.parametrize("name", ["AlignmentTask", "InstructTask", "ReconstructionTask"])
def test_tasks_with_teachers_keep_the_placement_hooks(name):
    """Every task holding teachers places them at test start through BaseTask's hooks: a task that overrides
    on_test_start / on_test_end must call super() (or its scorers stay where they were built)."""
    import inspect

    import neurovision.tasks as tasks
    from neurovision.tasks.base import BaseTask

    cls = getattr(tasks, name)
    for hook in ("on_test_start", "on_test_end"):
        impl = getattr(cls, hook)
        if impl is not getattr(BaseTask, hook):
            assert f"super().{hook}()" in inspect.getsource(impl), f"{name}.{hook} skips BaseTask's teacher placement"


# --------------------------------------------------------------------------------------------- 2-rank DDP
@pytest.mark.slow
def test_ddp_cache_fill_runs_on_each_rank_device(tiny_store, tmp_path):
    """2-process gloo DDP, empty cache: whichever rank fills it uses its own device; both ranks train with
    their teachers off the device; the cache holds the same targets as a single-process fill."""
    store = tmp_path / "run" / "tiny.h5"
    store.parent.mkdir()
    shutil.copy(tiny_store, store)
    rec = tmp_path / "rec"
    rec.mkdir()
    task, dm = _alignment(store, _clip(str(rec)), _vae(str(rec)))
    L.Trainer(accelerator="cpu", devices=2, strategy=_ddp(2), max_steps=1, limit_val_batches=0,
              callbacks=[_RankState(str(rec))], default_root_dir=tmp_path, **_quiet()).fit(task, dm)
    calls = [c for r in (0, 1) for c in _jsonl(rec / f"rank{r}.jsonl")]
    assert {c["teacher"] for c in calls} == {"RecordingCLIP", "RecordingVAE"}
    for c in calls:  # every encode ran on the device of the rank that made it
        assert c["device"] == c["weights"] == f"cpu:{c['rank']}", c
    for r in (0, 1):
        (state,) = _jsonl(rec / f"state{r}.jsonl")
        assert state["root"] == f"cpu:{r}"
        assert all(t["weights"] == "cpu" for t in state["teachers"].values()), state  # freed after the fill
    # the same targets as a single-process fill of a fresh copy
    ref_store = tmp_path / "ref" / "tiny.h5"
    ref_store.parent.mkdir()
    shutil.copy(tiny_store, ref_store)
    for make in (_clip, _vae):
        got = TeacherCache(progress=False).get(store, make())  # read back (cache hit)
        want = TeacherCache(progress=False, device="cpu").get(ref_store, make())
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def stage2_parts(tiny_store, tmp_path_factory):
    """A tiny stage-1 checkpoint (one step) and a tiny Llama."""
    from neurovision.tiny.llm import build_tiny_llm

    root = tmp_path_factory.mktemp("ddp_stage2")
    store = root / "tiny.h5"
    shutil.copy(tiny_store, store)
    task, dm = _alignment(store, _clip(device="cpu"), _vae(device="cpu"))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, limit_val_batches=0, **_quiet())
    trainer.fit(task, dm)
    trainer.save_checkpoint(root / "s1.ckpt")
    llm = build_tiny_llm(store, root / "tiny_llm", vocab_size=384, hidden=48, layers=2, heads=2, steps=3,
                         progress=False)
    return {"store": store, "s1": root / "s1.ckpt", "llm": llm}


def _stage2_test(parts: dict[str, Any], out: Path, devices: int) -> dict[str, Any]:
    from data_modules import InstructionDataModule
    from neurovision.tasks.instruct import InstructTask

    out.mkdir()
    rec = out / "rec"
    rec.mkdir()
    dm = InstructionDataModule(str(parts["store"]), tokenizer=str(parts["llm"]), eval_tasks=["caption", "reasoning"],
                               eval_conditions=["average"], max_eval_items=4, eval_batch_size=1, batch_size=4,
                               max_length=160)
    task = InstructTask(dm.spec, llm=str(parts["llm"]), stage1=str(parts["s1"]), phase="projector",
                        max_new_tokens=6, clip_teacher=_clip(str(rec)))
    strategy = _ddp(devices) if devices > 1 else _one(torch.device("cpu", 0))
    L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, default_root_dir=out,
              callbacks=[_RankState(str(rec))], **_quiet()).test(task, dm)
    return {"scores": json.loads((out / "test_scores_average.json").read_text()),
            "calls": [c for r in range(devices) for c in _jsonl(rec / f"rank{r}.jsonl")],
            "states": [s for r in range(devices) for s in _jsonl(rec / f"state{r}.jsonl")]}


@pytest.mark.slow
def test_ddp_stage2_scores_match_one_rank_and_clip_runs_on_each_rank_device(stage2_parts, tmp_path):
    one = _stage2_test(stage2_parts, tmp_path / "one", 1)
    two = _stage2_test(stage2_parts, tmp_path / "two", 2)
    assert one["scores"].keys() == two["scores"].keys()
    assert one["scores"]["caption/CLIP-S"] is not None
    for k, v in one["scores"].items():  # None: a metric unavailable here (e.g. SPICE without Java)
        assert two["scores"][k] == (None if v is None else pytest.approx(v, rel=1e-5, abs=1e-6)), k
    assert {c["rank"] for c in two["calls"]} == {0, 1}  # every rank scores (CLIP-S) with its own teacher...
    for c in two["calls"]:
        assert c["device"] == c["weights"] == f"cpu:{c['rank']}", c  # ...on its own device
    for s in two["states"]:
        assert s["root"] == f"cpu:{s['rank']}"
        assert s["teachers"]["clip_teacher"]["device"] == s["root"]  # placed at test start (weights: at first use)


@pytest.mark.slow
def test_ddp_stage2_fit_end_writes_adapters(stage2_parts, tmp_path):
    """InstructTask.on_fit_end reads trainer.log_dir (a broadcast) on every rank: rank 0 alone deadlocked."""
    from data_modules import InstructionDataModule
    from neurovision.tasks.instruct import InstructTask

    dm = InstructionDataModule(str(stage2_parts["store"]), tokenizer=str(stage2_parts["llm"]), batch_size=4,
                               max_length=160, max_eval_items=2)
    task = InstructTask(dm.spec, llm=str(stage2_parts["llm"]), stage1=str(stage2_parts["s1"]), phase="projector",
                        max_new_tokens=4)
    L.Trainer(accelerator="cpu", devices=2, strategy=_ddp(2), max_steps=1, limit_val_batches=0,
              default_root_dir=tmp_path, **_quiet()).fit(task, dm)
    assert (tmp_path / "adapters" / "fmri_projector.safetensors").is_file()
