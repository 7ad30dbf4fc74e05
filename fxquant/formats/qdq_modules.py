"""Export modules: a calibrated QuantOpr spelled with quantize/dequantize ops that torch.onnx
lowers to ONNX QuantizeLinear / DequantizeLinear (through the quantized_decomposed op library).

Weights are int8 buffers, dequantized per output channel (axis 0) inside the graph, so the
ONNX file carries int8 initializers.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed)
import torch.nn.functional as F

from ..errors import ConfigError
from ..quant_conv import QConvNd
from ..quant_linear import QLinear
from ..quant_opr import QAttentionInput, QuantOpr, _QBinary
from ..quant_rnn import _QRecurrent, run_recurrent
from ..quantizer import IdentityQuantizer, Quantizer, StaticQuantizer
from ..weighted_quant_opr import WeightedQuantOpr

_qd = torch.ops.quantized_decomposed


class QDQ(torch.nn.Module):
    """x -> DequantizeLinear(QuantizeLinear(x)): a static per-tensor (scale float, zero point int)
    or per-channel (scale/zero point [C] along `axis`) activation quantizer; float32 in and out."""

    def __init__(self, quantizer: StaticQuantizer) -> None:
        super().__init__()
        spec = quantizer.spec
        self.qmin, self.qmax = quantizer.qmin, quantizer.qmax
        self.dtype = torch.int8 if spec.signed else torch.uint8
        self.per_channel = quantizer.scale.dim() > 0
        self.axis = spec.axis
        if self.per_channel:
            self.register_buffer("scale", quantizer.scale.detach().float().clone())
            self.register_buffer("zero_point", quantizer.zero_point.detach().round().to(torch.int64).clone())
        else:
            self.scale_value = float(quantizer.scale)
            self.zero_point_value = int(round(float(quantizer.zero_point)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.per_channel:
            q = _qd.quantize_per_channel(x, self.scale, self.zero_point, self.axis, self.qmin, self.qmax, self.dtype)
            return _qd.dequantize_per_channel(q, self.scale, self.zero_point, self.axis, self.qmin, self.qmax,
                                              self.dtype)
        q = _qd.quantize_per_tensor(x, self.scale_value, self.zero_point_value, self.qmin, self.qmax, self.dtype)
        return _qd.dequantize_per_tensor(q, self.scale_value, self.zero_point_value, self.qmin, self.qmax,
                                         self.dtype)


def _input_qdq(q: Quantizer, where: str) -> torch.nn.Module:
    if isinstance(q, IdentityQuantizer) or not q.enabled:
        return torch.nn.Identity()
    if not isinstance(q, StaticQuantizer):
        raise ConfigError(f"{where}: ONNX QDQ export needs static activation quantizers; this one is "
                          f"{type(q).__name__} (use a static scheme such as w8a8, or save the Ascend "
                          "checkpoint for dynamic schemes)")
    return QDQ(q)


class _QDQWeighted(torch.nn.Module):
    """Input QDQ, then the float op with an int8 weight dequantized per channel (or per tensor)."""

    def __init__(self, qopr: WeightedQuantOpr, name: str) -> None:
        super().__init__()
        self.input_qdq = _input_qdq(qopr.input_quantizer, name)
        wq = qopr.weight_quantizer
        self.weight_quantized = not isinstance(wq, IdentityQuantizer) and wq.enabled
        if self.weight_quantized:
            if not isinstance(wq, StaticQuantizer) or wq.spec.granularity not in ("tensor", "channel") \
                    or wq.spec.bits != 8:
                raise ConfigError(f"{name}: ONNX QDQ export covers int8 per-tensor or per-channel weights, "
                                  f"not {wq.extra_repr()}")
            self.register_buffer("weight_codes", qopr.weight_int8().clone())
            self.per_channel = wq.scale.dim() > 0
            if self.per_channel:
                self.register_buffer("weight_scale", wq.scale.detach().float().clone())
                self.register_buffer("weight_zero_point", wq.zero_point.detach().round().to(torch.int64).clone())
            else:  # constants, as for activations: torch.export cannot read a buffer's value
                self.weight_scale_value = float(wq.scale)
                self.weight_zero_point_value = int(round(float(wq.zero_point)))
        else:
            self.register_buffer("weight", qopr.weight.detach().clone())
        bias = None if qopr.bias is None else qopr.bias.detach().float().clone()
        aq = qopr.active_input_quantizer()
        if bias is not None and self.weight_quantized and isinstance(aq, StaticQuantizer) and aq.enabled:
            deq = (aq.scale * wq.scale).float().reshape(-1)  # the bias on the accumulator grid, as simulated
            bias = qopr.quantized_bias(deq) * deq
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

    def dequantized_weight(self) -> torch.Tensor:
        if not self.weight_quantized:
            return self.weight
        if not self.per_channel:
            return _qd.dequantize_per_tensor(self.weight_codes, self.weight_scale_value,
                                             self.weight_zero_point_value, -128, 127, torch.int8)
        return _qd.dequantize_per_channel(self.weight_codes, self.weight_scale, self.weight_zero_point, 0,
                                          -128, 127, torch.int8)


class QDQLinear(_QDQWeighted):
    """x [..., k] -> y [..., n] through QDQ(x) and int8 weight [n, k]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.input_qdq(x), self.dequantized_weight(), self.bias)


