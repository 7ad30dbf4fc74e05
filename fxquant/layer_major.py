"""Run a GraphModule one node at a time over every calibration sample (layer-major order).

A forward per sample (sample-major) holds one sample's activations but finishes no layer before
the last sample: a pass that keeps something per layer until the layer has seen every sample
(AWQ's sampled input rows) holds it for every layer at once. Layer-major order runs each node on
every sample before the next node, keeping the values of all samples of the live nodes (released
when their last consumer has run, fxquant.storage), so each layer is finished, and what it needed
can go, before the next one starts. Modules' hooks fire as in a forward: for one call node, sample
after sample.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import fx

from .calib_data import CalibBatch, check_finite
from .errors import CalibrationDataError, FxquantError
from .ir import bind_inputs, get_attr_path
from .resources import release_freed_memory
from .storage import ActivationStorage


def run_node(node: fx.Node, modules: dict[str, torch.nn.Module], value: Callable[[fx.Node], Any],
             sample: int) -> Any:
    """The output of `node` (call_module / call_function / call_method) with its input nodes'
    values given by `value`; a failure is a CalibrationDataError naming calib_data[sample] and the
    node (the graph ran calib_data[0] when it was captured, a later sample may not fit it)."""
    args = fx.node.map_arg(node.args, value)
    kwargs = fx.node.map_arg(node.kwargs, value)
    try:
        if node.op == "call_module":
            return modules[node.target](*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    except FxquantError:
        raise
    except Exception as exc:
        raise CalibrationDataError(f"calib_data[{sample}] fails at node {node.name!r} ({node.format_node()}): "
                                   f"{type(exc).__name__}: {exc}".strip()[:1500]) from exc


def bind_sample(gm: fx.GraphModule, sample: int, args: tuple, kwargs: dict[str, Any]) -> dict[fx.Node, Any]:
    """{placeholder: value} of calib_data[sample] bound to the graph's inputs as a call would bind
    them; CalibrationDataError naming the sample when it does not fit, or an input holding NaN / Inf."""
    try:
        bound = bind_inputs(gm, args, kwargs)
    except TypeError as exc:
        raise CalibrationDataError(f"calib_data[{sample}] does not fit the model's inputs: {exc}") from exc
    for ph, value in bound.items():
        check_finite(value, f"calibration input {ph.target!r} of calib_data[{sample}]")
    return bound


def bound_inputs(gm: fx.GraphModule, batches: list[CalibBatch]) -> dict[fx.Node, list[Any]]:
    """{placeholder: its value in each sample} (bind_sample of every sample)."""
    inputs: dict[fx.Node, list[Any]] = {}
    for b, (args, kwargs) in enumerate(batches):
        for ph, value in bind_sample(gm, b, args, kwargs).items():
            inputs.setdefault(ph, []).append(value)
    return inputs


def ancestors(nodes: Iterable[fx.Node]) -> set[fx.Node]:
    """`nodes` and every node they depend on."""
    out: set[fx.Node] = set()
    stack = list(nodes)
    while stack:
        node = stack.pop()
        if node not in out:
            out.add(node)
            stack.extend(node.all_input_nodes)
    return out


@torch.no_grad()
def run_layer_major(gm: fx.GraphModule, batches: list[CalibBatch], targets: Iterable[str],
                    after_node: Callable[[fx.Node], None] | None = None) -> None:
    """Run the call nodes of the modules named `targets`, and every node they depend on, each on
    every sample of `batches` before the next node; after_node(node) once a node has run on all
    of them. Nodes after the last target call are not run; values are released when their last
    consumer among the run nodes has run."""
    names = set(targets)
    run = ancestors(n for n in gm.graph.nodes if n.op == "call_module" and n.target in names)
    run.update(n for n in gm.graph.nodes if n.op == "placeholder")
    modules = dict(gm.named_modules())
    storage = ActivationStorage(gm.graph, None, run)
    inputs = bound_inputs(gm, batches)

    def value_in(sample: int) -> Callable[[fx.Node], Any]:
        return lambda n: get_attr_path(gm, n.target) if n.op == "get_attr" else storage.get(n)[sample]

    for node in gm.graph.nodes:
        if node not in run or node.op in ("get_attr", "output"):
            continue
        if node.op == "placeholder":
            storage.set(node, inputs.pop(node))
        else:
            storage.set(node, [run_node(node, modules, value_in(b), b) for b in range(len(batches))])
        storage.finish_node(node)
        if after_node is not None:
            after_node(node)
        if node.op == "call_module":
            release_freed_memory()  # released values leave holes that pin pages otherwise
