"""fa3: quantize the Q, K and V inputs of every scaled-dot-product attention per head."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import fx

from fxquant.ir import SDPA_TARGETS, fxq_meta, scope_of
from fxquant.quant_opr import QAttentionInput
from fxquant.quantizer import QuantSpec
from fxquant.schemes import Scheme

log = logging.getLogger(__name__)
ROLES = ("q", "k", "v")


@dataclass
class QuantizeAttention:
    """Pass: before each sdpa(q, k, v) insert call_module nodes `<attention>.fa_q / fa_k / fa_v`
    (QAttentionInput, symmetric int8, one static scale per head observed by `act_method`).
    `<attention>` is the module the sdpa was traced in (e.g. model.layers.0.self_attn)."""

    act_method: str = "minmax"

    def __call__(self, gm: fx.GraphModule) -> fx.GraphModule:
        spec = QuantSpec(bits=8, symmetric=True, granularity="channel", axis=1, observer=self.act_method)
        scheme = Scheme("fa3", None, spec)
        count = 0
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target not in SDPA_TARGETS:
                continue
            scope = scope_of(node) or f"attention_{count}"
            for i, role in enumerate(ROLES):
                arg = node.args[i]
                name = f"{scope}.fa_{role}"
                if not isinstance(arg, fx.Node) or _has_submodule(gm, name):
                    raise ValueError(f"cannot quantize attention input {role} of {node.name} as {name}")
                gm.add_submodule(name, QAttentionInput(scheme))
                with gm.graph.inserting_before(node):
                    q = gm.graph.call_module(name, (arg,))
                fxq_meta(q).update(scheme="fa3", reason="fa3: per-head Q/K/V quantization")
                _replace_arg(node, i, q)
            count += 1
        gm.recompile()
        log.info("fa3: quantized q/k/v of %d attention ops", count)
        return gm


def _replace_arg(node: fx.Node, i: int, new: fx.Node) -> None:
    args = list(node.args)
    args[i] = new
    node.args = tuple(args)


def _has_submodule(gm: fx.GraphModule, name: str) -> bool:
    try:
        gm.get_submodule(name)
    except AttributeError:
        return False
    return True