class QDQConv(_QDQWeighted):
    """Convolution through QDQ(x) and int8 weight [n, c/groups, *kernel]."""

    def __init__(self, qopr: QConvNd, name: str) -> None:
        super().__init__(qopr, name)
        self.conv_fn = qopr.conv_fn
        self.stride, self.padding, self.dilation, self.groups = (qopr.stride, qopr.padding, qopr.dilation,
                                                                 qopr.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_fn(self.input_qdq(x), self.dequantized_weight(), self.bias, self.stride,
                            self.padding, self.dilation, self.groups)


class QDQBinary(torch.nn.Module):
    """add / bmm / matmul small op with a QDQ on each quantized input."""

    def __init__(self, qopr: _QBinary, name: str) -> None:
        super().__init__()
        self.op = qopr.op
        self.input_qdqs = torch.nn.ModuleList(_input_qdq(q, f"{name} input {i}")
                                              for i, q in enumerate(qopr.input_quantizers))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.op(self.input_qdqs[0](x), self.input_qdqs[1](y))


class QDQRecurrent(torch.nn.Module):
    """An LSTM / GRU unrolled over time (fxquant.quant_rnn.run_recurrent) with QDQ on the input,
    hidden and cell states and int8 weights; the sequence length is fixed at export."""

    def __init__(self, qopr: _QRecurrent, name: str) -> None:
        super().__init__()
        rnn = qopr.rnn
        self.kind = qopr.kind
        self.batch_first, self.bidirectional = rnn.batch_first, rnn.bidirectional
        self.num_layers, self.hidden_size, self.dropout = rnn.num_layers, rnn.hidden_size, rnn.dropout
        self.input_qdq = _input_qdq(qopr.input_quantizer, f"{name} input")
        self.hidden_qdq = _input_qdq(qopr.hidden_quantizer, f"{name} hidden state")
        self.cell_qdq = _input_qdq(qopr.cell_quantizer, f"{name} cell state")
        self.weight_scales: dict[str, float] = {}
        self.grids = {n: tuple(None if v is None else float(v) for v in qopr._grid(n)) for n in qopr.weight_names}
        for n in qopr.weight_names:
            wq = qopr.weight_quantizers[n]
            if not isinstance(wq, StaticQuantizer) or wq.spec.bits != 8 or wq.scale.numel() != 1:
                raise ConfigError(f"{name}.{n}: ONNX QDQ export of recurrent layers covers int8 per-tensor "
                                  f"weights, not {wq.extra_repr()}")
            codes, _, _ = wq.quantize(getattr(qopr, n).detach())
            self.register_buffer(n, codes.reshape(getattr(qopr, n).shape).to(torch.int8))
            self.weight_scales[n] = float(wq.scale)
        for n, p in rnn.named_parameters(recurse=False):
            if n.startswith("bias_"):
                self.register_buffer(n, p.detach().float().clone())

    def _weight(self, n: str) -> torch.Tensor:
        return _qd.dequantize_per_tensor(getattr(self, n), self.weight_scales[n], 0, -128, 127, torch.int8)

    def forward(self, x: torch.Tensor, hx: Any = None) -> Any:
        return run_recurrent(self.kind, self, x, hx, self.input_qdq, self.hidden_qdq, self.cell_qdq,
                             self._weight, self.grids.__getitem__)


def to_qdq_module(qopr: QuantOpr, name: str) -> torch.nn.Module:
    """The export module of one calibrated QuantOpr."""
    if isinstance(qopr, _QRecurrent):
        return QDQRecurrent(qopr, name)
    if isinstance(qopr, QLinear):
        return QDQLinear(qopr, name)
    if isinstance(qopr, QConvNd):
        return QDQConv(qopr, name)
    if isinstance(qopr, _QBinary):
        return QDQBinary(qopr, name)
    if isinstance(qopr, QAttentionInput):
        return _input_qdq(qopr.input_quantizer, name)
    raise ConfigError(f"{name}: no ONNX QDQ form for {type(qopr).__name__}")
