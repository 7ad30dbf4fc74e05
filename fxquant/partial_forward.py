"""Forwards run for their hooks: stop once the last observed layer has run.

Statistics and calibration passes call the graph only so that pre-hooks on some layers see their
inputs; what the graph computes after the last of those layers (an LLM's head: a fifth of
SmolLM2's multiply-adds, and its [tokens, vocab] logits) is thrown away. A GraphModule runs its
nodes in topological order, so once the last call node of the observed modules has run, every
observed call has.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import fx


class _LastObservedLayerRan(Exception):
    """Raised by the forward hook of the last observed call node to end the forward."""


@contextmanager
def forward_until(gm: fx.GraphModule, targets: Iterable[str]) -> Iterator[Callable[..., None]]:
    """Yields run(*args, **kwargs): gm(*args, **kwargs) that returns None as soon as the last call
    node of the modules named `targets` (in graph order) has run, skipping the nodes after it.
    Without such a call node, run is the whole forward."""
    names = set(targets)
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target in names]
    if not calls:
        def whole(*args: Any, **kwargs: Any) -> None:
            gm(*args, **kwargs)
        yield whole
        return
    last = calls[-1].target
    expected = sum(1 for n in calls if n.target == last)  # its last call is the graph's last observed one
    seen = [0]

    def hook(module: Any, args: Any, output: Any) -> None:
        seen[0] += 1
        if seen[0] == expected:
            raise _LastObservedLayerRan

    def run(*args: Any, **kwargs: Any) -> None:
        seen[0] = 0
        try:
            gm(*args, **kwargs)
        except _LastObservedLayerRan:
            pass

    handle = gm.get_submodule(last).register_forward_hook(hook)
    try:
        yield run
    finally:
        handle.remove()
