"""Lift a graph that torch.compile's Dynamo hands to a backend into fxquant's IR.

Dynamo inlines nn.Modules: parameters and buffers arrive as placeholders (their source names the
attribute path, e.g. `L['self']._modules['lm_head']._parameters['weight']`) and layers as
`torch._C._nn.linear(x, weight, bias)` / `torch.conv2d(...)` calls. The IR wants what capture()
gives: module state as attributes, each Linear / Conv call a call_module named by the layer's fully
qualified name, and the remaining placeholders the graph's real inputs.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from fxquant.ir import frozen_parameter, get_attr_path, linear_from

log = logging.getLogger(__name__)

_LINEAR_TARGETS = {torch._C._nn.linear, F.linear}
_CONV_TARGETS = {torch.conv1d: torch.nn.Conv1d, F.conv1d: torch.nn.Conv1d,
                 torch.conv2d: torch.nn.Conv2d, F.conv2d: torch.nn.Conv2d}
_STATE_SOURCE = re.compile(r"_(parameters|buffers)'?\]?\[")
_PATH_TOKEN = re.compile(r"\.(\w+)|\[\s*'([^']*)'\s*\]|\[\s*(\d+)\s*\]")
_CONTAINER_ATTRS = {"__dict__", "_modules", "_parameters", "_buffers"}


@dataclass
class LiftedGraph:
    """A Dynamo graph in the IR.

    gm: forward(*inputs) over the Dynamo graph's non-state placeholders, module state as
    attributes; input_positions: where those inputs sit in Dynamo's flat argument list;
    layer_names: the Linear / Conv layers (fully qualified names) in graph order.
    """

    gm: fx.GraphModule
    input_positions: tuple[int, ...]
    layer_names: tuple[str, ...]

    def inputs_of(self, dynamo_args: Sequence[Any]) -> tuple[Any, ...]:
        """The lifted graph's inputs out of the arguments Dynamo calls the compiled graph with."""
        return tuple(dynamo_args[i] for i in self.input_positions)


def module_path(dynamo_path: str) -> str:
    """Fully qualified module name from a Dynamo source path: "L['self'].model.layers[0].mlp",
    "L['self']._modules['model']._modules['layers']._modules['0']._modules['mlp']",
    "L['self'].model.layers.0.mlp", "L['self'].__dict__['_modules']['model']..." and, where the
    module's forward runs in a decorator's wrapper(*args, **kwargs) (transformers' models),
    "L['args'][0].model.layers.0.mlp" all give "model.layers.0.mlp"."""
    rest = re.sub(r"^[LG]\['args'\]\[\d+\]|^[LG]\['[^']*'\]", "", dynamo_path)
    parts = [a or b or c for a, b, c in _PATH_TOKEN.findall(rest)]
    return ".".join(p for p in parts if p not in _CONTAINER_ATTRS)


def _source_name(node: fx.Node) -> str:
    arg = node.meta.get("grapharg")
    source = getattr(arg, "source", None)
    return source.name if source is not None and hasattr(source, "name") else ""


def _is_module_state(node: fx.Node, value: Any) -> bool:
    return isinstance(value, torch.nn.Parameter) or bool(_STATE_SOURCE.search(_source_name(node)))


