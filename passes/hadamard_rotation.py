"""QuaRot-style rotation of a pre-norm transformer's residual stream, folded into its weights.

For an orthogonal Q [d, d] (a randomised Hadamard matrix, fxquant.hadamard.random_rotation),
RMSNorm(x Q) = RMSNorm(x) Q because the mean of squares does not change under rotation. So the model
computes the same function with its residual stream carrying x Q instead of x when

- the embedding table E [V, d] becomes E Q,
- every Linear adding into the stream (attention output, MLP down projection), W [d, k] and bias b [d],
  becomes Q^T W and b Q,
- every Linear reading an RMSNorm of the stream (q / k / v, gate / up, the head), W [n, d], becomes
  (W diag(g)) Q, with the norm's weight g [d] folded in and set to ones (g does not commute with Q).

A rotation spreads each outlier channel of the stream over all d channels, so the Linear inputs
become easy to quantize per tensor. With value_heads=True the value projection's output is also
rotated head by head with H [head_dim, head_dim], and the output projection's input by the same H
per head. Attention mixes V over positions only, so softmax(q k^T) (V H) = (softmax(q k^T) V) H.

Every transform is folded into weights: the graph keeps its ops, and the result exports to the QDQ
ONNX and the Ascend checkpoint like any other model. An embedding table tied to the head is untied
(the head takes the final norm's weight, the table does not): the table is installed at its own
module's name, so fxquant.apply and the Ascend checkpoint write it there. The pass refuses, naming
the node, a graph whose stream feeds anything else (a LayerNorm, which subtracts the mean; a
returned hidden state; a norm inside a block), since a rotation would change what that computes.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from fxquant.calib_data import normalise_calib_data
from fxquant.errors import ConfigError, FxquantError
from fxquant.graph_patterns import attention_values, is_layout, node_shape
from fxquant.hadamard import random_rotation
from fxquant.ir import (
    fxq_meta,
    get_attr_path,
    module_of,
    mutable_storages,
    replace_submodule,
    scope_of,
    set_tensor,
)
from fxquant.layer_metrics import output_change, output_sample, precision_tolerance
from fxquant.resources import release_freed_memory
from fxquant.rotation_folds import rotate_linear, rows_rotated
from fxquant.small_ops import Add

from .online_hadamard import OnlineHadamard

log = logging.getLogger(__name__)
aten = torch.ops.aten

#: ops that pass the stream on unchanged (dtype casts, copies, eval-mode dropout)
_PASS_THROUGH = {aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.clone.default,
                 aten.alias.default, aten.dropout.default, torch.nn.functional.dropout}
_PASS_THROUGH_METHODS = {"to", "float", "type_as", "clone", "contiguous"}
_IGNORED = {aten._assert_tensor_metadata.default}
_ADD = {aten.add.Tensor, operator.add, torch.add}
_MUL = {aten.mul.Tensor, operator.mul, torch.mul}
_POW = {aten.pow.Tensor_Scalar, torch.pow, operator.pow}
_MEAN = {aten.mean.dim, torch.mean}
_RSQRT = {aten.rsqrt.default, torch.rsqrt}


def _is(node: Any, functions: set, method: str | None = None) -> bool:
    if not isinstance(node, fx.Node):
        return False
    return (node.op == "call_function" and node.target in functions) or (node.op == "call_method"
                                                                          and node.target == method)


def _users(node: fx.Node) -> list[fx.Node]:
    return [u for u in node.users if not (u.op == "call_function" and u.target in _IGNORED)]


@dataclass
class _Norm:
    """An RMSNorm of the stream: its weight's get_attr node (None: no weight) and the Linears reading it."""

    weight: fx.Node | None
    readers: list[fx.Node]


@dataclass
class ResidualStream:
    """What rotating the stream touches: embedding lookups, writing Linears, RMSNorms and their readers."""

    dim: int
    embeddings: list[fx.Node]
    writers: list[fx.Node]
    norms: list[_Norm]


