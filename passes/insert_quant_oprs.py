"""Replace every layer / small op whose resolved scheme is not float by its QuantOpr."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import fx

from fxquant.ir import fxq_meta, module_of
from fxquant.quant_opr import QUANT_OPR_FOR, to_quant_opr
from fxquant.schemes import SchemeOptions, make_scheme

from .pass_manager import replace_submodule


@dataclass
class InsertQuantOprs:
    """Pass: swap modules for QuantOprs built from node.meta["fxquant"]["scheme"] and `options`.

    Weights are shared with the float modules, not copied. Quantizers start disabled.
    """

    options: SchemeOptions = field(default_factory=SchemeOptions)

    def __call__(self, gm: fx.GraphModule) -> fx.GraphModule:
        for node in gm.graph.nodes:
            module = module_of(gm, node)
            if type(module) not in QUANT_OPR_FOR:
                continue
            meta = fxq_meta(node)
            scheme = make_scheme(meta.get("scheme", "float"), self.options)
            if scheme.is_float:
                continue
            try:
                qopr = to_quant_opr(module, scheme)
            except ValueError as exc:
                meta["scheme"], meta["reason"] = "float", f"not quantizable: {exc}"
                continue
            replace_submodule(gm, node.target, qopr)
        return gm
