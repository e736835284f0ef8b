"""The LightningCLI subclass behind ``neurovision fit|validate|test|predict`` (module level: picklable)."""

from __future__ import annotations

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

import neurovision  # noqa: F401  (torchvision fix first)
from data_modules.fmri import StoreDataModule
from neurovision.tasks.base import BaseTask


class NeuroVisionCLI(LightningCLI):
    """LightningCLI with neurovision's base task and datamodule (subclass mode), seed 0 by default, the run's
    config saved with overwrite; links what the data decides (``data.spec`` -> ``model.init_args.data_spec``)."""

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
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
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.spec", "model.init_args.data_spec", apply_on="instantiate")
