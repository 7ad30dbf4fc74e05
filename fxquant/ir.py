"""Helpers over the one IR every pass sees (a torch.fx.GraphModule; see docs/ir.md)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch import fx

META_KEY = "fxquant"


def fxq_meta(node: fx.Node) -> dict[str, Any]:
    """The fxquant decision record of `node` (scheme, reason, ...), created on first use."""
    return node.meta.setdefault(META_KEY, {})


def module_of(gm: fx.GraphModule, node: fx.Node) -> torch.nn.Module | None:
    """The module a call_module node calls, else None."""
    if node.op != "call_module":
        return None
    return gm.get_submodule(node.target)


#: call_function targets of scaled-dot-product attention, in traced (torch) and exported (aten) graphs
SDPA_TARGETS = frozenset({torch.ops.aten.scaled_dot_product_attention.default,
                          torch.nn.functional.scaled_dot_product_attention})


def scope_of(node: fx.Node) -> str:
    """Fully qualified name of the innermost module the node was traced in ('' at top level)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1]
    path = path[0] if isinstance(path, tuple) else path
    return path if isinstance(path, str) else ""


def placeholders(gm: fx.GraphModule) -> list[fx.Node]:
    """The graph's placeholder nodes in signature order."""
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


def bind_inputs(gm: fx.GraphModule, args: tuple, kwargs: dict[str, Any]) -> dict[fx.Node, Any]:
    """Map one call's (args, kwargs) onto the placeholders, filling defaults, like Python would."""
    phs = placeholders(gm)
    var_kw = next((p for p in phs if p.target.startswith("**")), None)
    phs = [p for p in phs if not p.target.startswith("*")]
    names = [p.target for p in phs]
    if len(args) > len(phs):
        raise TypeError(f"{len(args)} positional inputs given but the graph takes {len(phs)}: {names}")
    bound: dict[fx.Node, Any] = dict(zip(phs, args))
    by_name = {p.target: p for p in phs}
    extra: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key not in by_name and var_kw is not None:
            extra[key] = value
            continue
        if key not in by_name:
            raise TypeError(f"unexpected input {key!r}; the graph takes {names}")
        if by_name[key] in bound:
            raise TypeError(f"input {key!r} given twice")
        bound[by_name[key]] = value
    for p in phs:
        if p not in bound:
            if not p.args:
                raise TypeError(f"missing required input {p.target!r}")
            bound[p] = p.args[0]
    if var_kw is not None:
        bound[var_kw] = extra
    return bound


def replace_submodule(gm: fx.GraphModule, target: str, module: torch.nn.Module) -> None:
    """Install `module` at dotted `target` inside gm (parents must exist)."""
    parent_name, _, leaf = target.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    setattr(parent, leaf, module)


def get_attr_path(root: torch.nn.Module, target: str) -> Any:
    """root.<a>.<b>.<c> for target 'a.b.c', raising AttributeError with the full path."""
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def is_float_tensor(node: Any) -> bool:
    """True when `node` is an fx.Node known (from capture metadata) to produce a floating tensor."""
    if not isinstance(node, fx.Node):
        return False
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return val.dtype.is_floating_point
    tm = node.meta.get("tensor_meta")
    dtype = getattr(tm, "dtype", None)
    return isinstance(dtype, torch.dtype) and dtype.is_floating_point


def scheme_decisions(gm: fx.GraphModule) -> dict[str, tuple[str, str]]:
    """{node target: (scheme, reason)} for every node with a resolved scheme, from node.meta."""
    return {n.target: (n.meta[META_KEY]["scheme"], n.meta[META_KEY]["reason"])
            for n in gm.graph.nodes if "scheme" in n.meta.get(META_KEY, {})}


def mutable_storages(gm: fx.GraphModule) -> set[int]:
    """data_ptrs of gm's parameters and buffers that no other parameter or buffer shares (tied
    weights excluded): the tensors a fold may change in place when the model is handed over."""
    counts = Counter(t.data_ptr() for _, t in [*gm.named_parameters(remove_duplicate=False),
                                               *gm.named_buffers(remove_duplicate=False)])
    return {ptr for ptr, n in counts.items() if n == 1}


def set_tensor(root: torch.nn.Module, target: str, value: torch.Tensor) -> None:
    """Install `value` at dotted `target` (a parameter, frozen, where one is; else a buffer or attribute),
    creating empty parent modules that do not exist yet."""
    parent = root
    parent_path, _, leaf = target.rpartition(".")
    for part in parent_path.split(".") if parent_path else []:
        if not hasattr(parent, part):
            parent.add_module(part, torch.nn.Module())
        parent = getattr(parent, part)
    if leaf in parent._parameters:
        parent._parameters[leaf] = frozen_parameter(value)
    elif leaf in parent._buffers:
        parent._buffers[leaf] = value
    else:
        setattr(parent, leaf, value)


def linear_from(weight: torch.Tensor, bias: torch.Tensor | None = None, requires_grad: bool = False) -> torch.nn.Linear:
    """An nn.Linear holding `weight` [out, in] (and `bias` [out]) themselves: built on the meta device
    first, so no throwaway weight is allocated."""
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    layer.weight = frozen_parameter(weight, requires_grad)
    if bias is not None:
        layer.bias = frozen_parameter(bias, requires_grad)
    return layer


def frozen_parameter(t: torch.Tensor, requires_grad: bool = False) -> torch.nn.Parameter:
    """t itself if it is a Parameter, else t wrapped as one (no gradient unless asked)."""
    return t if isinstance(t, torch.nn.Parameter) else torch.nn.Parameter(t, requires_grad=requires_grad)
