"""Pass: keep the float ops whose last bit inductor would change as ATen's own kernels.

A quantized model rounds activations at run time, so a float op before a quantizer that rounds
differently by one ulp flips the codes at a rounding boundary, and the model amplifies the flips:
SmolLM2 static w8a8 compiled by inductor agreed with eager on 84-88% of top-1 tokens, perplexity
1.6% apart, although every integer GEMM was the same. Inductor's reductions sum in another order and
its transcendental functions are its own vectorized code. This pass replaces those ops in a Dynamo
graph that rounds activations with opaque calls of the same ATen op (`fxquant::eager_<op>`, same
schema), which inductor runs as they are; with inductor's FMA contraction off for that graph (the
backend does that when `gm.meta["fxquant_eager_rounding"]` is set), the compiled model computes
eager's floats bit for bit. Elementwise arithmetic (+, -, *, /, round, clamp) is IEEE-exact in both
and stays fused.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

log = logging.getLogger(__name__)

aten = torch.ops.aten

#: ATen ops whose results inductor's code may round differently from ATen's kernels: reductions
#: (summation order) and transcendental functions (vectorized approximations)
ROUNDING_SENSITIVE = (
    aten.mean.dim, aten.sum.dim_IntList, aten.var_mean.correction, aten.native_layer_norm.default,
    aten.layer_norm.default, aten.rms_norm.default, aten._softmax.default, aten._log_softmax.default,
    aten.softmax.int, aten.log_softmax.int,
    aten.silu.default, aten.gelu.default, aten.sigmoid.default, aten.tanh.default, aten.erf.default,
    aten.exp.default, aten.log.default, aten.cos.default, aten.sin.default, aten.rsqrt.default,
    aten.sqrt.default, aten.pow.Tensor_Scalar,
)
#: exponents for which ATen's pow and inductor's both multiply (x, x * x): exact, left fused
_EXACT_POWERS = (1, 2)
#: the same ops called at torch level (the graphs of an installed model, or of a float model under
#: fxquant.quantizing_backend): (target, node kind) -> ATen op, and how the call's (args, kwargs)
#: become that op's arguments
_UNARY = {"rsqrt": aten.rsqrt.default, "cos": aten.cos.default, "sin": aten.sin.default, "exp": aten.exp.default,
          "sigmoid": aten.sigmoid.default, "tanh": aten.tanh.default, "sqrt": aten.sqrt.default,
          "erf": aten.erf.default, "log": aten.log.default}


Arguments = tuple[tuple, dict[str, Any]]


def _unary(args: tuple, kwargs: dict) -> Arguments | None:
    return ((args[0],), {}) if len(args) == 1 and not kwargs else None


def _mean(args: tuple, kwargs: dict) -> Arguments | None:
    if len(args) < 2 or set(kwargs) - {"keepdim"}:
        return None
    dim = [args[1]] if isinstance(args[1], int) else list(args[1])
    return (args[0], dim, args[2] if len(args) > 2 else kwargs.get("keepdim", False)), {}


def _silu(args: tuple, kwargs: dict) -> Arguments | None:
    return ((args[0],), {}) if len(args) == 1 and not kwargs.get("inplace", False) else None


def _gelu(args: tuple, kwargs: dict) -> Arguments | None:
    if not 1 <= len(args) <= 2 or set(kwargs) - {"approximate"} or len(args) == 2 and kwargs:
        return None
    approximate = args[1] if len(args) == 2 else kwargs.get("approximate", "none")
    return (args[0],), {"approximate": approximate}


def _softmax(args: tuple, kwargs: dict) -> Arguments | None:
    """F.softmax / torch.softmax / Tensor.softmax (x, dim, dtype=None) -> aten.softmax.int's
    (x, dim, dtype): the cast to dtype, when given, is part of the kept op."""
    if len(args) > 2 or set(kwargs) - {"dim", "dtype", "_stacklevel"}:
        return None
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    return ((args[0], dim, kwargs.get("dtype")), {}) if isinstance(dim, int) else None


def _in_order(*names: str, **defaults: Any) -> Callable[[tuple, dict], Arguments | None]:
    """Arguments of a call whose parameters are `names` (those in `defaults` optional), given in
    that order to an ATen op of the same parameters."""
    def arguments(args: tuple, kwargs: dict) -> Arguments | None:
        values = dict(zip(names, args))
        if len(args) > len(names) or set(kwargs) - set(names) or set(kwargs) & set(values):
            return None
        values.update(kwargs)
        if any(name not in values and name not in defaults for name in names):
            return None
        return tuple(values[name] if name in values else defaults[name] for name in names), {}
    return arguments


TORCH_LEVEL: dict[tuple[str, Any], tuple[torch._ops.OpOverload, Callable[[tuple, dict], Arguments | None]]] = {
    **{("call_function", getattr(torch, name)): (op, _unary) for name, op in _UNARY.items()},
    **{("call_method", name): (op, _unary) for name, op in _UNARY.items()},
    ("call_function", torch.mean): (aten.mean.dim, _mean),
    ("call_method", "mean"): (aten.mean.dim, _mean),
    ("call_function", F.silu): (aten.silu.default, _silu),
    ("call_function", F.gelu): (aten.gelu.default, _gelu),
    ("call_function", F.softmax): (aten.softmax.int, _softmax),
    ("call_function", torch.softmax): (aten.softmax.int, _softmax),
    ("call_method", "softmax"): (aten.softmax.int, _softmax),
    ("call_function", F.log_softmax): (aten.log_softmax.int, _softmax),
    ("call_function", torch.log_softmax): (aten.log_softmax.int, _softmax),
    ("call_method", "log_softmax"): (aten.log_softmax.int, _softmax),
    ("call_function", F.layer_norm): (aten.layer_norm.default, _in_order(
        "input", "normalized_shape", "weight", "bias", "eps", weight=None, bias=None, eps=1e-5)),
    ("call_function", F.rms_norm): (aten.rms_norm.default, _in_order(
        "input", "normalized_shape", "weight", "eps", weight=None, eps=None)),
}

#: call targets that round activations at run time (activation quantizers)
_ROUNDING_TARGETS = (torch.round, aten.round.default)


def rounds_activations(gm: fx.GraphModule) -> bool:
    """True when the graph rounds tensors at run time (an activation quantizer is in it), also
    inside the forward bodies of autograd functions (how Dynamo hands over a quantizer's
    straight-through rounding when gradients are on)."""
    return any(n.op == "call_function" and n.target in _ROUNDING_TARGETS
               or n.op == "call_method" and n.target == "round"
               for m in gm.modules() if isinstance(m, fx.GraphModule) for n in m.graph.nodes)


@functools.cache
def eager_op(op: torch._ops.OpOverload) -> torch._ops.OpOverload:
    """fxquant::eager_<name>[_<overload>]: the same schema as `op`, running `op` itself (defined once,
    on first use, not at import)."""
    base = op._schema.name.split("::")[1]
    name = f"eager_{base}" if op._overloadname == "default" else f"eager_{base}_{op._overloadname}"
    qualname = f"fxquant::{name}"
    schema = str(op._schema)
    torch.library.define(qualname, schema[schema.index("("):])
    torch.library.impl(qualname, "CompositeExplicitAutograd")(op)
    torch.library.register_fake(qualname)(op)
    eager = getattr(torch.ops.fxquant, name).default
    torch.library.register_autograd(qualname, functools.partial(_backward, op), setup_context=_save_inputs)
    return eager


def _save_inputs(ctx: Any, inputs: tuple, output: Any, keyword_only_inputs: dict | None = None) -> None:
    ctx.tensor_positions = [i for i, a in enumerate(inputs) if isinstance(a, torch.Tensor)]
    ctx.other_inputs = [None if isinstance(a, torch.Tensor) else a for a in inputs]
    ctx.keyword_inputs = dict(keyword_only_inputs or {})  # e.g. gelu's approximate
    ctx.save_for_backward(*(inputs[i] for i in ctx.tensor_positions))


def _backward(op: torch._ops.OpOverload, ctx: Any, *grads: torch.Tensor | None) -> tuple:
    """The gradient of an eager_op: that of `op` itself (torch.func.vjp), for every tensor input."""
    def call(*tensors: torch.Tensor) -> Any:
        args = list(ctx.other_inputs)
        for i, t in zip(ctx.tensor_positions, tensors):
            args[i] = t
        return op(*args, **ctx.keyword_inputs)

    outputs, vjp = torch.func.vjp(call, *ctx.saved_tensors)
    if isinstance(outputs, tuple):  # e.g. native_layer_norm: outputs with no gradient get zeros
        cotangents = tuple(torch.zeros_like(o) if g is None else g for g, o in zip(grads, outputs))
    else:
        cotangents = grads[0]
    input_grads = [None] * len(ctx.other_inputs)
    for i, g in zip(ctx.tensor_positions, vjp(cotangents)):
        input_grads[i] = g
    return tuple(input_grads)


def keep_eager_rounding(gm: fx.GraphModule) -> fx.GraphModule:
    """Pass: in a graph that rounds activations, call every ROUNDING_SENSITIVE op through its
    eager_op and set gm.meta["fxquant_eager_rounding"] (the wrapped ops, by name: count).

    It matches ATen-level graphs (what Dynamo hands over for a GraphModule of fxquant.quantize) and
    the torch-level calls of TORCH_LEVEL (an installed model's graph: x.mean(-1, keepdim=True),
    F.silu, torch.rsqrt, F.layer_norm, F.softmax(x, -1, dtype=...)); a call in a form the table
    does not map (a softmax over dim=None, an in-place SiLU) is left to inductor."""
    if not rounds_activations(gm):
        return gm
    wrapped: Counter[str] = Counter()
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in ROUNDING_SENSITIVE:
            if node.target == aten.pow.Tensor_Scalar and node.args[1] in _EXACT_POWERS:
                continue
            node.target = eager_op(node.target)
        elif node.op in ("call_function", "call_method") and (node.op, node.target) in TORCH_LEVEL:
            op, arguments = TORCH_LEVEL[(node.op, node.target)]
            mapped = arguments(node.args, dict(node.kwargs))
            if mapped is None:
                continue  # a form the table does not map: left to inductor
            node.op, node.target = "call_function", eager_op(op)
            node.args, node.kwargs = mapped
        else:
            continue
        wrapped[str(node.target)] += 1
    gm.recompile()
    gm.meta["fxquant_eager_rounding"] = dict(wrapped)
    log.info("fxquant backend: %d float ops kept as ATen's kernels before quantizers: %s",
             sum(wrapped.values()), wrapped or "none")
    return gm
