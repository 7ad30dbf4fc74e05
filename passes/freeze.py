"""Freeze calibrated QuantOprs: observers dropped, qparams kept, weight codes cached as int8."""

from __future__ import annotations

from torch import fx

from fxquant.quant_opr import QuantOpr


def freeze(gm: fx.GraphModule) -> fx.GraphModule:
    """Pass: call QuantOpr.freeze() everywhere and leave fake quantization on."""
    for m in gm.modules():
        if isinstance(m, QuantOpr):
            m.freeze()
            m.set_quant(True, True)
    return gm
