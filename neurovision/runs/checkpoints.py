"""Checkpoints every ``neurovision`` trainer writes and reads: atomic files, the resumable ``latest.ckpt``,
``--ckpt_path=last`` resolution, and the checks of a checkpoint against the run's config and store.

Which file resumes
    A monitored ``ModelCheckpoint`` (the stage YAMLs monitor a validation metric) writes ``last.ckpt`` only when
    a top-k checkpoint is saved (Lightning 2.6), so its ``last.ckpt`` is the *best* epoch, not the latest one.
    :class:`LatestCheckpoint` (installed by :class:`~neurovision.runs.lightning.NeuroVisionCLI` for every ``fit``)
    rewrites ``<checkpoint dir>/latest.ckpt`` at the end of every training epoch: the newest complete state.
    ``--ckpt_path=last`` resolves to the ``latest.ckpt`` of the newest run folder (``<save_dir>/<name>/version_N``
    with the highest N that holds a complete checkpoint; a run from before ``latest.ckpt`` existed: its newest
    complete ``*.ckpt`` by modification time) and a resumed ``fit`` logs into that same folder.

Atomic files
    :class:`AtomicCheckpointIO` writes a checkpoint to a hidden temp file beside the target, fsyncs it and renames
    it over the target (like the store writers): a full disk or a killed process leaves the previous file or
    none, never a truncated ``epoch=…ckpt``. Lightning's own writer stages the file in the system temp folder
    and copies it over (not atomic across file systems, no fsync).
"""

from __future__ import annotations

import errno
import inspect
import json
import os
import shutil
import warnings
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from callbacks.latest_checkpoint import LATEST
from neurovision.data.atomic import atomic_path, remove_stale_partials
from neurovision.data.store import StoreError


class CheckpointError(StoreError):
    """A checkpoint does not fit the run: a value fixed at training time given otherwise, another store for a
    resumed fit, no checkpoint for ``last``. ``<file>: field '<key>': <problem>``; a :class:`StoreError`
    subclass so every command's one-line error path reports it."""


# ------------------------------------------------------------------------------------------------ writing
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that writes local files atomically: ``torch.save`` into ``.<name>.*.partial`` in the
    target's folder, fsync, ``os.replace`` (see :func:`neurovision.data.atomic.atomic_path`), fsync of the folder.
    Remote paths (``s3://`` ...) go through Lightning's writer. Under DDP only global rank 0 saves (the
    strategy calls this on rank 0), so the temp name never races."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(os.fspath(path)).expanduser()
        remove_stale_checkpoint_partials(target.parent)
        with atomic_path(target) as tmp:
            with open(tmp, "wb") as f:
                try:
                    torch.save(checkpoint, f)
                    f.flush()
                    os.fsync(f.fileno())
                except (RuntimeError, OSError) as e:
                    if disk_full(e, tmp.parent):
                        raise OSError(errno.ENOSPC, f"{target}: No space left on device (disk full) while writing "
                                      "this checkpoint; nothing was replaced (trainer.default_root_dir)") from e
                    raise
        _fsync_dir(target.parent)


#: free bytes below which a failed write is taken for a full disk (torch.save reports one as a RuntimeError,
#: "PytorchStreamWriter failed writing file ...", without an errno)
DISK_FULL_BYTES = 1 << 20


def disk_full(error: BaseException, folder: Path) -> bool:
    """Whether ``error``, raised while writing into ``folder`` (its partial file still there), is a full disk."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        return shutil.disk_usage(folder).free < DISK_FULL_BYTES
    except OSError:
        return False


def remove_stale_checkpoint_partials(folder: Path) -> None:
    """Remove the temp files of killed checkpoint writes in ``folder`` (``.<name>.ckpt.<host>-<pid>.*.partial``
    whose process is gone; see :func:`neurovision.data.atomic.remove_stale_partials`): a checkpoint can be gigabytes,
    and ``epoch=…`` names are never written twice, so their writer would never clean them."""
    try:
        partials = list(folder.glob(".*.ckpt.*.partial"))
    except OSError:
        return
    for name in {p.name[1:p.name.index(".ckpt.") + len(".ckpt")] for p in partials}:
        remove_stale_partials(folder / name)


def install_atomic_io(trainer: Any) -> None:
    """Give the trainer's strategy an :class:`AtomicCheckpointIO` when it uses Lightning's plain
    ``TorchCheckpointIO`` (a configured plugin, e.g. ``AsyncCheckpointIO``, is left alone)."""
    strategy = trainer.strategy
    try:
        current = strategy.checkpoint_io
    except (AttributeError, NotImplementedError):
        return
    if type(current) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()


def has_latest_checkpoint(callbacks: Iterable[Any]) -> bool:
    """Whether a ``LatestCheckpoint`` (:mod:`callbacks.latest_checkpoint`) is among ``callbacks``."""
    return any(isinstance(cb, ModelCheckpoint) and type(cb).__name__ == "LatestCheckpoint" for cb in callbacks)


# ------------------------------------------------------------------------------------------------ reading
def _is_zip(path: Path) -> bool:
    try:
        return path.is_file() and zipfile.is_zipfile(path)
    except OSError:
        return False


def is_complete(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a whole checkpoint: a ``torch.save`` file whose zip end-of-central-directory record is
    there (read from the end of the file: a truncated write lacks it), or a sharded (FSDP) checkpoint folder with
    its ``.metadata`` (written last) and a whole ``meta.pt``."""
    p = Path(path)
    if p.is_dir():
        return (p / ".metadata").is_file() and _is_zip(p / "meta.pt")
    return _is_zip(p)


