"""Activation storage for layerwise calibration, released by reference count in topological order."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import torch
from torch import fx

from .errors import FxquantError


def _stored_inputs(node: fx.Node) -> list[fx.Node]:
    """Distinct input nodes of `node` whose values live in storage (get_attr values are not stored)."""
    return [n for n in dict.fromkeys(node.all_input_nodes) if n.op != "get_attr"]


def _user_counts(graph: fx.Graph, run: Collection[fx.Node] | None) -> dict[fx.Node, int]:
    """Number of distinct consumers of each node among the nodes that will run."""
    return {n: sum(1 for u in n.users if run is None or u in run) for n in graph.nodes}


def graph_live_set_size(graph: fx.Graph, run: Collection[fx.Node] | None = None) -> int:
    """Largest number of node values that must be held at once when running `graph` in order.

    run: the nodes that execute (default all). A value is live from the node that makes it until
    its last consumer among `run` has run; get_attr values are fetched, not held; values nobody
    consumes die at once.
    """
    remaining = _user_counts(graph, run)
    live = peak = 0
    for node in graph.nodes:
        if run is not None and node not in run:
            continue
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

    run: the nodes that will execute (default all); consumers outside it are not waited for.

    offload: device where values are kept (e.g. "cpu" while the layers run on an accelerator);
    None keeps them where they were produced.
    """

    def __init__(self, graph: fx.Graph, offload: str | torch.device | None = None,
                 run: Collection[fx.Node] | None = None) -> None:
        self._remaining = _user_counts(graph, run)
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
