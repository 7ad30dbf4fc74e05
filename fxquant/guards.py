"""Input guards the captured graph calls first: they turn a call the graph cannot honour into a clear error.

A captured graph is specialised to the inputs seen at capture: tensors stay inputs, other values
(use_cache=False, return_dict=True, ...) are baked in, and absent optional inputs are unused.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import fx

from .errors import FxquantError


class CapturedInputError(FxquantError, TypeError):
    """A call passes an input the captured graph was not specialised for."""


@fx.wrap
def expect_tensor(value: Any, name: str) -> None:
    """Raise unless `value` is a tensor (it was one at capture)."""
    if not isinstance(value, torch.Tensor):
        raise CapturedInputError(
            f"input {name!r} was a tensor when the model was captured but got {type(value).__name__}")


@fx.wrap
def expect_constant(value: Any, expected: Any, name: str) -> None:
    """Raise unless `value == expected` (the non-tensor value seen at capture)."""
    same = value is expected
    if not same:
        try:
            same = bool(value == expected)
        except Exception:  # noqa: BLE001 - unequal types that refuse comparison
            same = False
    if not same:
        raise CapturedInputError(
            f"input {name!r} was {expected!r} when the model was captured and the graph is "
            f"specialised to it; got {value!r}. Capture again with the value you need.")


@fx.wrap
def expect_unused(value: Any, default: Any, name: str) -> None:
    """Raise unless `value` is the default: the input was absent at capture, so the graph ignores it."""
    if value is not default and not (value is None and default is None):
        raise CapturedInputError(
            f"input {name!r} was not given when the model was captured, so the graph does not use "
            f"it; capture with it (e.g. include it in the calibration data) to pass it.")


@fx.wrap
def expect_no_tensors(extra: dict[str, Any], name: str) -> None:
    """Raise if **kwargs carries a tensor: the captured graph would ignore it silently.

    Non-tensor options passed through **kwargs (return_dict=True, ...) are accepted and ignored:
    the graph was specialised to the options seen at capture.
    """
    tensors = sorted(k for k, v in extra.items() if isinstance(v, torch.Tensor))
    if tensors:
        raise CapturedInputError(
            f"tensor inputs {tensors} arrive through **{name}, which the captured graph ignores; "
            "capture with them to use them")


class ShapeGuards(torch.nn.Module):
    """The input-shape conditions torch.export assumed when it captured the graph, checked on each call.

    conditions: (Python expression over `args`, the same over the inputs' names), one per condition;
    `args` are the graph's tensor and scalar inputs in placeholder order (e.g. `args[0].size()[1]
    == 3`). Pickled as source text and compiled when built or loaded, never while torch.compile or
    torch.export traces the module (Dynamo cannot trace `eval`).
    """

    _is_impure = True  # called for its check alone: dead-code elimination keeps it

    def __init__(self, conditions: list[tuple[str, str]]) -> None:
        super().__init__()
        self.conditions = list(conditions)
        self._compile()

    def _compile(self) -> None:
        from torch.fx.experimental.symbolic_shapes import SYMPY_INTERP  # Min, Max, FloorDiv, ...

        namespace = {**SYMPY_INTERP, "math": math, "inf": math.inf}
        self.__dict__["_checks"] = [(eval(f"lambda *args: {code}", namespace), readable)  # noqa: S307
                                    for code, readable in self.conditions]  # text that torch.export wrote

    def forward(self, *args: Any) -> None:
        for holds, readable in self._checks:
            if not holds(*args):
                shapes = ", ".join(str(tuple(a.shape)) if isinstance(a, torch.Tensor) else repr(a) for a in args)
                raise CapturedInputError(
                    f"the captured graph requires {readable}: torch.export specialised it to that when "
                    f"the model was captured; got inputs of shapes {shapes}. Capture with an example "
                    f"of the shapes you need.")

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_checks"]  # functions made by eval do not pickle
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._compile()

    def extra_repr(self) -> str:
        return "; ".join(readable for _, readable in self.conditions)