def _rms_norm_of(x: fx.Node, mul: fx.Node) -> bool:
    """True when mul = x * rsqrt(mean(x ** 2, -1, keepdim) + eps)."""
    other = next((a for a in mul.args if a is not x), None)
    if not _is(other, _RSQRT, "rsqrt"):
        return False
    add = other.args[0]
    if not _is(add, _ADD, "add"):
        return False
    mean = next((a for a in add.args if isinstance(a, fx.Node)), None)
    if not _is(mean, _MEAN, "mean"):
        return False
    dims = mean.args[1] if len(mean.args) > 1 else mean.kwargs.get("dim")
    if list(dims if isinstance(dims, (list, tuple)) else [dims]) not in ([-1], [_rank(x) - 1]):
        return False
    pw = mean.args[0]
    return _is(pw, _POW, "pow") and pw.args[0] is x and pw.args[1] == 2


def _rank(node: fx.Node) -> int:
    shape = node_shape(node)
    return len(shape) if shape is not None else -99


def _width(node: fx.Node) -> int | None:
    """The last dimension of node's value (None if unknown)."""
    shape = node_shape(node)
    return int(shape[-1]) if shape else None


def find_residual_stream(gm: fx.GraphModule) -> ResidualStream:
    """The residual stream of a pre-RMSNorm transformer in gm, or ConfigError naming the first node
    through which a rotation would change the model's function."""
    embeddings = [n for n in gm.graph.nodes
                  if (n.op == "call_function" and n.target in (aten.embedding.default, torch.nn.functional.embedding))
                  or isinstance(module_of(gm, n), torch.nn.Embedding)]
    if not embeddings:
        raise ConfigError("rotation needs the embedding lookup in the graph (the source of the residual "
                          "stream); this graph has none: capture the model with input_ids, not inputs_embeds")
    dim = _width(embeddings[0])
    stream: set[fx.Node] = set(embeddings)
    queue = list(embeddings)
    writers: list[fx.Node] = []
    norms: list[_Norm] = []
    in_norm: set[fx.Node] = set()

    def refuse(value: fx.Node, user: fx.Node, why: str) -> ConfigError:
        what = user.target if user.op != "call_function" else getattr(user.target, "__name__", user.target)
        return ConfigError(f"cannot rotate the residual stream: {value.name} feeds {user.name} ({user.op} {what}), "
                           f"{why}; rotation supports pre-RMSNorm transformers (residual adds of Linear outputs, "
                           "RMSNorms read by Linears)")

    while queue:
        v = queue.pop(0)
        for u in _users(v):
            if u in stream or u in in_norm:
                continue
            if u.op == "output":
                raise refuse(v, u, "the graph returns the stream itself, which a rotation would change")
            if _is(u, _PASS_THROUGH, "to") or (u.op == "call_method" and u.target in _PASS_THROUGH_METHODS):
                stream.add(u)
                queue.append(u)
            elif _is(u, _ADD, "add") or isinstance(module_of(gm, u), Add):
                other = next((a for a in u.args[:2] if a is not v), v)
                if other not in stream:
                    writer = _writer_of(gm, other, dim)
                    if writer is None:
                        raise refuse(v, u, f"an add whose other input {getattr(other, 'name', other)} is not a "
                                     "Linear's output")
                    writers.append(writer)
                stream.add(u)
                queue.append(u)
            elif _is(u, _MUL, "mul") and any(isinstance(a, (int, float)) for a in u.args):
                stream.add(u)  # a constant scale (e.g. Gemma's sqrt(d)) commutes with a rotation
                queue.append(u)
            elif _is(u, _POW, "pow") and u.args[1] == 2:
                in_norm.add(u)  # checked with the norm's multiply
            elif _is(u, _MUL, "mul") and _rms_norm_of(v, u):
                norms.append(_norm_readers(gm, u, dim, refuse))
                in_norm.add(u)
            elif _is(u, {aten.layer_norm.default, aten.native_layer_norm.default, torch.nn.functional.layer_norm}) \
                    or isinstance(module_of(gm, u), torch.nn.LayerNorm):
                raise refuse(v, u, "a LayerNorm, whose mean subtraction does not commute with a rotation")
            else:
                raise refuse(v, u, "which is neither a residual add, an RMSNorm nor a cast")
    unmatched = [p for p in in_norm if _is(p, _POW, "pow")
                 and not any(_rms_norm_of(p.args[0], m) for m in _users(p.args[0]) if _is(m, _MUL, "mul"))]
    if unmatched:
        raise refuse(unmatched[0].args[0], unmatched[0], "a square that is not part of an RMSNorm")
    if dim is None or not norms:
        raise ConfigError("cannot rotate the residual stream: no RMSNorm reads it")
    return ResidualStream(dim, embeddings, writers, norms)


