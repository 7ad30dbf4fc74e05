"""Replace every layer / small op whose resolved scheme is not float by its QuantOpr."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace

import torch
from torch import fx

from fxquant.errors import ConfigError, NotQuantizableError
from fxquant.ir import fxq_meta, module_of
from fxquant.quant_opr import QuantOpr
from fxquant.quant_opr_table import QUANT_OPR_FOR, to_quant_opr
from fxquant.schemes import Scheme, SchemeOptions, make_scheme

from .pass_manager import replace_submodule


@dataclass
class InsertQuantOprs:
    """Pass: swap modules for QuantOprs built from node.meta["fxquant"]["scheme"] and `options`.

    Weights are shared with the float modules, not copied. Quantizers start disabled.
    require_any: a graph left with no QuantOpr at all is a ConfigError that lists why each
    layer stayed float (a quantization that quantizes nothing is a mistake, not a result).
    schemes: {name: Scheme} used instead of make_scheme for those names (e.g. linger's).
    """

    options: SchemeOptions = field(default_factory=SchemeOptions)
    require_any: bool = True
    schemes: dict[str, Scheme] = field(default_factory=dict)  # named schemes a front end built itself

    def __call__(self, gm: fx.GraphModule) -> fx.GraphModule:
        bad_groups: list[str] = []
        widths: set[int] = set()
        for node in gm.graph.nodes:
            module = module_of(gm, node)
            if type(module) not in QUANT_OPR_FOR:
                continue
            meta = fxq_meta(node)
            name = meta.get("scheme", "float")
            scheme = self.schemes[name] if name in self.schemes else make_scheme(name, self.options)
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
            except NotQuantizableError as exc:
                meta["scheme"], meta["reason"] = "float", f"not quantizable: {exc}"
                continue
            replace_submodule(gm, node.target, qopr)
        if bad_groups:
            g = self.options.group_size
            fits = [d for d in (256, 128, 64, 32, 16, 8) if all(w % d == 0 for w in widths)]
            raise ConfigError(
                f"group_size {g} does not divide the input width of {len(bad_groups)} layers, e.g. "
                f"{', '.join(bad_groups[:3])}; group sizes that fit every layer: {fits or 'none'}")
        if self.require_any and not any(isinstance(m, QuantOpr) for m in gm.modules()):
            reasons = Counter(fxq_meta(n).get("reason", "?") for n in gm.graph.nodes
                              if type(module_of(gm, n)) in QUANT_OPR_FOR)
            why = "; ".join(f"{count} x {reason}" for reason, count in reasons.most_common(5))
            raise ConfigError(f"no layer was quantized ({why or 'the model has no Linear/Conv layer'}); "
                              "check the scheme, mix_cfg and disable settings")
        return gm
