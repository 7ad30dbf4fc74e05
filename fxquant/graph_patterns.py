"""Graph shapes that weight-folding passes (smoothing, rotation) recognise in the IR."""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

from .ir import SDPA_TARGETS, module_of

aten = torch.ops.aten

#: ops that move or repeat values without mixing the last (channel) dimension
_LAYOUT_FUNCTIONS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int,
                     aten.permute.default, aten.unsqueeze.default, aten.expand.default, aten.clone.default,
                     aten.slice.Tensor, aten.alias.default, torch.transpose, torch.reshape, torch.permute,
                     torch.unsqueeze}
_LAYOUT_METHODS = {"view", "reshape", "transpose", "permute", "contiguous", "unsqueeze", "expand", "clone"}


def is_layout(node: fx.Node) -> bool:
    """True for a view / reshape / transpose / expand / slice of a non-channel dimension: an op
    that moves values of its first input without mixing the channels of the last dimension."""
    if node.op == "call_method":
        return node.target in _LAYOUT_METHODS
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node):
        index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        return all(i is None or i is Ellipsis or i == slice(None) for i in index)  # x[:, :, None]
    if node.op != "call_function" or node.target not in _LAYOUT_FUNCTIONS:
        return False
    if node.target is aten.slice.Tensor:  # a slice of the channel dimension would drop channels
        val = node.meta.get("val")
        dim = node.args[1] if len(node.args) > 1 else 0
        return val is not None and dim not in (-1, val.dim() - 1)
    return True


def node_shape(node: fx.Node) -> tuple | None:
    """The shape of node's tensor value from capture metadata ("val" of torch.export, "tensor_meta"
    of symbolic tracing), or None when unknown."""
    meta = node.meta.get("val", node.meta.get("tensor_meta"))
    shape = getattr(meta, "shape", None)
    return tuple(shape) if shape is not None else None


@dataclass(frozen=True)
class AttentionValues:
    """X [..., n_heads * head_dim] that is the merged heads of sdpa(q, k, V), V a layout of the
    value projection's output [..., n_kv * head_dim]: head h of X is a mix of V's kv head
    h // (n_heads // n_kv) over positions, channel by channel."""

    value: fx.Node  # the call_module node of the value projection
    n_heads: int
    head_dim: int
    n_kv: int


def attention_values(gm: fx.GraphModule, x: fx.Node) -> AttentionValues | None:
    """X's AttentionValues when X is merged attention heads (only layouts between the value
    projection, sdpa and X, each used once), else None."""
    node, sdpa = x, None
    while True:
        if len(node.users) != 1 and node is not x:
            return None
        if isinstance(module_of(gm, node), torch.nn.Linear):
            break
        if node.op == "call_function" and node.target in SDPA_TARGETS and sdpa is None:
            if len(node.args) < 3 or not isinstance(node.args[2], fx.Node):
                return None
            sdpa, node = node, node.args[2]
            continue
        if is_layout(node) and isinstance(node.args[0], fx.Node):
            node = node.args[0]
            continue
        return None
    v_lin = module_of(gm, node)
    shape = node_shape(sdpa) if sdpa is not None else None
    x_shape = node_shape(x)
    if shape is None or len(shape) < 3 or len(node.users) != 1:
        return None
    head_dim, n_heads = int(shape[-1]), int(shape[-3])
    if (x_shape is not None and int(x_shape[-1]) != n_heads * head_dim) or v_lin.out_features % head_dim:
        return None
    n_kv = v_lin.out_features // head_dim
    if n_heads % n_kv:
        return None
    return AttentionValues(node, n_heads, head_dim, n_kv)
