"""Activation storage for layerwise calibration, released by reference count in topological order."""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from .errors import FxquantError


def _stored_inputs(node: fx.Node) -> list[fx.Node]:
    """Distinct input nodes of `node` whose values live in storage (get_attr values are not stored)."""
    return [n for n in dict.fromkeys(node.all_input_nodes) if n.op != "get_attr"]


def graph_live_set_size(graph: fx.Graph) -> int:
    """Largest number of node values that must be held at once when running `graph` in order.

    A value is live from the node that makes it until its last user has run (users are counted
    per distinct consumer node; get_attr values are fetched, not held; unused values die at once).
    """
    remaining = {n: len(n.users) for n in graph.nodes}
    live = peak = 0
    for node in graph.nodes:
        if node.op in ("get_attr", "output"):
            pass
        else:
            live += 1
            peak = max(peak, live)
            if remaining[node] == 0:
                live -= 1
        for inp in _stored_inputs(node):
            remaining[inp] -= 1
            if remaining[inp] == 0:
                live -= 1
    return peak


class ActivationStorage:
    """Per-node lists of values (one per calibration batch), freed when their last consumer ran.

    offload: device where values are kept (e.g. "cpu" while the layers run on an accelerator);
    None keeps them where they were produced.
    """

    def __init__(self, graph: fx.Graph, offload: str | torch.device | None = None) -> None:
        self._remaining = {n: len(n.users) for n in graph.nodes}
        self._values: dict[fx.Node, list[Any]] = {}
        self.offload = offload
        self.peak_live = 0

    def __contains__(self, node: fx.Node) -> bool:
        return node in self._values

    def __len__(self) -> int:
        return len(self._values)

    def set(self, node: fx.Node, values: list[Any]) -> None:
        """Store the per-batch values of `node`."""
        if self.offload is not None:
            values = [_to_device(v, self.offload) for v in values]
        self._values[node] = values
        self.peak_live = max(self.peak_live, len(self._values))

    def get(self, node: fx.Node) -> list[Any]:
        """The per-batch values of `node`; KeyError names the node if it was released or never set."""
        try:
            return self._values[node]
        except KeyError:
            raise FxquantError(f"value of node {node.name!r} is not in storage (released or never computed)") from None

    def finish_node(self, node: fx.Node) -> None:
        """`node` has run: release inputs it was the last consumer of, and itself if nothing uses it."""
        for inp in _stored_inputs(node):
            self._remaining[inp] -= 1
            if self._remaining[inp] == 0:
                self._values.pop(inp, None)
        if self._remaining.get(node, 0) == 0:
            self._values.pop(node, None)

    def assert_empty(self) -> None:
        """Raise if any value is still held (a consumer was skipped or counts are wrong)."""
        if self._values:
            names = ", ".join(n.name for n in list(self._values)[:10])
            raise FxquantError(f"{len(self._values)} stored values left after calibration: {names}")


def _to_device(value: Any, device: str | torch.device) -> Any:
    return torch.utils._pytree.tree_map_only(torch.Tensor, lambda t: t.to(device), value)
