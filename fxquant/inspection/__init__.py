"""Seeing what quantization did: per-layer table, numeric debugger, HTML report, graph views."""

from .graph_drawing import draw_graph
from .html_report import report
from .layer_table import LayerRow, LayerTable, inspect
from .networkx_view import to_networkx
from .numeric_debugger import Comparison, NodeError, compare

__all__ = ["Comparison", "LayerRow", "LayerTable", "NodeError", "compare", "draw_graph", "inspect", "report",
           "to_networkx"]
