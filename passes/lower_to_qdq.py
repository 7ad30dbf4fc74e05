"""Lower a calibrated graph to QuantizeLinear/DequantizeLinear form for ONNX export."""

from __future__ import annotations

import copy

from torch import fx

from fxquant.captured_module import quiet_treespec_copies
from fxquant.formats.qdq_modules import to_qdq_module
from fxquant.quant_opr import QuantOpr

from .pass_manager import replace_submodule


def lower_to_qdq(gm: fx.GraphModule) -> fx.GraphModule:
    """Pass: a copy of `gm` whose QuantOprs are export modules (fxquant.formats.qdq_modules) computing
    with quantize/dequantize ops and int8 weights; `gm` itself is left as it is."""
    with quiet_treespec_copies():
        out = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    out.meta.update(gm.meta)
    for name, module in list(gm.named_modules()):
        if isinstance(module, QuantOpr):
            replace_submodule(out, name, to_qdq_module(module, name))
    out.recompile()
    return out