def lift_dynamo_graph(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> LiftedGraph:
    """The IR form of Dynamo's `gm` (called with `example_inputs`); `gm` is left as it is."""
    graph = fx.Graph()
    root = torch.nn.Module()
    val_map: dict[fx.Node, fx.Node] = {}
    positions = []
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, (node, value) in enumerate(zip(placeholders, example_inputs, strict=True)):
        if _is_module_state(node, value):
            name = f"_state_{len(root._buffers) + len(root._parameters)}"
            if isinstance(value, torch.nn.Parameter):
                root.register_parameter(name, value)
            else:
                root.register_buffer(name, value)
            new = graph.get_attr(name)
            new.meta["fxquant_source"] = module_path(_source_name(node))
        else:
            new = graph.placeholder(node.name)
            positions.append(i)
        new.meta.update({k: v for k, v in node.meta.items() if k != "grapharg"})
        val_map[node] = new
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            graph.output(fx.map_arg(node.args[0], lambda n: val_map[n]))
            continue
        new = graph.node_copy(node, lambda n: val_map[n])
        if node.op in ("get_attr", "call_module"):
            _install(root, node.target, get_attr_path(gm, node.target))
        val_map[node] = new
    for node in graph.nodes:
        _normalise_meta(node)
    layers = [name for node in list(graph.nodes) if (name := _layer_to_call_module(graph, root, node))]
    graph.lint()
    lifted = fx.GraphModule(root, graph, "DynamoGraph")
    return LiftedGraph(lifted, tuple(positions), tuple(layers))


def _install(root: torch.nn.Module, target: str, value: Any) -> None:
    """Set root.<target> (a dotted path; missing parents become empty modules) to `value`."""
    *parents, leaf = target.split(".")
    owner = root
    for part in parents:
        if not hasattr(owner, part):
            owner.add_module(part, torch.nn.Module())
        owner = getattr(owner, part)
    if isinstance(value, torch.nn.Module):
        owner.add_module(leaf, value)
    elif isinstance(value, torch.nn.Parameter):
        owner.register_parameter(leaf, value)
    elif isinstance(value, torch.Tensor):
        owner.register_buffer(leaf, value)
    else:
        setattr(owner, leaf, value)


def _normalise_meta(node: fx.Node) -> None:
    """Dynamo's example values as "val" (what the passes read), module paths as names."""
    if "val" not in node.meta and "example_value" in node.meta:
        node.meta["val"] = node.meta["example_value"]
    stack = node.meta.get("nn_module_stack")
    if stack:
        node.meta["nn_module_stack"] = {
            key: (module_path(path[0]), *path[1:]) if isinstance(path, tuple) else module_path(path)
            for key, path in stack.items()}


def _layer_to_call_module(graph: fx.Graph, root: torch.nn.Module, node: fx.Node) -> str | None:
    """Turn linear / conv on module state into call_module(<layer name>); the name, or None."""
    if node.op != "call_function" or not (node.target in _LINEAR_TARGETS or node.target in _CONV_TARGETS):
        return None
    args = list(node.args) + [node.kwargs[k] for k in ("weight", "bias") if k in node.kwargs]
    if len(args) < 2 or not all(isinstance(a, fx.Node) and a.op == "get_attr" for a in args[1:3] if a is not None):
        return None
    weight = get_attr_path(root, args[1].target)
    bias = get_attr_path(root, args[2].target) if len(args) > 2 and args[2] is not None else None
    name = _layer_name(node, args[1])
    if name in dict(root.named_modules()):
        log.warning("layer %s is called more than once in one graph; its call %s stays float", name, node.name)
        return None
    if node.target in _LINEAR_TARGETS:
        if len(args) > 3:
            return None
        layer = linear_from(weight, bias)
    else:
        layer = _conv_layer(_CONV_TARGETS[node.target], node, weight, bias)
        if layer is None:
            return None
        layer.weight = frozen_parameter(weight)
        if bias is not None:
            layer.bias = frozen_parameter(bias)
    _install(root, name, layer)
    with graph.inserting_before(node):
        new = graph.call_module(name, (node.args[0],))
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    return name


def _layer_name(node: fx.Node, weight: fx.Node) -> str:
    """The layer's name: the innermost module of the call (a tied lm_head reads its weight from the
    embedding, so the weight's own path would misname it), else the weight's path."""
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path, cls = list(stack.values())[-1][:2]
        if isinstance(cls, type) and issubclass(cls, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)) and path:
            return path
    source = weight.meta.get("fxquant_source", "")
    return source.rsplit(".", 1)[0] if "." in source else f"layer_{node.name}"


def _conv_layer(cls: type, node: fx.Node, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.nn.Module | None:
    names = ("stride", "padding", "dilation", "groups")
    extra = dict(zip(names, node.args[3:]))
    extra.update({k: v for k, v in node.kwargs.items() if k in names})
    if any(isinstance(v, fx.Node) for v in extra.values()):
        return None
    groups = int(extra.get("groups", 1))
    return cls(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), stride=extra.get("stride", 1),
               padding=extra.get("padding", 0), dilation=extra.get("dilation", 1), groups=groups,
               bias=bias is not None, device="meta")
