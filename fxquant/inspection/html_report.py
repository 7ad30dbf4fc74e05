"""fxquant.report: one self-contained HTML page about a quantized model (no network to view it)."""

from __future__ import annotations

import datetime
import logging
import math
import os
from collections import Counter
from html import escape
from pathlib import Path
from typing import Any

import torch
from torch import fx

from fxquant.atomic_files import written_atomically
from fxquant.calib_data import normalise_calib_data
from fxquant.layer_metrics import ErrorStats, TensorStats
from fxquant.quant_opr import QuantOpr
from fxquant.resources import storage_bytes
from fxquant.weighted_quant_opr import WeightedQuantOpr

from .graph_drawing import depth_for, draw_graph
from .layer_table import LayerTable, inspect, require_graph
from .svg_charts import bar_chart, scheme_color
from .text_table import format_value

log = logging.getLogger(__name__)

#: the table's columns: (header, LayerRow field)
TABLE_COLUMNS = (
    ("layer", "name"), ("op", "op"), ("scheme", "scheme"), ("reason", "reason"), ("kernel", "kernel"),
    ("activation", "activation"), ("act scale", "act_scale"), ("act zero point", "act_zero_point"),
    ("observer", "observer"), ("weight", "weight"), ("w scale min", "weight_scale_min"),
    ("w scale max", "weight_scale_max"), ("smoothing", "smoothing"), ("smooth s min", "smooth_scale_min"),
    ("smooth s max", "smooth_scale_max"), ("SQNR dB", "sqnr_db"), ("rel err", "rel_error"),
    ("input max|x|", "input_absmax"), ("input std", "input_std"), ("outlier", "outlier_ratio"),
    ("outlier before smoothing", "outlier_ratio_before_smoothing"),
)

_STYLE = """
body{font-family:sans-serif;margin:24px;color:#222}h1{font-size:22px}h2{font-size:17px;margin-top:28px}
.summary td{padding:2px 14px 2px 0}.note{color:#8a5a00}.scroll{overflow-x:auto;border:1px solid #ddd;padding:6px}
table.layers{border-collapse:collapse;font-size:12px}table.layers th{cursor:pointer;background:#f0f0f0;
position:sticky;top:0}table.layers td,table.layers th{border:1px solid #ddd;padding:2px 6px;white-space:nowrap}
.swatch{display:inline-block;width:10px;height:10px;margin-right:4px}button{margin-right:6px}
"""

_SCRIPT = """
window.fxqErrors=[];
window.addEventListener('error',function(e){fxqErrors.push(String(e.message));
  document.body.dataset.errors=fxqErrors.join(' | ');});
function fxqSort(table,col,th){
  var body=table.tBodies[0],rows=Array.prototype.slice.call(body.rows),asc=th.dataset.dir!=='asc';
  rows.sort(function(a,b){var x=a.cells[col].dataset.v,y=b.cells[col].dataset.v;
    if(x!==undefined&&y!==undefined){x=parseFloat(x);y=parseFloat(y);
      if(isNaN(x))return 1;if(isNaN(y))return -1;return asc?x-y:y-x;}
    x=a.cells[col].textContent;y=b.cells[col].textContent;return asc?x.localeCompare(y):y.localeCompare(x);});
  rows.forEach(function(r){body.appendChild(r);});th.dataset.dir=asc?'asc':'desc';}
document.querySelectorAll('table.layers th').forEach(function(th,i){
  th.addEventListener('click',function(){fxqSort(th.closest('table'),i,th);});});
function fxqGraph(id){document.querySelectorAll('.graphview').forEach(function(d){
  d.style.display=d.id===id?'block':'none';});}
document.body.dataset.bars=String(document.querySelectorAll('#sqnr-plot rect.bar').length);
document.body.dataset.rows=String(document.querySelectorAll('table.layers tbody tr').length);
document.body.dataset.ready='1';
"""


