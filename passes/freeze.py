"""Freeze calibrated QuantOprs: observers dropped, qparams kept, weights as integer codes."""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from fxquant.quant_opr import QuantOpr
from fxquant.resources import file_mapped_ranges, page_out_file_pages, release_freed_memory
from fxquant.weighted_quant_opr import WeightedQuantOpr


@dataclass
class Freeze:
    """Pass: QuantOpr.freeze() everywhere, fake quantization left on. Layers keep their weight as
    int8 (packed int4) codes and run their device's kernel, recorded as node.meta["fxquant_kernel"];
    keep_float_weight keeps the float weights too (for fine-tuning). A released float weight that
    lies in a file mapping (mmap loading) has its pages handed back at once: quantizing read them,
    and the model it came from may hold the tensor until the quantized layers replace its own."""

    keep_float_weight: bool = False

    def __call__(self, gm: fx.GraphModule) -> fx.GraphModule:
        file_ranges = file_mapped_ranges()
        for m in gm.modules():
            if isinstance(m, WeightedQuantOpr):
                float_weight = None if m.float_weight_released else m.weight
                m.freeze(keep_float_weight=self.keep_float_weight)
                if float_weight is not None and m.float_weight_released and file_ranges:
                    page_out_file_pages(float_weight, file_ranges)
                release_freed_memory()  # the float temporaries of quantizing, between kept int8 codes
            elif isinstance(m, QuantOpr):
                m.freeze()
            if isinstance(m, QuantOpr):
                m.set_quant(True, True)
        for node in gm.graph.nodes:
            if node.op == "call_module" and isinstance(module := gm.get_submodule(node.target), WeightedQuantOpr):
                node.meta["fxquant_kernel"] = module.kernel
        return gm


def freeze(gm: fx.GraphModule) -> fx.GraphModule:
    """Pass: Freeze() with its defaults (float weights released)."""
    return Freeze()(gm)