def _mtime(p: Path) -> float:
    return (p / ".metadata").stat().st_mtime if p.is_dir() else p.stat().st_mtime


@dataclass
class CheckpointMeta:
    """What the CLI checks of a checkpoint, read without its tensors (``mmap``)."""

    path: str
    hparams: dict[str, Any] = field(default_factory=dict)
    store: str | None = None
    fingerprint: str | None = None
    epoch: int | None = None
    global_step: int | None = None


def read_meta(path: str | os.PathLike[str]) -> CheckpointMeta:
    """The hyper-parameters, training store (the datamodule's ``state_dict``: ``{"store", "fingerprint"}``) and
    progress of a checkpoint. ``mmap``: the tensors are not read, so this is cheap for any checkpoint size."""
    p = str(path)
    if not is_complete(p):
        raise CheckpointError(p, "<file>", "not a complete checkpoint (truncated write?)")
    src = Path(p) / "meta.pt" if Path(p).is_dir() else Path(p)  # a sharded checkpoint: its non-tensor part
    try:
        ckpt = torch.load(src, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001  (any unpickling failure is the same bad input)
        raise CheckpointError(p, "<file>", f"not a readable checkpoint: {e}") from e
    meta = CheckpointMeta(path=p, hparams=dict(ckpt.get("hyper_parameters") or {}),
                          epoch=ckpt.get("epoch"), global_step=ckpt.get("global_step"))
    for value in ckpt.values():  # the datamodule's state sits under its class name
        if isinstance(value, dict) and "fingerprint" in value and "store" in value:
            meta.store, meta.fingerprint = str(value["store"]), str(value["fingerprint"] or "") or None
            break
    return meta


def newest_complete(ckpt_dir: Path) -> Path | None:
    """``ckpt_dir/latest.ckpt`` when complete, else the newest complete ``*.ckpt`` (file or sharded folder) by
    modification time (runs from before :class:`LatestCheckpoint`); None when there is none."""
    latest = ckpt_dir / f"{LATEST}.ckpt"
    if is_complete(latest):
        return latest
    try:
        done = [p for p in ckpt_dir.glob("*.ckpt") if is_complete(p)]
    except OSError:
        return None
    return max(done, key=_mtime) if done else None


_VERSIONED_LOGGERS = ("TensorBoardLogger", "CSVLogger")


def _as_dict(x: Any) -> Any:
    if hasattr(x, "as_dict"):
        return x.as_dict()
    if isinstance(x, dict):
        return {k: _as_dict(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_as_dict(v) for v in x]
    return x


@dataclass
class RunLayout:
    """Where a run's checkpoints go, from the trainer config: ``root`` holds ``version_N`` folders (a logger
    without a fixed version), else ``fixed`` is the one checkpoint folder."""

    root: Path | None = None
    fixed: Path | None = None

    def candidates(self) -> list[tuple[Path, int | None]]:
        """(checkpoint folder, version to log into) pairs, newest run first."""
        if self.fixed is not None:
            return [(self.fixed, None)]
        assert self.root is not None
        try:
            names = [d.name for d in self.root.iterdir() if d.is_dir() and d.name.startswith("version_")]
        except OSError:
            return []
        versions = sorted((int(n.split("_", 1)[1]) for n in names if n.split("_", 1)[1].isdigit()), reverse=True)
        return [(self.root / f"version_{v}" / "checkpoints", v) for v in versions]


def run_layout(logger: Any, default_root_dir: str | os.PathLike[str] | None) -> RunLayout:
    """The checkpoint layout Lightning's ``ModelCheckpoint`` (no ``dirpath``) uses with this ``trainer.logger``
    value: none -> ``<default_root_dir>/checkpoints``; the default logger (``true``/unset) ->
    ``<default_root_dir>/lightning_logs/version_N/checkpoints``; a TensorBoardLogger/CSVLogger ->
    ``<save_dir>/<name>/<version>/checkpoints``. Other logger classes: ValueError (their folders are theirs)."""
    root = Path(default_root_dir or os.getcwd())
    logger = _as_dict(logger)
    if isinstance(logger, list):
        if not logger:
            return RunLayout(fixed=root / "checkpoints")
        logger = logger[0]
    if logger is False:
        return RunLayout(fixed=root / "checkpoints")
    if logger is None or logger is True:
        return RunLayout(root=root / "lightning_logs")
    if not isinstance(logger, dict) or "class_path" not in logger:
        raise ValueError(f"trainer.logger {logger!r}: cannot tell where its checkpoints are")
    name = str(logger["class_path"]).rpartition(".")[2]
    if name not in _VERSIONED_LOGGERS:
        raise ValueError(f"trainer.logger {logger['class_path']}: cannot tell where its checkpoints are")
    ia = logger.get("init_args") or {}
    base = Path(ia.get("save_dir") or root) / str(ia.get("name", "lightning_logs") or "")
    version = ia.get("version")
    if version is None:
        return RunLayout(root=base)
    return RunLayout(fixed=base / (version if isinstance(version, str) else f"version_{version}") / "checkpoints")


def find_last(layout: RunLayout) -> tuple[Path, int | None] | None:
    """The newest complete checkpoint of the newest run that has one, and that run's version (None: a fixed
    folder)."""
    for ckpt_dir, version in layout.candidates():
        found = newest_complete(ckpt_dir)
        if found is not None:
            return found, version
    return None


def version_of(ckpt: str | os.PathLike[str], layout: RunLayout) -> int | None:
    """N when ``ckpt`` lies in ``<root>/version_N/checkpoints`` of this layout (a resumed fit logs there)."""
    if layout.root is None:
        return None
    p = Path(ckpt).resolve()
    for ckpt_dir, version in layout.candidates():
        if p.parent == ckpt_dir.resolve():
            return version
    return None


# ------------------------------------------------------------------------------------------------ checks
def plain(x: Any) -> Any:
    """A config or checkpoint value as plain JSON-like data (namespaces -> dicts, tuples -> lists)."""
    x = _as_dict(x)
    if isinstance(x, dict):
        return {str(k): plain(v) for k, v in x.items()}
    if isinstance(x, list):
        return [plain(v) for v in x]
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    return x


def _short(x: Any, n: int = 120) -> str:
    s = json.dumps(plain(x), default=str)
    return s if len(s) <= n else s[: n - 3] + "..."


def init_params(cls: type) -> set[str] | None:
    """The keyword names ``cls.__init__`` takes (None: it takes ``**kwargs``)."""
    params = inspect.signature(cls.__init__).parameters.values()  # type: ignore[misc]  # a class, not an instance
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.name != "self"}


def check_data_spec(trained: dict[str, Any] | None, current: dict[str, Any] | None, ckpt: str) -> None:
    """The data spec a checkpoint was trained with must be the one the datamodule gives now (sizes and patch
    positions decide the network's shapes and what each token means)."""
    if not trained or not current:
        return
    for k in sorted(set(trained) | set(current)):
        a, b = plain(trained.get(k)), plain(current.get(k))
        if a != b:
            raise CheckpointError(ckpt, f"hyper_parameters/data_spec/{k}",
                                  f"the checkpoint was trained with {k} = {_short(a)}, but the store "
                                  f"(data.init_args.store) gives {k} = {_short(b)}; the data spec cannot change "
                                  "after training")


def check_store(meta: CheckpointMeta, store: str | None, fingerprint: str | None, refuse: bool) -> None:
    """Compare the store a checkpoint was trained on with the run's. Different fingerprints: ``refuse`` (a
    resumed fit) -> CheckpointError naming both stores; else one warning naming both (evaluating a model on
    other data is legitimate, but must not pass unnoticed)."""
    if not meta.fingerprint or not fingerprint or meta.fingerprint == fingerprint:
        return
    what = (f"the checkpoint was trained on store {meta.store} (fingerprint {meta.fingerprint[:12]}), but "
            f"data.init_args.store is {store} (fingerprint {fingerprint[:12]})")
    if refuse:
        raise CheckpointError(meta.path, "store/fingerprint",
                              f"{what}; a resumed fit continues on the data it started with (use that store, or "
                              "start a new fit)")
    from lightning.pytorch.utilities import rank_zero_warn

    rank_zero_warn(f"{meta.path}: {what}; evaluating on another store than the one it was trained on")


def warn_unknown(keys: Iterable[str], cls_name: str, ckpt: str) -> None:
    keys = sorted(keys)
    if keys:
        warnings.warn(f"{ckpt}: hyper_parameters {keys} are not arguments of {cls_name} (any more); ignored",
                      stacklevel=2)
