"""Which QuantOpr stands for which float module, and how to build it."""

from __future__ import annotations

import torch

from .quant_conv import QConv1d, QConv2d
from .quant_linear import QLinear
from .quant_opr import QBMM, QAdd, QMatMul, QuantOpr
from .quant_rnn import QGRU, QLSTM
from .schemes import Scheme
from .small_ops import BMM, Add, MatMul

QUANT_OPR_FOR: dict[type[torch.nn.Module], type[QuantOpr]] = {
    torch.nn.Linear: QLinear,
    torch.nn.Conv1d: QConv1d,
    torch.nn.Conv2d: QConv2d,
    torch.nn.LSTM: QLSTM,
    torch.nn.GRU: QGRU,
    Add: QAdd,
    BMM: QBMM,
    MatMul: QMatMul,
}
#: layers every front end quantizes by default
QUANTIZABLE_LAYERS = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)
#: recurrent layers, quantized where a front end asks (linger does by default)
RECURRENT_LAYERS = (torch.nn.LSTM, torch.nn.GRU)


def to_quant_opr(module: torch.nn.Module, scheme: Scheme) -> QuantOpr:
    """The QuantOpr that replaces `module` under `scheme` (weights shared, not copied)."""
    cls = QUANT_OPR_FOR.get(type(module))
    if cls is None:
        raise TypeError(f"no QuantOpr for {type(module).__name__}; supported: "
                        + ", ".join(t.__name__ for t in QUANT_OPR_FOR))
    if cls in (QAdd, QBMM, QMatMul):
        qopr = cls(scheme)
        qopr.__dict__["_float_module"] = module
        return qopr
    return cls(module, scheme)
