"""The LightningCLI behind ``neurovision fit|validate|test|predict`` (module level: picklable): :class:`NeuroVisionCLI`
(run paths, links, checkpoints) and :class:`CheckedCLI`, the one the command runs (bad input stops before anything
is built).

Two changes, both about errors: the parsers raise ``ArgumentError`` instead of printing a usage screen and the
nested report jsonargparse ends with ``Given value: Namespace(...)`` (``exit_on_error=False``; ``--help`` and
``--print_config`` still exit 0), and the parsed config is checked before any class is built: the input paths
(:data:`INPUT_PATHS`), a stage-1 checkpoint of another grid than the store's, and the batch sizes (torch's sampler
refuses a batch size below 1 only when the first loader is built, after the teachers' cache is filled), each
error naming its YAML key and the file or flag that set it.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from callbacks.latest_checkpoint import LatestCheckpoint
from data_modules.fmri import StoreDataModule
from neurovision.runs.argv import where_given
from neurovision.runs.checkpoints import (
    CheckpointError,
    CheckpointMeta,
    check_data_spec,
    check_store,
    find_last,
    has_latest_checkpoint,
    init_params,
    install_atomic_io,
    is_complete,
    plain,
    read_meta,
    run_layout,
    version_of,
    warn_unknown,
)
from neurovision.tasks.base import BaseTask

# jsonargparse fills peft.LoraConfig's loftq_config with a default LoftQConfig, which makes peft warn on every
# stage-2 run that it is ignored (it is: init_lora_weights is not "loftq"); two lines of noise before any error
warnings.filterwarnings("ignore", message="`loftq_config` specified but will be ignored", category=UserWarning)




#: keys the CLI fills from others (``link_arguments``): jsonargparse would overwrite a value given for them silently
LINKED_KEYS = {"data.init_args.tokenizer": "model.init_args.llm",
               "data.init_args.chat_template": "model.init_args.chat_template"}


def refuse_linked_keys(argv: list[str]) -> None:
    """A linked key set on the command line or in a ``-c`` YAML is an error naming where and what to set instead
    (jsonargparse's link would replace the value without a word)."""
    for key, source in LINKED_KEYS.items():
        where = where_given(key, argv) or where_given(key.replace("init_args.", ""), argv)
        if where:
            raise ValueError(f"{where}: {key} is set from {source} by the CLI (the model and the datamodule "
                             f"tokenise alike); set {source} instead")


class NeuroVisionCLI(LightningCLI):
    """LightningCLI with neurovision's base task and datamodule (subclass mode), seed 0 by default, the run's
    config saved with overwrite; links what the data decides (``data.spec`` -> ``model.init_args.data_spec``) and, for
    stage 2, the LLM's path and chat template to the datamodule's tokenizer (``model.init_args.llm`` ->
    ``data.init_args.tokenizer``, ``model.init_args.chat_template`` -> ``data.init_args.chat_template``).

    Checkpoints (see :mod:`neurovision.runs.checkpoints`):

    * every trainer writes checkpoints atomically (:class:`~neurovision.runs.checkpoints.AtomicCheckpointIO`);
    * ``fit`` keeps ``<checkpoint dir>/latest.ckpt``, the end of the latest finished training epoch
      (:class:`~callbacks.latest_checkpoint.LatestCheckpoint`; the config's monitored ``last.ckpt`` is the *best*
      epoch in Lightning 2.6, not the latest);
    * ``--ckpt_path=last`` is that ``latest.ckpt`` of the newest run folder (``version_N``) holding a complete
      checkpoint; a resumed ``fit`` logs into that same folder (also for an explicit path inside one);
    * ``--ckpt_path=<file>``: every model init arg given on the command line or in a ``-c`` file applies (the
      saved ``config.yaml`` and ``hparams.yaml`` show them); an init arg given nowhere takes the checkpoint's
      value (Lightning's merge made the checkpoint win over everything); an init arg fixed by training
      (``BaseTask.immutable_hparams()``, the model class, the data spec) given another value is one error naming
      the key and both values;
    * a checkpoint trained on a store with another fingerprint: a resumed ``fit`` refuses, naming both stores;
      ``validate/test/predict`` warn once, naming both.

    Run path: a logger whose ``save_dir`` is given nowhere logs under ``trainer.default_root_dir``
    (:class:`RunPathParser`), so a config states the run's folder once.
    """

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        self._args: Any = args
        self._ckpt_meta: CheckpointMeta | None = None
        self._resume_version: int | None = None
        super().__init__(
            model_class=BaseTask,
            datamodule_class=StoreDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"parser_mode": "yaml"},
            args=args,
            run=run,
            auto_configure_optimizers=False,
            parser_class=RunPathParser,
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        if args is None or isinstance(args, list | tuple):
            refuse_linked_keys(list(sys.argv[1:] if args is None else args))
        super().parse_arguments(parser, args)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.spec", "model.init_args.data_spec", apply_on="instantiate")
        # stage 2: the datamodule loads the LLM's tokenizer from the model's path, with the model's chat template
        # (the data takes nothing from the model; both tokenise identically)
        parser.link_arguments("model.init_args.llm", "data.init_args.tokenizer", apply_on="parse")
        parser.link_arguments("model.init_args.chat_template", "data.init_args.chat_template", apply_on="parse")

    # --------------------------------------------------------------------------------- checkpoint config
    def _explicit_model(self, sub: str) -> dict[str, Any]:
        """The ``model`` values given on the command line and in ``-c`` files (no defaults), as plain data: the
        parser run again with ``defaults=False``."""
        args = self._args if self._args is not None else sys.argv[1:]
        if isinstance(args, dict | Namespace):
            given = self.parser.parse_object(args, defaults=False)
        else:
            given = self.parser.parse_args(list(args), defaults=False)
        model = plain(given.get(sub, {}).get("model")) if isinstance(given.get(sub), Namespace) else None
        return model if isinstance(model, dict) else {}

    def _resolve_last(self, sub: str, cfg: Namespace) -> str | None:
        """``--ckpt_path=last``: the newest complete checkpoint of the newest run (see the class docstring)."""
        trainer = cfg.get("trainer") or Namespace()
        try:
            layout = run_layout(trainer.get("logger"), trainer.get("default_root_dir"))
        except ValueError as e:
            raise CheckpointError("--ckpt_path=last", "trainer.logger", f"{e}; pass the checkpoint file") from None
        found = find_last(layout)
        where = layout.fixed if layout.fixed is not None else layout.root
        if found is None:
            if sub == "fit":  # the first run of a resumable command line: start from scratch, say so
                from lightning.pytorch.utilities import rank_zero_warn

                rank_zero_warn(f"--ckpt_path=last: no complete checkpoint under {where}; fit starts from scratch")
                return None
            raise CheckpointError("--ckpt_path=last", "ckpt_path", f"no complete checkpoint under {where}")
        path, version = found
        if sub == "fit":
            self._resume_version = version
        return str(path)

    def _parse_ckpt_path(self) -> None:
        """Replaces Lightning's merge, in which the checkpoint's ``hyper_parameters`` overwrote the parsed config
        (``test --ckpt_path=X --model.init_args.max_new_tokens=40`` ran with the checkpoint's value): here the
        checkpoint only fills the model init args the command line and ``-c`` files leave unset."""
        sub = self.config.get("subcommand")
        if not sub:
            return
        cfg = self.config[sub]
        ckpt = cfg.get("ckpt_path")
        if ckpt == "last":
            ckpt = self._resolve_last(sub, cfg)
            cfg.ckpt_path = ckpt
        if not ckpt or not (Path(ckpt).is_file() or is_complete(ckpt)):  # best/hpc/registry, missing: Lightning
            return
        if sub == "fit" and self._resume_version is None:
            try:
                trainer = cfg.get("trainer") or Namespace()
                self._resume_version = version_of(ckpt, run_layout(trainer.get("logger"),
                                                                    trainer.get("default_root_dir")))
            except ValueError:
                pass
        if self._resume_version is not None:
            self._set_logger_version(cfg, self._resume_version)
        meta = self._ckpt_meta = read_meta(ckpt)
        hp = dict(meta.hparams)
        for k in ("_instantiator", "data_spec"):  # data_spec: linked from the store, checked after instantiation
            hp.pop(k, None)
        trained_class = hp.pop("_class_path", None)
        if not hp and not trained_class:
            return
        given = self._explicit_model(sub)
        given_class = given.get("class_path")
        if trained_class and given_class and given_class != trained_class:
            raise CheckpointError(ckpt, "hyper_parameters/_class_path",
                                  f"the checkpoint is a {trained_class}, but the config gives model.class_path = "
                                  f"{given_class}")
        class_path = trained_class or plain(cfg.get("model") or {}).get("class_path")
        if not class_path:
            return
        cls = _import(class_path)
        immutable = cls.immutable_hparams() if isinstance(cls, type) and issubclass(cls, BaseTask) else frozenset()
        given_args = set((given.get("init_args") or {}) | (given.get("dict_kwargs") or {}))
        current = plain(cfg.get("model") or {}).get("init_args") or {}
        for k in sorted(given_args & immutable & set(hp)):
            if plain(current.get(k)) != plain(hp[k]):
                raise CheckpointError(ckpt, f"hyper_parameters/{k}",
                                      f"the checkpoint was trained with {k} = {plain(hp[k])!r}, but the config gives "
                                      f"model.init_args.{k} = {plain(current.get(k))!r}; {k} cannot change after "
                                      "training (drop it from the command line and -c files)")
        params = init_params(cls) if isinstance(cls, type) else None
        if params is not None:
            warn_unknown(set(hp) - params, class_path.rpartition(".")[2], ckpt)
            hp = {k: v for k, v in hp.items() if k in params}
        fill = {k: v for k, v in hp.items() if k not in given_args}
        if not fill and not (trained_class and not given_class):
            return
        model = {"class_path": class_path, "dict_kwargs": fill}
        try:
            self.config = self.parser.parse_object({sub: {"model": model}}, self.config)
        except SystemExit:
            sys.stderr.write(f"{ckpt}: parsing the checkpoint's hyper_parameters failed\n")
            raise

    @staticmethod
    def _set_logger_version(cfg: Namespace, version: int) -> None:
        """Log a resumed fit into the run's own ``version_N`` (a logger given as a class without a version)."""
        logger = cfg.get("trainer.logger")
        if isinstance(logger, list):
            logger = logger[0] if logger else None
        if isinstance(logger, Namespace) and isinstance(logger.get("init_args"), Namespace) \
                and "version" in logger.init_args and logger.init_args.version is None:
            logger.init_args.version = version

    # --------------------------------------------------------------------------------------- the trainer
    def instantiate_trainer(self, **kwargs: Any) -> Any:
        trainer = super().instantiate_trainer(**kwargs)
        install_atomic_io(trainer)
        # every subcommand (it saves only while fitting): a checkpoint's callback states then match the trainer's
        callbacks = trainer.callbacks  # type: ignore[attr-defined]  # set by Lightning's callback connector
        if trainer.checkpoint_callback is not None and not has_latest_checkpoint(callbacks):
            callbacks.append(LatestCheckpoint())  # checkpoint callbacks go last (Lightning's order)
        return trainer

    def _check_checkpoint(self, sub: str) -> None:
        """Before the run: the checkpoint's data spec and store against the run's (see the class docstring)."""
        if self._resume_version is not None and sub == "fit":
            logger = self.trainer.logger
            if logger is not None and getattr(logger, "_version", 0) is None:  # the default logger (logger: true)
                logger._version = self._resume_version  # type: ignore[attr-defined]  # TensorBoard/CSV loggers
        meta = self._ckpt_meta
        if meta is None:
            return
        spec = getattr(self.model, "hparams", {}).get("data_spec")
        check_data_spec(meta.hparams.get("data_spec"), plain(spec) if spec is not None else None, meta.path)
        dm = self.datamodule
        if isinstance(dm, StoreDataModule):
            check_store(meta, str(dm.store_path), dm.store.attrs.get("fingerprint") or None, refuse=sub == "fit")

    def before_fit(self) -> None:
        self._check_checkpoint("fit")

    def before_validate(self) -> None:
        self._check_checkpoint("validate")

    def before_test(self) -> None:
        self._check_checkpoint("test")

    def before_predict(self) -> None:
        self._check_checkpoint("predict")


class RunPathParser(LightningArgumentParser):
    """The LightningCLI parser, plus: ``trainer.logger``'s ``save_dir`` (each logger's, for a list), when no config
    file or argument gives it, is ``trainer.default_root_dir``. Filled before ``--print_config``, the links and
    the validation, so the printed, checked and saved config shows it, and ``--trainer.default_root_dir=X``
    moves the logs too; an explicit ``save_dir`` (``--trainer.logger.init_args.save_dir=Y``) wins."""

    def _parse_common(self, cfg: Namespace, env: bool | None, defaults: bool, skip_validation: bool,
                      *args: Any, **kwargs: Any) -> Namespace:
        if not skip_validation:  # the whole command line (a -c file alone is parsed without validation)
            sub = cfg.get("subcommand")
            fill_logger_save_dir(cfg.get(sub) if isinstance(sub, str) else cfg)
        return super()._parse_common(cfg, env, defaults, skip_validation, *args, **kwargs)


def fill_logger_save_dir(cfg: Any) -> None:
    """In a subcommand's config: every ``class_path``/``init_args`` logger without a ``save_dir`` (absent or
    null) gets ``trainer.default_root_dir`` (nothing when that is unset too)."""
    if not isinstance(cfg, Namespace) or not isinstance(cfg.get("trainer"), Namespace):
        return
    root = cfg.trainer.get("default_root_dir")
    logger = cfg.trainer.get("logger")
    if root is None or logger is None:
        return
    for lg in logger if isinstance(logger, list) else [logger]:
        if isinstance(lg, Namespace) and "class_path" in lg:
            init = lg.get("init_args")
            if init is None:
                lg.init_args = init = Namespace()
            if isinstance(init, Namespace) and init.get("save_dir") is None:
                init.save_dir = root


def _import(class_path: str) -> Any:
    import importlib

    mod, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError, ValueError):
        return None


# ------------------------------------------------------------------------------ the checked CLI
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
