"""Bar charts as standalone SVG text (no plotting library, no network), for the HTML report."""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

#: fill colour of each scheme in every chart and graph drawing
SCHEME_COLORS = {
    "w8a8": "#1f77b4", "w8a8_dynamic": "#2ca02c", "w8a16": "#9467bd", "w4a16": "#8c564b",
    "w8a8_timestep": "#17becf", "w8a8s": "#bcbd22", "float": "#b0b0b0",
}
OTHER_COLOR = "#e377c2"


def scheme_color(scheme: str | None) -> str:
    return SCHEME_COLORS.get(scheme or "float", OTHER_COLOR)


def _ticks(lo: float, hi: float, log: bool) -> list[float]:
    if log:
        return [10.0 ** e for e in range(math.floor(lo), math.ceil(hi) + 1)]
    span = hi - lo or 1.0
    step = 10 ** math.floor(math.log10(span / 5))
    for mult in (1, 2, 5, 10):
        if span / (step * mult) <= 6:
            step *= mult
            break
    first = math.floor(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step) + 2) if first + i * step <= hi + 1e-12]


def bar_chart(chart_id: str, title: str, labels: Sequence[str], series: dict[str, Sequence[float | None]],
              colors: dict[str, str | Sequence[str]], y_label: str, log_y: bool = False,
              height: int = 260) -> str:
    """Grouped bars: one group per label, one bar per series (None leaves a gap).

    colors: per series, one colour or one colour per label. Each bar has a <title> tooltip with
    its label, series and value. Returns <svg id=chart_id> text, width growing with the labels.
    """
    n, k = len(labels), max(len(series), 1)
    values = [v for vs in series.values() for v in vs if v is not None and math.isfinite(v)]
    if log_y:
        values = [v for v in values if v > 0]
    left, right, top, bottom = 64, 16, 28, 28
    bar = max(2.0, min(14.0, 900.0 / max(n * k, 1)))
    width = int(left + right + n * (bar * k + 2))
    plot_h = height - top - bottom
    if not values:
        return (f'<svg id="{escape(chart_id)}" xmlns="http://www.w3.org/2000/svg" width="{width}" height="60">'
                f'<text x="8" y="20" font-size="13">{escape(title)}: nothing measured</text></svg>')
    lo, hi = min(values), max(values)
    if log_y:
        lo, hi = math.log10(lo), math.log10(hi)
        lo, hi = math.floor(lo), max(math.ceil(hi), math.floor(lo) + 1)
    else:
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        hi = hi if hi > lo else lo + 1.0

    def y_of(v: float) -> float:
        t = math.log10(v) if log_y else v
        return top + plot_h * (1.0 - (t - lo) / (hi - lo))

    base = y_of(10.0 ** lo) if log_y else y_of(0.0)
    out = [f'<svg id="{escape(chart_id)}" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="11">',
           f'<text x="{left}" y="16" font-size="13" font-weight="bold">{escape(title)}</text>']
    for t in _ticks(lo, hi, log_y):
        v = t
        y = y_of(v)
        if not top - 0.5 <= y <= top + plot_h + 0.5:
            continue
        out.append(f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e4e4e4"/>')
        out.append(f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end">{v:g}</text>')
    out.append(f'<text x="12" y="{top + plot_h / 2:.0f}" transform="rotate(-90 12 {top + plot_h / 2:.0f})" '
               f'text-anchor="middle">{escape(y_label)}</text>')
    for i, label in enumerate(labels):
        x0 = left + i * (bar * k + 2)
        for j, (name, vs) in enumerate(series.items()):
            v = vs[i]
            if v is None or not math.isfinite(v) or (log_y and v <= 0):
                continue
            c = colors[name]
            color = c if isinstance(c, str) else c[i]
            y = y_of(v)
            top_y, h = min(y, base), abs(base - y)
            out.append(f'<rect class="bar" x="{x0 + j * bar:.1f}" y="{top_y:.1f}" width="{bar:.1f}" '
                       f'height="{max(h, 0.5):.1f}" fill="{color}"><title>{escape(label)} {escape(name)}: '
                       f'{v:.4g}</title></rect>')
    out.append(f'<line x1="{left}" x2="{width - right}" y1="{base:.1f}" y2="{base:.1f}" stroke="#666"/>')
    out.append(f'<text x="{left}" y="{height - 8}">{n} layers in graph order (hover a bar for its name)</text>')
    legend_x = width - right - 150 * len(series)
    for j, name in enumerate(series):
        c = colors[name]
        if isinstance(c, str):
            out.append(f'<rect x="{legend_x + j * 150}" y="6" width="10" height="10" fill="{c}"/>'
                       f'<text x="{legend_x + j * 150 + 14}" y="15">{escape(name)}</text>')
    out.append("</svg>")
    return "".join(out)