def report(qmodel: fx.GraphModule, calib_data: Any = None, path: str | os.PathLike = "fxquant_report.html",
           title: str | None = None) -> Path:
    """Write an HTML page about `qmodel` (from fxquant.quantize / Calibrator) and return its path.

    It shows a summary (scheme mix, parameter bytes before and after, calibration and pass
    timings, peak memory), per-layer SQNR, input ranges and outlier ratios (before and after
    smoothing), the graph coloured by scheme, and the sortable fxquant.inspect table.
    calib_data (same form as quantize's): measures the input statistics, and, where the float
    weights are still held, the layer errors that quantization did not record
    (quantize(..., measure_layers=True) records both). Written to a temporary name, then renamed.
    """
    require_graph(qmodel, "report")
    table = inspect(qmodel)
    notes = []
    if calib_data is not None:
        measured = measure_missing(qmodel, table, calib_data)
        if measured:
            notes.append(f"measured on the calib_data given to report(): {measured}")
    if not any(r.sqnr_db is not None for r in table):
        notes.append("layer errors were not recorded: quantize with measure_layers=True (the float weights "
                     "are released at freeze, so they cannot be measured afterwards)")
    page = _page(qmodel, table, notes, title or f"fxquant report: {type(qmodel).__name__}")
    path = Path(path)
    with written_atomically(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    log.info("wrote %s (%d bytes, %d layers)", path, len(page.encode()), len(table))
    return path


@torch.no_grad()
def measure_missing(qmodel: fx.GraphModule, table: LayerTable, calib_data: Any) -> str:
    """Fill the rows' input statistics (and errors, where the float weight is held) that
    calibration did not record, by running qmodel on calib_data; says what it measured."""
    targets = {r.name: r for r in table if r.quantized and (r.input_absmax is None or r.sqnr_db is None)}
    modules = {n: m for n, m in qmodel.named_modules() if n in targets and isinstance(m, QuantOpr)}
    if not modules:
        return ""
    stats = {n: TensorStats() for n in modules}
    errors = {n: ErrorStats() for n, m in modules.items()
              if isinstance(m, WeightedQuantOpr) and not m.float_weight_released and targets[n].sqnr_db is None}
    handles = []
    for name, module in modules.items():
        def hook(mod, args, out, name=name):
            x = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if x is None:
                return
            stats[name].add(x)
            if name in errors:
                mod.set_quant(False, False)
                try:
                    errors[name].add(out, mod.forward(*args))  # not mod(): that would re-enter this hook
                finally:
                    mod.set_quant(True, True)
        handles.append(module.register_forward_hook(hook))
    try:
        for args, kwargs in normalise_calib_data(calib_data):
            qmodel(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    for name, s in stats.items():
        row = targets[name]
        if row.input_absmax is None and s.count:
            row.input_absmax, row.input_std, row.outlier_ratio = s.absmax, s.std, s.outlier_ratio
    for name, e in errors.items():
        targets[name].sqnr_db, targets[name].rel_error = e.sqnr_db, e.rel_error
    what = [f"input statistics of {len(stats)} layers"]
    if errors:
        what.append(f"errors of {len(errors)} layers (float weights held)")
    return ", ".join(what)


def _summary(qmodel: fx.GraphModule, table: LayerTable) -> list[tuple[str, str]]:
    schemes = Counter(r.scheme for r in table if r.op not in ("Add", "BMM", "MatMul") or r.quantized)
    after = storage_bytes(qmodel)
    before = qmodel.meta.get("fxquant_float_bytes")
    timings = qmodel.meta.get("fxquant_timings", [])
    rss = qmodel.meta.get("fxquant_peak_rss_bytes")
    measured = [r.sqnr_db for r in table if r.sqnr_db is not None and math.isfinite(r.sqnr_db)]
    rows = [
        ("layers", f"{sum(r.quantized for r in table)} quantized of {len(table)} decided nodes"),
        ("scheme mix", ", ".join(f'<span class="swatch" style="background:{scheme_color(s)}"></span>{escape(s)}: {c}'
                                 for s, c in schemes.most_common())),
        ("parameters + buffers", f"{after / 2**20:.1f} MiB" + (
            f" (float model {before / 2**20:.1f} MiB, {after / before:.3f}x)" if before else "")),
        ("quantize time", f"{sum(t for _, t in timings):.2f} s" if timings else "not recorded"),
        ("pass timings", ", ".join(f"{escape(n)} {t:.2f} s" for n, t in timings) or "-"),
        ("peak memory (process)", f"{rss / 2**20:.0f} MiB" if rss else "not recorded"),
        ("capture", escape(str(qmodel.meta.get("fxquant_capture", "-")))),
        ("median layer SQNR", f"{sorted(measured)[len(measured) // 2]:.2f} dB" if measured else "not measured"),
        ("worst layers", ", ".join(f"{escape(r.name)} ({r.sqnr_db:.1f} dB)" for r in table.worst(5)) or "-"),
    ]
    return rows


def _charts(table: LayerTable) -> str:
    rows = [r for r in table if r.quantized]
    labels = [r.name for r in rows]
    colors = [scheme_color(r.scheme) for r in rows]
    sqnr = bar_chart("sqnr-plot", "Per-layer SQNR (dB, higher is better)", labels,
                     {"SQNR": [r.sqnr_db for r in rows]}, {"SQNR": colors}, "SQNR dB")
    smoothed = any(r.outlier_ratio_before_smoothing is not None for r in rows)
    series = {"after smoothing" if smoothed else "input": [r.outlier_ratio for r in rows]}
    palette = {"after smoothing" if smoothed else "input": "#1f77b4"}
    if smoothed:
        series = {"before smoothing": [r.outlier_ratio_before_smoothing for r in rows], **series}
        palette["before smoothing"] = "#ff7f0e"
    outliers = bar_chart("outlier-plot", "Input outlier ratio max|x| / std (log)", labels, series, palette,
                         "max|x| / std", log_y=True)
    ranges = bar_chart("range-plot", "Input range max|x| (log)", labels, {"max|x|": [r.input_absmax for r in rows]},
                       {"max|x|": colors}, "max|x|", log_y=True)
    return "".join(f'<div class="scroll">{svg}</div>' for svg in (sqnr, ranges, outliers))


def _graph_views(qmodel: fx.GraphModule) -> str:
    deep = depth_for(qmodel)
    depths = sorted({max(deep - 1, 1), deep})
    n_nodes = sum(1 for n in qmodel.graph.nodes if n.op != "get_attr")
    views = [(f"graph-depth-{d}", f"scopes cut to {d} part{'s' if d > 1 else ''}", d) for d in depths]
    if n_nodes <= 400:
        views.append(("graph-full", "every node", None))
    buttons = "".join(f'<button onclick="fxqGraph(\'{vid}\')">{escape(label)}</button>' for vid, label, _ in views)
    divs = "".join(f'<div class="graphview scroll" id="{vid}" style="display:{"block" if i == len(depths) - 1 else "none"}">'
                   f'{draw_graph(qmodel, d, svg_id=vid + "-svg")}</div>' for i, (vid, _, d) in enumerate(views))
    return f"<p>{buttons}</p>{divs}"


def _table(table: LayerTable) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h, _ in TABLE_COLUMNS)
    body = []
    for r in table:
        cells = []
        for _, f in TABLE_COLUMNS:
            v = getattr(r, f)
            sort = f' data-v="{v!r}"' if isinstance(v, float) and not isinstance(v, bool) else ""
            cells.append(f"<td{sort}>{escape(format_value(v))}</td>")
        body.append(f'<tr data-scheme="{escape(r.scheme)}">{"".join(cells)}</tr>')
    return f'<table class="layers"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _page(qmodel: fx.GraphModule, table: LayerTable, notes: list[str], title: str) -> str:
    summary = "".join(f"<tr><td>{escape(k)}</td><td>{v}</td></tr>" for k, v in _summary(qmodel, table))
    note_html = "".join(f'<p class="note">{escape(n)}</p>' for n in notes)
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f"<style>{_STYLE}</style></head><body><h1>{escape(title)}</h1><p>generated {stamp}</p>"
            f'<table class="summary">{summary}</table>{note_html}'
            f"<h2>Per-layer error and activations</h2>{_charts(table)}"
            f"<h2>Graph, coloured by scheme</h2>{_graph_views(qmodel)}"
            f"<h2>Layers (click a header to sort)</h2><div class=\"scroll\">{_table(table)}</div>"
            f"<script>{_SCRIPT}</script></body></html>")

