"""The :class:`~neurovision.cli.lightning.NeuroVisionCLI` that ``neurovision fit|validate|test|predict`` runs: bad
input stops before anything is built, as an exception :func:`neurovision.cli.main` reports in one line.

Two changes, both about errors: the parsers raise ``ArgumentError`` instead of printing a usage screen and the
nested report jsonargparse ends with ``Given value: Namespace(...)`` (``exit_on_error=False``; ``--help`` and
``--print_config`` still exit 0), and the parsed config is checked before any class is built: the input paths
(:data:`INPUT_PATHS`), a stage-1 checkpoint of another grid than the store's, and the batch sizes (torch's sampler
refuses a batch size below 1 only when the first loader is built, after the teachers' cache is filled), each
error naming its YAML key and the file or flag that set it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser

from neurovision.cli.lightning import NeuroVisionCLI

#: data.init_args keys that must be integers >= 1 when set
POSITIVE_DATA_KEYS = ("batch_size", "eval_batch_size")
#: input paths checked on the parsed config, before any class is built (a teacher, the LLM, LoRA's config print
#: warnings and take minutes): key -> (kind, what). The classes check them again with their own messages (the
#: VAE folder and the store have theirs: not here).
INPUT_PATHS: dict[str, tuple[str, str]] = {
    "model.init_args.stage1": ("file", "stage-1 checkpoint does not exist"),
    "model.init_args.llm": ("llm", "no causal LM checkpoint (config.json) here"),
    "model.init_args.init_from": ("file", "checkpoint does not exist"),
    "model.init_args.adapter": ("dir", "adapter folder does not exist"),
    "model.init_args.reconstructor": ("dir", "Stable unCLIP folder does not exist"),
    "model.init_args.prompts": ("file", "prompts file not found"),
    "model.init_args.clip_teacher.init_args.checkpoint": ("file", "CLIP teacher checkpoint not found"),
    "model.init_args.clip_teacher.init_args.model_config": ("file", "open_clip model config not found"),
    "data.init_args.tokenizer": ("dir", "tokenizer directory does not exist"),
}


def _missing(kind: str, value: str) -> bool:
    p = Path(value)
    if kind == "llm":
        return not (p / "config.json").is_file()
    return not (p.is_file() if kind == "file" else p.is_dir())


class CheckedCLI(NeuroVisionCLI):
    """NeuroVisionCLI whose parse errors are exceptions and whose config is checked before instantiation."""

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        self._argv = list(sys.argv[1:] if args is None else args)  # to name the file or flag of a bad value
        super().__init__(args=args, run=run)

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        return super().init_parser(**{**kwargs, "exit_on_error": False})

    def before_instantiate_classes(self) -> None:
        super().before_instantiate_classes()
        from neurovision.cli import where_given

        cfg = self.config.get(str(self.subcommand), self.config) if self.subcommand else self.config
        for key, (kind, what) in INPUT_PATHS.items():
            try:
                value = cfg.get(key)
            except (KeyError, AttributeError, TypeError):  # another class's config: no such key
                continue
            if isinstance(value, (str, Path)) and str(value) and _missing(kind, str(value)):
                where = where_given(key, self._argv)
                raise FileNotFoundError(f"{value}: {what} (YAML key {key}" + (f", {where})" if where else ")"))
        init = (cfg.get("data") or {}).get("init_args") if hasattr(cfg, "get") else None
        self._check_stage1_grid(cfg)
        for key in POSITIVE_DATA_KEYS:
            value = init.get(key) if init is not None and hasattr(init, "get") else None
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                where = where_given(f"data.init_args.{key}", self._argv)
                raise ValueError(f"data.init_args.{key}: {value!r}: must be an integer >= 1"
                                 + (f" ({where})" if where else ""))

    @staticmethod
    def _check_stage1_grid(cfg: Any) -> None:
        """A stage-1 checkpoint of another grid than the store's, before the LLM or the diffusion model is built
        (the task checks it again, every field, when it loads the weights). Only the pickled hyperparameters are
        read (``mmap``: the tensors stay on disk); what cannot be read here is left to the task's own check."""
        try:
            stage1, store = cfg.get("model.init_args.stage1"), cfg.get("data.init_args.store")
        except (KeyError, AttributeError, TypeError):
            return
        if not stage1 or not store or not Path(str(stage1)).is_file() or not Path(str(store)).is_file():
            return
        try:
            import torch

            from neurovision.data.store import Store

            spec = dict(torch.load(str(stage1), map_location="cpu", weights_only=True, mmap=True)
                        ["hyper_parameters"]["data_spec"])
            st = Store(str(store))
            try:
                grid = st.grid
            finally:
                st.close()
            ours = {"patch_size": int(grid.patch_size), "grid_shape": tuple(int(v) for v in grid.shape),
                    "num_active_patches": int(grid.n_active)}
            theirs = {"patch_size": int(spec["patch_size"]), "grid_shape": tuple(int(v) for v in spec["grid_shape"]),
                      "num_active_patches": int(spec["num_active_patches"])}
        except Exception:  # noqa: BLE001 - not readable here: the task reports it with its own message
            return
        for f, v in ours.items():
            if theirs[f] != v:
                raise ValueError(f"{stage1}: field 'data_spec/{f}': the stage-1 run's differs from the datamodule "
                                 f"store's: {theirs[f]} vs {v} in {store} (YAML keys model.init_args.stage1, "
                                 "data.init_args.store: a stage-1 run of another grid)")
