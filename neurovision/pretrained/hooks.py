"""The one forward-hook helper: capture what named modules of a network return (or receive) during a forward.

Used by the feature networks of the encoding stage (:mod:`neurovision.pretrained.feature_networks`), the image
metrics' feature layers (:func:`neurovision.metrics.images.extract_features`) and GradCAM
(:mod:`neurovision.localization.maps`, which needs the captured input to be differentiable).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

__all__ = ["ForwardHooks", "check_module_names"]


def check_module_names(model: nn.Module, names: Sequence[str], owner: str) -> None:
    """``ValueError`` naming ``owner``, the unknown names and a sample of the model's module names, unless every
    name in ``names`` is a (non-root) module of ``model``."""
    known = {n for n, _ in model.named_modules() if n}
    missing = [n for n in names if n not in known]
    if missing:
        sample = sorted(known, key=lambda s: (s.count("."), s))[:20]
        raise ValueError(f"{owner}: no module named {missing} in the model (module names look like "
                         f"{sample} ...)")


def _differentiable(x: Any) -> Any:
    """``x``, or a detached copy that requires grad when ``x`` is a floating tensor that does not."""
    if isinstance(x, torch.Tensor) and x.is_floating_point() and not x.requires_grad:
        return x.detach().requires_grad_()
    return x


class ForwardHooks:
    """Hooks on the modules ``names`` of ``model`` for the duration of a ``with`` block.

    After each forward, ``out[name]`` holds what the module returned (``capture="output"``) or the first
    positional argument it was called with (``capture="input"``, a forward pre-hook) in the latest call.
    ``differentiable=True`` hands the rest of the network a copy that requires grad (when the tensor does not
    already), so ``torch.autograd.grad`` with respect to ``out[name]`` works even when the network's parameters
    are frozen; otherwise the captured value is the module's own, untouched. The hooks are removed when the block
    ends, also on an error.

    Raises ``ValueError`` (naming ``owner``) for a name that is not a module of ``model``.
    """

    def __init__(self, model: nn.Module, names: Sequence[str], *, capture: Literal["output", "input"] = "output",
                 differentiable: bool = False, owner: str | None = None) -> None:
        if capture not in ("output", "input"):
            raise ValueError(f"capture must be 'output' or 'input', got {capture!r}")
        check_module_names(model, names, owner or type(model).__name__)
        self.model, self.names = model, list(names)
        self.capture, self.differentiable = capture, bool(differentiable)
        self.out: dict[str, Any] = {}
        self._handles: list[Any] = []

    def _output_hook(self, name: str) -> Any:
        def fn(module: nn.Module, args: Any, output: Any) -> Any:
            if self.differentiable:
                output = _differentiable(output)
            self.out[name] = output
            return output if self.differentiable else None
        return fn

    def _input_hook(self, name: str) -> Any:
        def fn(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
            if not args:
                raise RuntimeError(f"module {name!r} was called without a positional input to capture")
            x = _differentiable(args[0]) if self.differentiable else args[0]
            self.out[name] = x
            return (x, *args[1:]) if self.differentiable else None
        return fn

    def __enter__(self) -> ForwardHooks:
        modules = dict(self.model.named_modules())
        for name in self.names:
            module = modules[name]
            if self.capture == "output":
                self._handles.append(module.register_forward_hook(self._output_hook(name)))
            else:
                self._handles.append(module.register_forward_pre_hook(self._input_hook(name)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
