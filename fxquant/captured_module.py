"""CapturedGraphModule: the GraphModule fxquant returns, which pickles with its graph.

torch.fx pickles a GraphModule as its generated Python code and re-traces that code when it is
loaded. Graphs that torch.export captured do not survive that trace (aten ops, the signature and
output-type codegen, fxquant's input guards), and the re-traced graph would lose every node's
`meta` (the scheme decisions and kernels that inspection reads). A CapturedGraphModule pickles the
graph itself instead: each node's op, name, target, arguments and picklable meta, and the
graph's codegen. `torch.save(qmodel)` / `torch.load(..., weights_only=False)` and `copy.deepcopy`
then give back the same graph computing the same outputs.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import pickle
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx
from torch.fx.graph import CodeGen, _PyTreeCodeGen, _PyTreeInfo
from torch.utils import _pytree as pytree

from .errors import ConfigError

log = logging.getLogger(__name__)

# Node meta that describes tracing-time values (fake tensors, symbolic shapes): not kept in a pickle.
_TRACING_META = frozenset({"val", "tensor_meta", "example_value", "unbacked_bindings"})


@dataclass(frozen=True)
class _NodeRef:
    """An argument that is the output of the node called `name`."""

    name: str


@dataclass(frozen=True)
class _OpRef:
    """A torch.ops operator by its qualified name (OpOverloads do not pickle), e.g. 'aten::linear.default'."""

    qualname: str

    @classmethod
    def of(cls, op: torch._ops.OpOverload | torch._ops.OpOverloadPacket) -> _OpRef:
        if isinstance(op, torch._ops.OpOverload):
            return cls(f"{op._schema.name}.{op._overloadname}")
        return cls(op._qualified_op_name)

    def resolve(self) -> torch._ops.OpOverload | torch._ops.OpOverloadPacket:
        namespace, _, rest = self.qualname.partition("::")
        name, _, overload = rest.partition(".")
        packet = getattr(getattr(torch.ops, namespace), name)
        return getattr(packet, overload) if overload else packet


def _spec_state(spec: pytree.TreeSpec) -> Any:
    """A TreeSpec as nested (type, context, children), "leaf" for a leaf: unpickling torch's leaf
    spec objects raises a deprecation warning in torch 2.13."""
    if spec.is_leaf():
        return "leaf"
    return (spec.type, spec._context, [_spec_state(c) for c in spec.children()])


def _spec_from_state(state: Any) -> pytree.TreeSpec:
    if state == "leaf":
        return pytree.treespec_leaf()
    node_type, context, children = state
    return pytree.TreeSpec(node_type, context, [_spec_from_state(c) for c in children])


def _codegen_state(codegen: CodeGen) -> Any:
    if isinstance(codegen, _PyTreeCodeGen):
        info = codegen.pytree_info
        specs = [None if spec is None else _spec_state(spec) for spec in (info.in_spec, info.out_spec)]
        return (type(codegen), info.orig_args, *specs)
    return codegen


def _codegen_from_state(state: Any) -> CodeGen:
    if not isinstance(state, tuple):
        return state
    codegen_type, orig_args, *specs = state
    in_spec, out_spec = (None if spec is None else _spec_from_state(spec) for spec in specs)
    return codegen_type(_PyTreeInfo(orig_args, in_spec, out_spec))


def _encode(value: Any) -> Any:
    """`value` (a target or arguments) with nodes and torch.ops operators as picklable references."""
    def leaf(v: Any) -> Any:
        if isinstance(v, fx.Node):
            return _NodeRef(v.name)
        if isinstance(v, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
            return _OpRef.of(v)
        return v
    return fx.node.map_aggregate(value, leaf)


def _decode(value: Any, nodes: dict[str, fx.Node]) -> Any:
    def leaf(v: Any) -> Any:
        if isinstance(v, _NodeRef):
            return nodes[v.name]
        return v.resolve() if isinstance(v, _OpRef) else v
    return fx.node.map_aggregate(value, leaf)


def _picklable_meta(node: fx.Node) -> dict[str, Any]:
    """node.meta without tracing-time values and without entries that do not pickle."""
    kept = {}
    for key, value in node.meta.items():
        if key in _TRACING_META:
            continue
        try:
            pickle.dumps(value)
        except Exception:  # noqa: BLE001 - any value that refuses pickling is left out
            log.debug("node %s: meta %r does not pickle; left out", node.name, key)
            continue
        kept[key] = value
    return kept


def graph_state(graph: fx.Graph) -> dict[str, Any]:
    """A picklable description of `graph`: its nodes in order and its codegen."""
    nodes = []
    for node in graph.nodes:
        target = _encode(node.target)
        try:
            pickle.dumps(target)
        except Exception as e:
            raise pickle.PicklingError(
                f"node {node.name!r} calls {node.target!r}, which does not pickle ({e}); "
                "save the quantized model with fxquant.save_ascend or its state_dict instead") from e
        nodes.append((node.op, node.name, target, _encode(node.args), _encode(node.kwargs),
                      _picklable_meta(node)))
    return {"nodes": nodes, "codegen": _codegen_state(graph._codegen)}


def graph_from_state(state: dict[str, Any]) -> fx.Graph:
    """The graph that `graph_state` described."""
    graph = fx.Graph()
    by_name: dict[str, fx.Node] = {}
    for op, name, target, args, kwargs, meta in state["nodes"]:
        node = graph.create_node(op, _decode(target, by_name), _decode(args, by_name), _decode(kwargs, by_name),
                                 name=name)
        if node.name != name:
            raise pickle.UnpicklingError(f"node {name!r} was renamed to {node.name!r} while rebuilding the graph")
        node.meta.update(meta)
        by_name[name] = node
    graph.set_codegen(_codegen_from_state(state["codegen"]))
    return graph


@contextlib.contextmanager
def quiet_treespec_copies() -> Iterator[None]:
    """Silence the deprecation warning torch 2.13 raises when it copies its own leaf TreeSpec."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
        yield


