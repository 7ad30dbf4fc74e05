"""Replace every layer / small op whose resolved scheme is not float by its QuantOpr."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import fx

from fxquant.errors import ConfigError
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
        bad_groups: list[str] = []
        widths: set[int] = set()
        for node in gm.graph.nodes:
            module = module_of(gm, node)
            if type(module) not in QUANT_OPR_FOR:
                continue
            meta = fxq_meta(node)
            scheme = make_scheme(meta.get("scheme", "float"), self.options)
            if scheme.is_float:
                continue
            if (self.options.conv_w_per_channel and isinstance(module, torch.nn.modules.conv._ConvNd)
                    and scheme.weight is not None and scheme.weight.granularity == "tensor"):
                scheme = replace(scheme, weight=scheme.weight.with_(granularity="channel", axis=0))
            if scheme.weight is not None and scheme.weight.granularity == "group":
                k = module.weight.shape[1]
                widths.add(k)
                if k % scheme.weight.group_size:
                    bad_groups.append(f"{node.target} (in_features {k})")
                    continue
            try:
                qopr = to_quant_opr(module, scheme)
            except ValueError as exc:
                meta["scheme"], meta["reason"] = "float", f"not quantizable: {exc}"
                continue
            replace_submodule(gm, node.target, qopr)
        if bad_groups:
            g = self.options.group_size
            fits = [d for d in (256, 128, 64, 32, 16, 8) if all(w % d == 0 for w in widths)]
            raise ConfigError(
                f"group_size {g} does not divide the input width of {len(bad_groups)} layers, e.g. "
                f"{', '.join(bad_groups[:3])}; group sizes that fit every layer: {fits or 'none'}")
        return gm
