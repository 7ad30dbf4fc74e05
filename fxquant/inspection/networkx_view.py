"""The IR as a networkx graph, for analysis (reachability, dominance, live sets) and drawing."""

from __future__ import annotations

import networkx as nx
from torch import fx

from fxquant.ir import module_of


def to_networkx(gm: fx.GraphModule) -> nx.DiGraph:
    """A DiGraph with one node per fx node (keyed by its name) and an edge from each producer to
    each consumer. Node attributes: op, target (str), module (class name of a call_module target,
    else None), scheme and reason (from node.meta["fxquant"], None where undecided), kernel (the
    frozen layer's GEMM), sqnr_db (recorded with quantize(..., measure_layers=True)) and shape
    (the output shape when capture recorded it)."""
    graph = nx.DiGraph(name=type(gm).__name__)
    for node in gm.graph.nodes:
        module = module_of(gm, node)
        meta = node.meta.get("fxquant", {})
        tm = node.meta.get("tensor_meta")
        val = node.meta.get("val")
        shape = getattr(tm, "shape", None) or getattr(val, "shape", None)
        graph.add_node(node.name, op=node.op, target=str(node.target),
                       module=type(module).__name__ if module is not None else None,
                       scheme=meta.get("scheme"), reason=meta.get("reason"),
                       kernel=node.meta.get("fxquant_kernel"), sqnr_db=meta.get("error", {}).get("sqnr_db"),
                       shape=tuple(shape) if shape is not None else None)
        for src in node.all_input_nodes:
            graph.add_edge(src.name, node.name)
    return graph