class CapturedGraphModule(fx.GraphModule):
    """A GraphModule that pickles and deep-copies whole: its graph (nodes, meta, codegen), its class
    name, and every attribute (submodules, the model's config, ...), not only what the graph uses."""

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> CapturedGraphModule:
        """Refuse `.to(dtype)` / `.half()` / ... on a graph torch.export captured: its casts and
        dtype checks keep the dtype it was captured in, so a cast graph fails or computes in both."""
        if self.meta.get("fxquant_capture") == "export":
            dtypes = {t.dtype for t in [*self.parameters(), *self.buffers()] if t.is_floating_point()}
            for dtype in sorted(dtypes, key=str):
                new = fn(torch.empty(0, dtype=dtype)).dtype
                if new != dtype:
                    raise ConfigError(
                        f"this graph was captured by torch.export in {dtype}, which its casts and dtype "
                        f"checks keep; it cannot be cast to {new}. Load the model in {new} and quantize "
                        f"it in that dtype (`fxquant quantize --dtype`), or quantize with inplace=True "
                        f"and cast the model")
        return super()._apply(fn, recurse)

    def _module_state(self) -> dict[str, Any]:
        rebuilt = ("_graph", "_code", "_in_spec", "_out_spec")  # from the graph, when it is set
        return {k: v for k, v in self.__dict__.items() if k not in rebuilt}

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (self._module_state(), graph_state(self.graph), type(self).__name__))

    def __deepcopy__(self, memo: dict[int, Any]) -> CapturedGraphModule:
        copied = CapturedGraphModule(torch.nn.Module(), fx.Graph(), type(self).__name__)
        memo[id(self)] = copied
        copied.__dict__.update(copy.deepcopy(self._module_state(), memo))
        with quiet_treespec_copies():
            copied.graph = copy.deepcopy(self.graph, memo)
        return copied


def _rebuild(module_state: dict[str, Any], graph: dict[str, Any], class_name: str) -> CapturedGraphModule:
    gm = CapturedGraphModule(torch.nn.Module(), fx.Graph(), class_name)
    gm.__dict__.update(module_state)  # the same submodules, parameters, buffers, meta and attributes
    gm.graph = graph_from_state(graph)  # and the same graph (the setter generates its code)
    return gm
