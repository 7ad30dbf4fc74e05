"""Turn functional add / bmm / matmul on two float tensors into small-op call_module nodes."""

from __future__ import annotations

import operator

import torch
from torch import fx

from fxquant.ir import fxq_meta, is_float_tensor, scope_of
from fxquant.small_ops import BMM, Add, MatMul

aten = torch.ops.aten
_FUNCTIONS = {
    operator.add: Add, torch.add: Add, aten.add.Tensor: Add,
    operator.matmul: MatMul, torch.matmul: MatMul, aten.matmul.default: MatMul,
    torch.bmm: BMM, aten.bmm.default: BMM,
}
_METHODS = {"add": Add, "matmul": MatMul, "bmm": BMM}


def _small_op_type(node: fx.Node) -> type[torch.nn.Module] | None:
    if node.op == "call_function":
        cls = _FUNCTIONS.get(node.target)
    elif node.op == "call_method":
        cls = _METHODS.get(node.target)
    else:
        return None
    if cls is None or len(node.args) != 2 or any(k != "alpha" for k in node.kwargs):
        return None
    if node.kwargs.get("alpha", 1) != 1:
        return None
    return cls if all(is_float_tensor(a) for a in node.args) else None


def _unique_name(gm: fx.GraphModule, base: str, taken: set[str]) -> str:
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    taken.add(name)
    return name


def functional_to_modules(gm: fx.GraphModule) -> fx.GraphModule:
    """Each `x + y`, torch.add, x.add, @, torch.matmul, torch.bmm (python or aten) on two float
    tensors becomes a call_module of Add / MatMul / BMM named `<scope>.<op>[_i]`, where scope is the
    module it was traced in (e.g. `model.layers.0.self_attn.matmul`)."""
    taken = {name for name, _ in gm.named_modules()}
    for node in list(gm.graph.nodes):
        cls = _small_op_type(node)
        if cls is None:
            continue
        scope = scope_of(node)
        base = f"{scope}.{cls.__name__.lower()}" if scope else cls.__name__.lower()
        name = _unique_name(gm, base, taken)
        gm.add_submodule(name, cls())
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(name, tuple(node.args))
        new.meta.update(node.meta)
        fxq_meta(new)["small_op"] = True
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    return gm
