"""Lower QLinear (and savable QConv) QuantOprs to Ascend runtime modules (torch_npu ops, or their exact references)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import fx

from fxquant.formats.ascend_format import layer_tensors, savable
from fxquant.formats.ascend_modules import build_ascend_layer
from fxquant.kernels import AscendOps
from fxquant.quant_opr import QuantOpr

from .pass_manager import replace_submodule

log = logging.getLogger(__name__)


@dataclass
class LowerToAscend:
    """Pass: each calibrated QLinear (or QConv of a savable scheme) becomes the Ascend module of its scheme, built from the same
    tensors a saved checkpoint holds. Other QuantOprs stay fake-quant."""

    ops: AscendOps | None = None

    def __call__(self, gm: fx.GraphModule) -> fx.GraphModule:
        for name, module in list(gm.named_modules()):
            if isinstance(module, QuantOpr) and savable(module):
                kind, tensors = layer_tensors(module, module.weight.dtype)
                replace_submodule(gm, name, build_ascend_layer(kind, tensors, module.to_float(), self.ops))
            elif isinstance(module, QuantOpr):
                log.info("%s (%s) has no Ascend lowering; left as fake-quant", name, type(module).__name__)
        return gm
