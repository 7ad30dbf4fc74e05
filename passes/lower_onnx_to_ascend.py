"""Rewrite a QDQ ONNX model into the Ascend ATC form (DESIGN.md, lowering target 3).

    x -> QuantizeLinear -> DequantizeLinear -> Conv/MatMul/Gemm <- DequantizeLinear <- int8 W

becomes

    x -> AscendQuant(scale=1/s, offset=zp) -> [Pad(value=zp)] -> Conv/MatMul(int8 W) [+ int32 bias]
      -> AscendDequant(deq_scale) -> y

with quant_bias = round(bias / deq_scale) - zp * sum(Wq) and deq_scale = s * w_scale stored as
UINT64 holding the fp32 bits. Asymmetric activations pad with their offset explicitly so the
zero-point correction in quant_bias is exact at the borders. uint8 activations are shifted to
int8 (codes - 128, offset - 128), the same arithmetic.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper

from fxquant.errors import FxquantError

log = logging.getLogger(__name__)


def register_ascend_schemas() -> None:
    """Make AscendQuant / AscendDequant (default domain, as ATC's ONNX parser reads them) known to
    onnx.checker; a no-op when already registered."""
    from onnx import defs

    for name, inputs, attrs in (
        ("AscendQuant", [("x", "T")], ["scale", "offset", "sqrt_mode", "round_mode"]),
        ("AscendDequant", [("x", "T"), ("deq_scale", "T")], ["sqrt_mode", "relu_flag", "dtype"]),
    ):
        if defs.has(name):
            continue
        types = {"scale": defs.OpSchema.AttrType.FLOAT, "offset": defs.OpSchema.AttrType.FLOAT,
                 "round_mode": defs.OpSchema.AttrType.STRING}
        schema = defs.OpSchema(
            name, "", 1,
            inputs=[defs.OpSchema.FormalParameter(n, "T", is_homogeneous=False) for n, _ in inputs],
            outputs=[defs.OpSchema.FormalParameter("y", "T", is_homogeneous=False)],
            type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(int8)", "tensor(int32)",
                                     "tensor(uint64)"], "Ascend quantization tensors")],
            attributes=[defs.OpSchema.Attribute(a, types.get(a, defs.OpSchema.AttrType.INT), "", required=False)
                        for a in attrs],
        )
        defs.register_schema(schema)


class _Graph:
    """Name-indexed view of an onnx GraphProto for rewriting."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.graph = model.graph
        self.inits = {t.name: t for t in self.graph.initializer}
        self.producer = {o: n for n in self.graph.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in self.graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.outputs = {o.name for o in self.graph.output}
        self._counter = 0

    def const(self, name: str) -> np.ndarray | None:
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            return numpy_helper.to_array(node.attribute[0].t)
        return None

    def fresh(self, base: str) -> str:
        self._counter += 1
        return f"{base}__ascend{self._counter}"

    def add_init(self, base: str, array: np.ndarray) -> str:
        name = self.fresh(base)
        self.graph.initializer.append(numpy_helper.from_array(array, name))
        return name


def _act_qdq(g: _Graph, name: str):
    """(float input, scale, int8 offset) when `name` is DequantizeLinear(QuantizeLinear(x)), per tensor."""
    dq = g.producer.get(name)
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    q = g.producer.get(dq.input[0])
    if q is None or q.op_type != "QuantizeLinear":
        return None
    scale = g.const(q.input[1])
    zp_arr = g.const(q.input[2]) if len(q.input) > 2 else np.zeros((), np.int8)
    if scale is None or zp_arr is None or scale.size != 1:
        return None
    offset = int(zp_arr.reshape(-1)[0]) - (128 if zp_arr.dtype == np.uint8 else 0)
    return q.input[0], float(scale.reshape(-1)[0]), offset


def _int8_weight(g: _Graph, name: str, transposed: bool):
    """(int8 codes [n, ...], float32 scale [n]) of DequantizeLinear(int8 W) (through a 2-D Transpose
    when `transposed`)."""
    node = g.producer.get(name)
    if transposed:
        if node is None or node.op_type != "Transpose":
            return None
        perm = [list(a.ints) for a in node.attribute if a.name == "perm"]
        if perm and perm[0] != [1, 0]:
            return None
        node = g.producer.get(node.input[0])
    if node is None or node.op_type != "DequantizeLinear":
        return None
    codes, scale = g.const(node.input[0]), g.const(node.input[1])
    if codes is None or scale is None or codes.dtype != np.int8:
        return None
    zp = g.const(node.input[2]) if len(node.input) > 2 else None
    if zp is not None and np.any(zp != 0):
        return None
    n = codes.shape[0]
    return codes, np.broadcast_to(scale.astype(np.float32).reshape(-1), (n,)).copy()


def _deq_uint64(deq: np.ndarray) -> np.ndarray:
    return deq.astype(np.float32).view(np.uint32).astype(np.uint64)


def lower_onnx_to_ascend(model: onnx.ModelProto) -> onnx.ModelProto:
    """Pass over an ONNX QDQ model: a new ModelProto in the Ascend form; raises FxquantError when
    no quantized Conv/MatMul/Gemm pattern is found."""
    register_ascend_schemas()
    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = _Graph(model)
    new_nodes: dict[int, list[onnx.NodeProto]] = {}  # index of the replaced node -> its replacement
    quantized: dict[str, str] = {}  # float input name -> AscendQuant output (shared by consumers)
    dropped_adds: set[str] = set()
    rewritten = 0
    for idx, node in enumerate(list(g.graph.node)):
        if node.op_type not in ("Conv", "MatMul", "Gemm"):
            continue
        act = _act_qdq(g, node.input[0])
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Gemm" and (attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0
                                       or attrs.get("beta", 1.0) != 1.0):
            continue
        weight = _int8_weight(g, node.input[1], transposed=node.op_type == "MatMul"
                              or (node.op_type == "Gemm" and not attrs.get("transB", 0)))
        if act is None or weight is None:
            continue
        x, s, offset = act
        codes, wscale = weight
        n = codes.shape[0]
        out_nodes: list[onnx.NodeProto] = []
        bias = g.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        y = node.output[0]
        if node.op_type == "MatMul":  # fold a following bias Add into quant_bias
            users = g.consumers.get(y, [])
            if len(users) == 1 and users[0].op_type == "Add" and y not in g.outputs:
                add = users[0]
                other = add.input[1] if add.input[0] == y else add.input[0]
                b = g.const(other)
                if b is not None and b.shape == (n,):
                    bias, y = b, add.output[0]
                    dropped_adds.add(add.output[0])
        deq = (np.float32(s) * wscale).astype(np.float32)
        colsum = codes.reshape(n, -1).astype(np.int64).sum(axis=1)
        qbias = np.zeros(n, np.int64) if bias is None else np.round(bias.astype(np.float64) / deq).astype(np.int64)
        qbias = (qbias - colsum * offset).astype(np.int32)
        if x not in quantized:
            quantized[x] = g.fresh(x + "_int8")
            out_nodes.append(helper.make_node("AscendQuant", [x], [quantized[x]], name=g.fresh("AscendQuant"),
                                              scale=float(np.float32(1.0) / np.float32(s)), offset=float(offset),
                                              sqrt_mode=0, round_mode="Round"))
        xq = quantized[x]
        acc = g.fresh(y + "_int32")
        if node.op_type == "Conv":
            pads = list(attrs.get("pads", []))
            if any(pads) and offset != 0:
                padded, k = g.fresh(xq + "_pad"), len(pads) // 2
                full = [0, 0, *pads[:k], 0, 0, *pads[k:]]  # Pad covers every axis of NC...
                out_nodes.append(helper.make_node(
                    "Pad", [xq, g.add_init("pads", np.array(full, np.int64)),
                            g.add_init("pad_value", np.array(offset, np.int8))], [padded], name=g.fresh("Pad")))
                xq, attrs["pads"] = padded, [0] * len(pads)
            w = g.add_init(node.input[1] + "_int8", codes)
            b = g.add_init("quant_bias", qbias)
            out_nodes.append(helper.make_node("Conv", [xq, w, b], [acc], name=node.name, **attrs))
        else:
            w = g.add_init(node.input[1] + "_int8", np.ascontiguousarray(codes.T))
            mm = g.fresh(y + "_mm")
            out_nodes.append(helper.make_node("MatMul", [xq, w], [mm], name=node.name))
            out_nodes.append(helper.make_node("Add", [mm, g.add_init("quant_bias", qbias)], [acc],
                                              name=g.fresh("QuantBiasAdd")))
        out_nodes.append(helper.make_node("AscendDequant", [acc, g.add_init("deq_scale", _deq_uint64(deq))], [y],
                                          name=g.fresh("AscendDequant"), sqrt_mode=0, relu_flag=0, dtype=0))
        new_nodes[idx] = out_nodes
        rewritten += 1
    if not rewritten:
        raise FxquantError("no quantized Conv/MatMul/Gemm (QuantizeLinear -> DequantizeLinear input, int8 "
                           "DequantizeLinear weight) found to lower to Ascend ops")
    nodes: list[onnx.NodeProto] = []
    for idx, node in enumerate(g.graph.node):
        if node.op_type == "Add" and node.output[0] in dropped_adds:
            continue
        nodes.extend(new_nodes.get(idx, [node]))
    del g.graph.node[:]
    g.graph.node.extend(nodes)
    _remove_dead(model)
    left = sum(n.op_type == "QuantizeLinear" for n in model.graph.node)
    if left:
        log.warning("%d QuantizeLinear nodes matched no Conv/MatMul/Gemm pattern and stay QDQ", left)
    return model


def _remove_dead(model: onnx.ModelProto) -> None:
    """Drop nodes whose outputs nobody reads, then unused initializers and stale value_info."""
    graph = model.graph
    live = {o.name for o in graph.output}
    kept: list[onnx.NodeProto] = []
    for node in reversed(graph.node):
        if any(o in live for o in node.output):
            kept.append(node)
            live.update(i for i in node.input if i)
    kept.reverse()
    del graph.node[:]
    graph.node.extend(kept)
    used = {i for n in graph.node for i in n.input}
    inits = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    produced = {o for n in graph.node for o in n.output}
    infos = [v for v in graph.value_info if v.name in produced and "__ascend" not in v.name]
    del graph.value_info[:]
    graph.value_info.extend(infos)
