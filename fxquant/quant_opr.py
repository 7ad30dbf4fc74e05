"""QuantOpr: a layer or small op with its quantizers (Sparsebit's contract).

Each QuantOpr holds `input_quantizers` (one per tensor input; `input_quantizer` is the first),
`weight_quantizer` (layers only), the resolved scheme name, and `set_quant(w_quant, a_quant)`.
Forward passes are differentiable through a straight-through estimator. This module holds the
base class and the small ops (add, bmm, matmul, fa3 attention inputs); the layers are
WeightedQuantOpr (weighted_quant_opr.py), QLinear (quant_linear.py) and QConv1d / QConv2d
(quant_conv.py).
"""

from __future__ import annotations

import torch

from .quantizer import IdentityQuantizer, Quantizer, StaticQuantizer
from .quantizer_factory import build_quantizer
from .schemes import Scheme
from .timestep import TimestepQuantizer


class QuantOpr(torch.nn.Module):
    """Base of all quantized operators."""

    num_inputs = 1

    def __init__(self, scheme: Scheme) -> None:
        super().__init__()
        self.scheme = scheme.name
        self.input_quantizers = torch.nn.ModuleList(
            build_quantizer(scheme.activation) for _ in range(self.num_inputs)
        )
        self.weight_quantizer: Quantizer = IdentityQuantizer()

    @property
    def input_quantizer(self) -> Quantizer:
        """The quantizer of the first (for layers: the only) tensor input."""
        return self.input_quantizers[0]

    def set_quant(self, w_quant: bool = True, a_quant: bool = True) -> QuantOpr:
        """Turn fake quantization of the weight and of the inputs on or off."""
        self.weight_quantizer.enabled = w_quant and not isinstance(self.weight_quantizer, IdentityQuantizer)
        for q in self.input_quantizers:
            q.enabled = a_quant and not isinstance(q, IdentityQuantizer)
        return self

    def to_float(self) -> torch.nn.Module:
        """The float module this QuantOpr stands for (weights shared)."""
        return self.__dict__["_float_module"]

    def calibrate_from_inputs(self, inputs: list) -> None:
        """Set qparams that depend on more than the inputs' ranges, from the stored values of the
        first input (one per calibration batch); the runner calls it once per module. Nothing
        here; recurrent layers observe their hidden and cell states."""

    def freeze(self) -> None:
        """Drop observers, keep qparams."""
        for q in [self.weight_quantizer, *self.input_quantizers]:
            if isinstance(q, (StaticQuantizer, TimestepQuantizer)):
                q.freeze()

    def extra_repr(self) -> str:
        return f"scheme={self.scheme}"


class _QBinary(QuantOpr):
    """Small op with two tensor inputs, each with its own input quantizer."""

    num_inputs = 2
    op = staticmethod(torch.add)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.op(self.input_quantizers[0](x), self.input_quantizers[1](y))


class QAdd(_QBinary):
    """Quantized Add small op."""

    op = staticmethod(torch.add)


class QBMM(_QBinary):
    """Quantized BMM small op: [b, n, k] x [b, k, m]."""

    op = staticmethod(torch.bmm)


class QMatMul(_QBinary):
    """Quantized MatMul small op (torch.matmul broadcasting)."""

    op = staticmethod(torch.matmul)


class QAttentionInput(QuantOpr):
    """fa3: per-head static int8 quantization of one attention input, q / k / v [b, heads, s, d].

    input_quantizer: symmetric, one scale per head (axis 1), so scale is float32 [heads].
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.input_quantizer(x)
