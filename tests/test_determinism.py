"""The same seed gives bit-identical weights whether the machine is idle or loaded (issue 19 §6).

The tiny teachers and the tiny LLM used to train to a wall-clock budget with a schedule that followed elapsed
time, so a loaded machine got fewer steps and an earlier decay. Budgets are now steps and schedules functions
of the step: two short runs, one beside CPU-burning processes, must give equal state dicts (``torch.equal`` on
every tensor), and a clock running a thousand times too fast must change nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

STEPS = 3


@pytest.fixture(autouse=True)
def _restore_threads() -> Iterator[None]:
    """The CLI's ``--threads`` sets torch's process-wide thread count; give the other tests theirs back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@contextmanager
def cpu_burners() -> Iterator[None]:
    """One busy-looping Python process per CPU core, killed (by their own handles) afterwards."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 2)]
    try:
        time.sleep(0.5)  # let them get going
        yield
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def _state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_equal_states(a: Path, b: Path) -> None:
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys(), f"{a} / {b}: different keys"
    differ = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not differ, f"{a.name}: {len(differ)} of {len(sa)} tensors differ, e.g. {differ[:3]}"


VAE_CONFIG = {  # smaller than the built-in "tiny" preset: the test needs the arithmetic, not the quality
    "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
    "block_out_channels": [8, 16], "norm_num_groups": 8, "latent_channels": 4, "sample_size": 32,
}


def _train_all(store: Path, out: Path) -> None:
    """A few steps of the tiny CLIP, VAE and LLM at test sizes, one torch thread (the count changes CPU
    convolutions' sums, see ``set_threads``; the test is about the load and the clock)."""
    from neurovision.tiny.llm import build_tiny_llm
    from neurovision.tiny.loop import set_threads
    from neurovision.tiny.teachers import tiny_clip_config, train_tiny_clip, train_tiny_vae

    assert set_threads(1) == 1
    out.mkdir(parents=True)
    (out / "vae.json").write_text(json.dumps(VAE_CONFIG))
    cfg = tiny_clip_config(image_size=32, embed_dim=32, width=16, text_width=32, text_layers=1)
    train_tiny_clip(store, out, steps=STEPS, batch_size=16, config=cfg, evaluate=False, progress=False)
    train_tiny_vae(store, out, steps=STEPS, batch_size=8, config=str(out / "vae.json"), evaluate=False,
                   progress=False)
    build_tiny_llm(store, out / "tiny_llm", vocab_size=384, hidden=48, layers=2, heads=2, steps=STEPS,
                   progress=False)


def _compare(a: Path, b: Path) -> None:
    _assert_equal_states(a / "tiny_clip.pt", b / "tiny_clip.pt")
    _assert_equal_states(a / "tiny_vae" / "diffusion_pytorch_model.safetensors",
                         b / "tiny_vae" / "diffusion_pytorch_model.safetensors")
    _assert_equal_states(a / "tiny_llm" / "model.safetensors", b / "tiny_llm" / "model.safetensors")


@pytest.fixture(scope="module")
def reference_run(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One ordinary run, the reference both comparisons use."""
    n = torch.get_num_threads()
    out = tmp_path_factory.mktemp("determinism") / "reference"
    _train_all(tiny_store, out)
    torch.set_num_threads(n)
    return out


def test_same_weights_idle_or_loaded(tiny_store: Path, reference_run: Path, tmp_path: Path) -> None:
    with cpu_burners():
        _train_all(tiny_store, tmp_path / "loaded")
    _compare(reference_run, tmp_path / "loaded")
    for name in ("tiny_clip_metrics.json", "tiny_vae_metrics.json"):
        m = json.loads((tmp_path / "loaded" / name).read_text())
        assert m["steps"] == m["planned_steps"] == STEPS and m["torch_threads"] == 1
    m = json.loads((tmp_path / "loaded" / "tiny_llm" / "pretrain_metrics.json").read_text())
    assert m["steps"] == STEPS


def test_a_fast_clock_changes_nothing(tiny_store: Path, reference_run: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine so slow that every clock reading is ten minutes later: the weights are those of a normal run
    (a time-based schedule would decay at once and a time budget would stop after one step)."""
    t = [time.time()]

    def slow_clock() -> float:
        t[0] += 600.0
        return t[0]

    monkeypatch.setattr(time, "time", slow_clock)
    monkeypatch.setattr(time, "monotonic", slow_clock)
    _train_all(tiny_store, tmp_path / "slow")
    monkeypatch.undo()
    _compare(reference_run, tmp_path / "slow")


def test_step_budget_overrides_epochs_and_continues_past_one_pass() -> None:
    """``steps`` larger than one pass runs further passes (fresh permutations), with the lr schedule a
    function of the step: warm-up, peak, cosine down to ~0 at the last step."""
    import numpy as np

    from neurovision.tiny.loop import PassBatches, StepModule, fit, resolve_steps, warmup_cosine

    assert resolve_steps(10, 4, epochs=3, steps=None, where="t") == 6
    assert resolve_steps(10, 4, epochs=3, steps=7, where="t") == 7
    with pytest.raises(ValueError, match="steps must be >= 1"):
        resolve_steps(10, 4, epochs=3, steps=0, where="t")
    lrs, batches = [], []
    weight = torch.nn.Parameter(torch.zeros(1))

    def step(b: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        lrs.append(module.optimizers().param_groups[0]["lr"])
        batches.append(b.tolist())
        return (weight - 1.0).pow(2).sum(), {}

    module = StepModule(torch.nn.ParameterList([weight]), step, lr=1.0, schedule=lambda k: warmup_cosine(k, 7, 1))
    sampler = PassBatches(10, 4, 7, np.random.default_rng(0))
    assert fit(module, sampler, desc="t", progress=False) == 7
    assert len(batches) == 7 and all(len(b) == 4 for b in batches) and len(module.losses) == 7
    for k in range(0, 7, 2):  # each pass of 2 batches is drawn without replacement
        items = sum(batches[k:k + 2], [])
        assert len(set(items)) == len(items)
    assert lrs[0] == pytest.approx(1.0) and lrs[-1] < 0.1 and all(x >= y for x, y in zip(lrs, lrs[1:], strict=False))


def test_clis_take_step_budgets_and_threads(tiny_store: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """``--clip-steps``/``--vae-steps``/``--steps`` reach the training functions; ``--max-minutes`` is gone."""
    from neurovision.tiny import llm
    from neurovision.tiny import teachers as teacher_training
    from neurovision.tiny import unclip as unclip_training

    seen: dict[str, dict] = {}

    def fake(name: str, write: str | None = None):  # noqa: ANN202
        def f(*args, **kw):  # noqa: ANN002, ANN003, ANN202
            seen[name] = {**kw, "threads": torch.get_num_threads()}
            out = Path(args[2] if name == "unclip" else args[1])
            if write:
                (out.parent if name == "unclip" else out).mkdir(parents=True, exist_ok=True)
                (out.parent / write if name == "unclip" else out / write).write_text("{}")
            return out
        return f

    monkeypatch.setattr(teacher_training, "train_tiny_clip", fake("clip", "tiny_clip_metrics.json"))
    monkeypatch.setattr(teacher_training, "train_tiny_vae", fake("vae", "tiny_vae_metrics.json"))
    monkeypatch.setattr(unclip_training, "train_tiny_unclip", fake("unclip", "tiny_unclip_metrics.json"))
    monkeypatch.setattr(llm, "build_tiny_llm", fake("llm", "pretrain_metrics.json"))
    t = str(tmp_path / "t")
    assert teacher_training.main(["--store", str(tiny_store), "--out", t, "--clip-steps", "7", "--vae-steps", "5",
                                  "--threads", "1"]) == 0
    assert seen["clip"]["steps"] == 7 and seen["vae"]["steps"] == 5 and seen["clip"]["threads"] == 1
    assert unclip_training.main(["--store", str(tiny_store), "--teachers", t, "--steps", "9"]) == 0
    assert seen["unclip"]["steps"] == 9
    llm.main(["--store", str(tiny_store), "--out", str(tmp_path / "llm"), "--steps", "11"])
    assert seen["llm"]["steps"] == 11
    for argv in (["--store", "s", "--out", t, "--clip-max-minutes", "3"],
                 ["--store", "s", "--out", t, "--clip-steps", "0"],
                 ["--store", "s", "--out", t, "--clip-steps", "3", "--clip-epochs", "2"]):
        with pytest.raises(SystemExit) as e:
            teacher_training.main(argv)
        assert e.value.code == 2
    with pytest.raises(SystemExit):
        llm.main(["--store", "s", "--out", "o", "--max-minutes", "2"])


def test_max_minutes_is_ignored_with_a_warning(tiny_store: Path, tmp_path: Path) -> None:
    """Old call sites keep working for one release: ``max_minutes`` warns and changes nothing (a budget of a
    nanosecond used to stop after the first step)."""
    from neurovision.tiny.llm import build_tiny_llm

    with pytest.warns(FutureWarning, match="max_minutes=1e-09 is ignored"):
        out = build_tiny_llm(tiny_store, tmp_path / "b", vocab_size=384, hidden=48, layers=2, heads=2, steps=3,
                             max_minutes=1e-9, progress=False)
    assert json.loads((out / "pretrain_metrics.json").read_text())["steps"] == 3