def _writer_of(gm: fx.GraphModule, node: Any, dim: int | None) -> fx.Node | None:
    """The Linear whose output [..., dim] reaches `node` through casts only, used once; else None."""
    while isinstance(node, fx.Node) and len(node.users) == 1:
        lin = module_of(gm, node)
        if isinstance(lin, torch.nn.Linear):
            return node if lin.out_features == dim else None
        if not (_is(node, _PASS_THROUGH, "to") or (node.op == "call_method" and node.target in _PASS_THROUGH_METHODS)):
            return None
        node = node.args[0]
    return None


def _norm_readers(gm: fx.GraphModule, normalised: fx.Node, dim: int | None, refuse) -> _Norm:
    """Follow x * rsqrt(...) through casts to `weight * .` and on to the Linears that read it."""
    node, weight = normalised, None
    while True:
        users = _users(node)
        if len(users) == 1 and (_is(users[0], _PASS_THROUGH, "to")):
            node = users[0]
            continue
        if len(users) == 1 and _is(users[0], _MUL, "mul") and weight is None:
            attr = next((a for a in users[0].args if a is not node), None)
            if isinstance(attr, fx.Node) and attr.op == "get_attr" and _width(users[0]) == dim:
                t = get_attr_path(gm, attr.target)
                if isinstance(t, torch.Tensor) and t.dim() == 1 and t.numel() == dim and len(attr.users) == 1:
                    weight, node = attr, users[0]
                    continue
        break
    readers: list[fx.Node] = []
    frontier = [node]
    while frontier:
        n = frontier.pop()
        for u in _users(n):
            lin = module_of(gm, u)
            if isinstance(lin, torch.nn.Linear) and lin.in_features == dim:
                readers.append(u)
            elif is_layout(u) and u.args[0] is n and _width(u) == dim:
                frontier.append(u)
            else:
                raise refuse(node, u, "an RMSNorm output read by something other than a Linear (a norm weight "
                             "that is not a per-channel tensor, e.g. 1 + w, lands here too)")
    return _Norm(weight, readers)


