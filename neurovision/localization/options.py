"""The options of concept localisation, stated once: ``neurovision localize`` builds its flags from
:class:`LocalizationOptions`, :class:`callbacks.ConceptMaps` takes one, and :func:`~neurovision.localization.maps.
localize` receives them through :meth:`LocalizationOptions.localize_kwargs` (tests/test_interpretation.py checks
that the dataclass's defaults are ``localize``'s)."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, fields
from typing import Any, Literal

Split = Literal["train", "val", "test"]
Condition = Literal["average", "single"]
Method = Literal["gradcam", "pattern"]
Aggregate = Literal["present", "contrast"]
Upsample = Literal["trilinear", "nearest"]
Mask = Literal["roi", "active"]
Target = Literal["relative", "similarity"]

# the help of each option (the command's --help and the docs' API page)
HELP = {
    "concepts": "concept words (default: the store's)",
    "split": "the store split whose items are explained",
    "condition": "average: each image's repeats averaged (one item per subject and image); single: every trial",
    "method": "gradcam (the paper's) or pattern (the signed activation pattern of the prediction)",
    "aggregate": "present: the mean map over the items showing the concept; contrast: minus the others' mean",
    "upsample": "patch -> voxel spreading",
    "mask": "where r against the planted maps is reported (both are computed)",
    "relu": "GradCAM's ReLU (off: signed maps)",
    "layer": "GradCAM at the hidden states entering this encoder block (-1: the last, the paper's penultimate "
             "layer; 0: the token embeddings)",
    "target": "the explained score: the concept's CLIP similarity minus the mean similarity to the store's "
              "concepts (relative) or the plain similarity (the paper's)",
    "prompt": "text template of a concept, e.g. 'a picture of a {}'",
    "batch_size": "items per GradCAM batch",
}


@dataclass(frozen=True)
class LocalizationOptions:
    """How concept maps are made and scored (see :data:`HELP` for each field)."""

    concepts: list[str] | None = None
    split: Split = "test"
    condition: Condition = "average"
    method: Method = "gradcam"
    aggregate: Aggregate = "present"
    upsample: Upsample = "trilinear"
    mask: Mask = "roi"
    relu: bool = True
    layer: int = -1
    target: Target = "relative"
    prompt: str = "{}"
    batch_size: int = 64

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            choices = typing.get_args(hints[f.name])
            value = getattr(self, f.name)
            if typing.get_origin(hints[f.name]) is Literal and value not in choices:
                raise ValueError(f"localization option {f.name}={value!r}: one of {', '.join(choices)}")
        if self.batch_size < 1:
            raise ValueError(f"localization option batch_size={self.batch_size}: at least 1")
        if "{}" not in self.prompt:
            raise ValueError(f"localization option prompt={self.prompt!r}: needs a {{}} for the concept word")

    def localize_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`~neurovision.localization.maps.localize` these options set."""
        kw = dataclasses.asdict(self)
        kw["aggregate_mode"] = kw.pop("aggregate")
        return kw

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add one flag per option to an argparse parser (``--batch-size``; ``--no-relu`` for ``relu``)."""
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            flag, hint, default = "--" + f.name.replace("_", "-"), hints[f.name], f.default
            if hint is bool:
                parser.add_argument(f"--no-{f.name}", action="store_true", help=f"{HELP[f.name]}: off")
            elif typing.get_origin(hint) is Literal:
                parser.add_argument(flag, default=default, choices=list(typing.get_args(hint)), help=HELP[f.name])
            elif f.name == "concepts":
                parser.add_argument(flag, nargs="+", default=default, help=HELP[f.name])
            else:
                parser.add_argument(flag, type=type(default), default=default, help=HELP[f.name])

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> LocalizationOptions:
        """The options a parser of :meth:`add_arguments` parsed."""
        hints = typing.get_type_hints(cls)
        values: dict[str, Any] = {f.name: (not getattr(ns, f"no_{f.name}")) if hints[f.name] is bool
                                  else getattr(ns, f.name) for f in fields(cls)}
        return cls(**values)
