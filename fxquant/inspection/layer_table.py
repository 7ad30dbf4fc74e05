"""fxquant.inspect: one row per layer decision of a quantized model, with its numbers and error."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import fx

from fxquant.errors import ConfigError
from fxquant.ir import META_KEY, module_of
from fxquant.quant_opr import QuantOpr
from fxquant.quantizer import DynamicQuantizer, IdentityQuantizer, Quantizer, StaticQuantizer
from fxquant.timestep import TimestepQuantizer
from fxquant.weighted_quant_opr import WeightedQuantOpr

from .text_table import text_table


@dataclass
class LayerRow:
    """What quantization decided for one node and what it measured (None where not applicable or
    not measured; errors and input statistics need quantize(..., measure_layers=True))."""

    name: str
    op: str
    scheme: str
    reason: str
    activation: str  # e.g. "int8 per-tensor asym, minmax" / "int8 per-token dynamic" / "float"
    act_scale: float | None = None
    act_zero_point: float | None = None
    act_range: tuple[float, float] | None = None  # the float interval the codes cover
    observer: str | None = None
    weight: str = "-"  # e.g. "int8 per-channel sym"
    weight_bits: int | None = None
    weight_group: int | None = None
    weight_scale_min: float | None = None
    weight_scale_max: float | None = None
    smoothing: str | None = None  # fold kind ("norm", "linear", "value", "runtime")
    smooth_scale_min: float | None = None
    smooth_scale_max: float | None = None
    kernel: str | None = None
    sqnr_db: float | None = None
    rel_error: float | None = None
    input_absmax: float | None = None
    input_std: float | None = None
    outlier_ratio: float | None = None  # max|x| / std of the layer's input (after smoothing)
    outlier_ratio_before_smoothing: float | None = None

    @property
    def quantized(self) -> bool:
        return self.scheme != "float"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


#: columns of the printed table: (header, LayerRow field or callable)
_TEXT_COLUMNS = (
    ("layer", "name"), ("op", "op"), ("scheme", "scheme"), ("reason", "reason"),
    ("activation", "activation"), ("act scale", "act_scale"), ("weight", "weight"),
    ("kernel", "kernel"), ("SQNR dB", "sqnr_db"), ("rel err", "rel_error"),
    ("outlier", "outlier_ratio"),
)


class LayerTable:
    """The rows of fxquant.inspect, in graph order. Printing gives a text table; `rows` (LayerRow)
    and `to_dicts()` give the data; `table[name]` finds a row by layer name."""

    def __init__(self, rows: list[LayerRow]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[LayerRow]:
        return iter(self.rows)

    def __getitem__(self, key: int | str) -> LayerRow:
        if isinstance(key, int):
            return self.rows[key]
        for row in self.rows:
            if row.name == key:
                return row
        raise KeyError(f"no layer {key!r} in the table ({len(self.rows)} rows)")

    def to_dicts(self) -> list[dict[str, Any]]:
        return [r.as_dict() for r in self.rows]

    def worst(self, n: int = 5) -> list[LayerRow]:
        """The n quantized rows with the lowest measured SQNR."""
        measured = [r for r in self.rows if r.sqnr_db is not None]
        return sorted(measured, key=lambda r: r.sqnr_db)[:n]

    def __str__(self) -> str:
        rows = [[getattr(r, f) for _, f in _TEXT_COLUMNS] for r in self.rows]
        n_q = sum(r.quantized for r in self.rows)
        head = f"{len(self.rows)} layers, {n_q} quantized"
        return head + "\n" + text_table([h for h, _ in _TEXT_COLUMNS], rows, max_width=40)

    __repr__ = __str__


def require_graph(qmodel: torch.nn.Module, tool: str) -> None:
    """Raise ConfigError unless `qmodel` is the GraphModule fxquant.quantize returns, naming the
    workflow that keeps it for `tool` (compare, report)."""
    if not isinstance(qmodel, fx.GraphModule):
        raise ConfigError(f"{tool} needs the GraphModule fxquant.quantize returns, not a model the quantized layers "
                          "were installed into (inplace=True): quantize with consume_model=True instead (the same "
                          f"peak memory), run {tool} on the GraphModule, then fxquant.apply(model, gm) installs it "
                          "(generate() keeps working)")


def inspect(qmodel: torch.nn.Module) -> LayerTable:
    """One LayerRow per node whose scheme was decided (quantized layers, layers kept float with
    the reason, small ops), in graph order, for a GraphModule from fxquant.quantize / Calibrator.
    A plain module (after fxquant.apply / inplace=True) gives one row per QuantOpr, without reasons."""
    if isinstance(qmodel, fx.GraphModule):
        rows = [_row(node.target, module_of(qmodel, node), node.meta)
                for node in qmodel.graph.nodes if "scheme" in node.meta.get(META_KEY, {})]
    else:
        rows = [_row(name, m, {}) for name, m in qmodel.named_modules() if isinstance(m, QuantOpr)]
    return LayerTable(rows)


def _row(name: str, module: torch.nn.Module | None, meta: dict[str, Any]) -> LayerRow:
    fxq = meta.get(META_KEY, {})
    scheme = fxq.get("scheme", getattr(module, "scheme", "float"))
    op = _op_name(module)
    row = LayerRow(name=str(name), op=op, scheme=scheme, reason=fxq.get("reason", "-"), activation="float")
    if isinstance(module, QuantOpr):
        _fill_activation(row, module)
        if isinstance(module, WeightedQuantOpr):
            _fill_weight(row, module.weight_quantizer)
            row.kernel = meta.get("fxquant_kernel", module.kernel)
    if "smooth" in fxq:
        row.smoothing = fxq["smooth"]
        s = fxq.get("smooth_scale")
        if isinstance(s, torch.Tensor):
            row.smooth_scale_min, row.smooth_scale_max = float(s.min()), float(s.max())
        before = fxq.get("input_stats_before_smoothing")
        if before:
            row.outlier_ratio_before_smoothing = before["outlier_ratio"]
    if "error" in fxq:
        row.sqnr_db, row.rel_error = fxq["error"]["sqnr_db"], fxq["error"]["rel_error"]
    stats = fxq.get("input_stats")
    if stats:
        row.input_absmax, row.input_std, row.outlier_ratio = stats["absmax"], stats["std"], stats["outlier_ratio"]
    return row


def _op_name(module: torch.nn.Module | None) -> str:
    if module is None:
        return "-"
    if isinstance(module, QuantOpr) and isinstance(module, WeightedQuantOpr):
        return type(module.__dict__["_float_module"]).__name__
    name = type(module).__name__
    return name[1:] if isinstance(module, QuantOpr) and name.startswith("Q") else name


def _describe(q: Quantizer) -> str:
    s = q.spec
    if isinstance(q, TimestepQuantizer):
        return f"int{s.bits} per-step (dynamic before step {s.timestep_sep}, {q.num_steps} steps)"
    if isinstance(q, DynamicQuantizer):
        return f"int{s.bits} per-token dynamic" + ("" if s.symmetric else " asym")
    text = f"int{s.bits} per-{s.granularity}"
    if s.granularity == "group":
        text += f"({s.group_size})"
    return text + (" sym" if s.symmetric else " asym") + (" pow2" if s.pow2_scale else "")


def _fill_activation(row: LayerRow, module: QuantOpr) -> None:
    parts = []
    for q in module.input_quantizers:
        if isinstance(q, IdentityQuantizer) or not q.enabled:
            parts.append("float")
            continue
        parts.append(_describe(q) + (f", {q.spec.observer}" if isinstance(q, StaticQuantizer) else ""))
    row.activation = "; ".join(parts)
    q = module.input_quantizer
    if isinstance(q, StaticQuantizer) and q.enabled and q.calibrated and q.scale.numel() == 1:
        scale, zp = float(q.scale), float(q.zero_point)
        row.act_scale, row.act_zero_point = scale, zp
        row.act_range = ((q.qmin - zp) * scale, (q.qmax - zp) * scale)
        row.observer = q.spec.observer
    elif isinstance(q, StaticQuantizer) and q.enabled:
        row.observer = q.spec.observer


def _fill_weight(row: LayerRow, q: Quantizer) -> None:
    if isinstance(q, IdentityQuantizer) or not isinstance(q, StaticQuantizer) or not q.enabled:
        return
    row.weight = _describe(q)
    row.weight_bits = q.spec.bits
    row.weight_group = q.spec.group_size if q.spec.granularity == "group" else None
    if q.calibrated:
        row.weight_scale_min, row.weight_scale_max = float(q.scale.min()), float(q.scale.max())


def row_fields() -> list[str]:
    """Names of LayerRow's fields, in order (the columns of the report's table)."""
    return [f.name for f in fields(LayerRow)]


def finite_or_none(value: float | None) -> float | None:
    """value, or None when it is not a finite number (for JSON)."""
    return value if value is not None and math.isfinite(value) else None