@dataclass
class HadamardRotation:
    """Pass: rotate the residual stream (and, with value_heads, each attention head's values) by
    randomised Hadamard matrices folded into the weights (see module docstring).

    check_data: calibration samples; the first one checks that the float outputs did not change
    (relative error <= check_tolerance, raised to 8 machine epsilons of a half-precision output).
    seed: picks the random signs. online: fnmatch patterns of Linear layers (e.g. "*down_proj")
    whose input is also rotated at run time, by the OnlineHadamard pass run at the end of this one
    (fxquant.quantize runs it after the suppression pass instead, so that smoothing folds into the
    gated product first). Runs before smoothing and QuantOpr insertion; layers resolved float are
    rotated too (they must be, to read the stream).
    Records in node.meta["fxquant"]["rotation"] what was folded into each layer ("stream_in",
    "stream_out", "head_values", "head_outputs", "online_input") and gm.meta["fxquant_rotation"] =
    {"dim", "seed", "value_heads", "layers", "online"}.
    """

    check_data: Any = None
    seed: int = 0
    value_heads: bool = True
    online: Sequence[str] = ()
    check_tolerance: float = 1e-4
    _mutable: set[int] = field(default_factory=set, init=False, repr=False)

    def __call__(self, gm: fx.GraphModule) -> fx.GraphModule:
        stream = find_residual_stream(gm)
        self._mutable = mutable_storages(gm) if gm.meta.get("fxquant_consumes_model") else set()
        first = normalise_calib_data(self.check_data)[0] if self.check_data is not None else None
        before = None
        if first is not None:
            with torch.no_grad():
                before = output_sample(gm(*first[0], **first[1]))
        q = random_rotation(stream.dim, self.seed).float()  # float32 once, not per layer
        with torch.no_grad():
            for emb in stream.embeddings:
                self._rotate_embedding(gm, emb, q)
            for norm in stream.norms:
                g = None
                if norm.weight is not None:
                    t = get_attr_path(gm, norm.weight.target)
                    g = t.detach().float().clone()
                    set_tensor(gm, norm.weight.target, t.detach().fill_(1.0) if t.data_ptr() in self._mutable
                               else torch.ones_like(t, requires_grad=False))
                for r in norm.readers:
                    rotate_linear(gm, self._mutable, r, "stream_in", input_scale=g, inputs=q)
            for w in stream.writers:
                rotate_linear(gm, self._mutable, w, "stream_out", outputs=q)
            heads = self._rotate_heads(gm) if self.value_heads else 0
        if self.online:
            OnlineHadamard(self.online, self.seed + 2, self._mutable)(gm)
        release_freed_memory()  # the fold temporaries
        gm.recompile()
        layers = sum(1 for n in gm.graph.nodes if "rotation" in n.meta.get("fxquant", {}))
        gm.meta.setdefault("fxquant_rotation", {}).update(
            {"dim": stream.dim, "seed": self.seed, "value_heads": self.value_heads, "layers": layers})
        if before is not None:
            with torch.no_grad():
                after = output_sample(gm(*first[0], **first[1]))
            err, tolerance = output_change(before, after), precision_tolerance(before, self.check_tolerance)
            if err > tolerance:
                raise FxquantError(f"rotation changed the float model's output (relative error {err:.2e} > "
                                   f"{tolerance:g}); a fold is wrong for this graph")
            log.info("rotation leaves the float output unchanged (relative error %.1e)", err)
        log.info("rotated the residual stream (d=%d) through %d layers, %d attention blocks' values",
                 stream.dim, layers, heads)
        return gm

    def _rotate_heads(self, gm: fx.GraphModule) -> int:
        """v_proj's output and o_proj's input rotated head by head; returns the attention blocks rotated."""
        count = 0
        for node in list(gm.graph.nodes):
            lin = module_of(gm, node)
            if not isinstance(lin, torch.nn.Linear) or not isinstance(node.args[0], fx.Node):
                continue
            att = attention_values(gm, node.args[0])
            if att is None or att.n_heads * att.head_dim != lin.in_features:
                continue
            h = random_rotation(att.head_dim, self.seed + 1).float()
            rotate_linear(gm, self._mutable, att.value, "head_values", outputs=h)
            rotate_linear(gm, self._mutable, node, "head_outputs", inputs=h)
            count += 1
        return count

    def _rotate_embedding(self, gm: fx.GraphModule, emb: fx.Node, q: torch.Tensor) -> None:
        """E [V, d] -> E Q: in place when E is the model's own and untied, else a new table at the
        embedding module's own name."""
        mod = module_of(gm, emb)
        if mod is not None:
            w = mod.weight.detach()
            if w.data_ptr() in self._mutable:
                rows_rotated(w, None, q, w)
            else:
                rotated = torch.empty_like(w, requires_grad=False)
                rows_rotated(w, None, q, rotated)
                new = torch.nn.Embedding.from_pretrained(rotated, freeze=True, padding_idx=mod.padding_idx)
                replace_submodule(gm, emb.target, new)
            fxq_meta(emb)["rotation"] = ["stream_out"]
            return
        attr = emb.args[0]
        w = get_attr_path(gm, attr.target).detach()
        if w.data_ptr() in self._mutable and len(attr.users) == 1 and w.data_ptr() not in _layer_weights(gm):
            rows_rotated(w, None, q, w)
        else:
            rotated = torch.empty_like(w, requires_grad=False)
            rows_rotated(w, None, q, rotated)
            target = f"{scope_of(emb)}.weight" if scope_of(emb) else f"{attr.target}_rotated"
            if target == attr.target or _has_attr(gm, target):
                target = f"{attr.target.replace('.', '_')}_rotated"
            set_tensor(gm, target, torch.nn.Parameter(rotated, requires_grad=False))
            with gm.graph.inserting_before(emb):
                new_attr = gm.graph.get_attr(target)
            emb.replace_input_with(attr, new_attr)
            if not attr.users:
                gm.graph.erase_node(attr)
        fxq_meta(emb)["rotation"] = ["stream_out"]


def _layer_weights(gm: fx.GraphModule) -> set[int]:
    """data_ptrs of the weights of the modules gm calls (a table tied to the head is one of them)."""
    return {p.data_ptr() for n in gm.graph.nodes if n.op == "call_module"
            for p in gm.get_submodule(n.target).parameters(recurse=False)}


def _has_attr(root: torch.nn.Module, target: str) -> bool:
    try:
        get_attr_path(root, target)
    except AttributeError:
        return False
    return True
