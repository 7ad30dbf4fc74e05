"""A drawing of the IR as SVG: layers coloured by scheme, optionally collapsed by module scope."""

from __future__ import annotations

from collections import Counter, defaultdict
from html import escape

import networkx as nx
from torch import fx

from fxquant.ir import scope_of

from .networkx_view import to_networkx
from .svg_charts import scheme_color

BOX_W, BOX_H, GAP_X, GAP_Y = 190, 34, 14, 22


def scope_groups(gm: fx.GraphModule, depth: int | None) -> dict[str, str]:
    """{node name: group name}: the node's module scope cut to `depth` dotted parts (None: every
    node its own group). get_attr nodes are left out; inputs and the output stay their own."""
    groups = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            continue
        if depth is None or node.op in ("placeholder", "output"):
            groups[node.name] = node.name
            continue
        scope = str(node.target) if node.op == "call_module" else scope_of(node)
        parts = scope.split(".") if scope else []
        groups[node.name] = ".".join(parts[:depth]) if parts else node.name
    return groups


def collapsed_graph(gm: fx.GraphModule, depth: int | None) -> nx.DiGraph:
    """The IR with each scope group (see scope_groups) as one node. Node attributes: label,
    members (count), schemes (Counter of the decided schemes inside), scheme (the most common
    quantized scheme, else 'float' when something was decided, else None)."""
    full = to_networkx(gm)
    groups = scope_groups(gm, depth)
    out = nx.DiGraph()
    members: dict[str, list[str]] = defaultdict(list)
    for name, group in groups.items():
        members[group].append(name)
    for group, names in members.items():
        schemes = Counter(full.nodes[n]["scheme"] for n in names if full.nodes[n]["scheme"] is not None)
        quantized = Counter({s: c for s, c in schemes.items() if s != "float"})
        scheme = quantized.most_common(1)[0][0] if quantized else ("float" if schemes else None)
        single = len(names) == 1
        op = full.nodes[names[0]]["module"] or full.nodes[names[0]]["op"] if single else None
        out.add_node(group, label=group, members=len(names), schemes=schemes, scheme=scheme, op=op)
    for a, b in full.edges:
        ga, gb = groups.get(a), groups.get(b)
        if ga is not None and gb is not None and ga != gb:
            out.add_edge(ga, gb)
    return out


def _layers(graph: nx.DiGraph) -> dict[str, tuple[int, int]]:
    """{node: (rank, index in rank)} by longest path from the inputs (cycles made by collapsing
    are condensed first)."""
    cond = nx.condensation(graph)
    rank_of_comp: dict[int, int] = {}
    for comp in nx.topological_sort(cond):
        preds = list(cond.predecessors(comp))
        rank_of_comp[comp] = 1 + max(rank_of_comp[p] for p in preds) if preds else 0
    by_rank: dict[int, list[str]] = defaultdict(list)
    for comp, rank in rank_of_comp.items():
        by_rank[rank].extend(sorted(cond.nodes[comp]["members"]))
    return {n: (rank, i) for rank, names in by_rank.items() for i, n in enumerate(names)}


def draw_graph(gm: fx.GraphModule, collapse_depth: int | None = None, svg_id: str = "graph") -> str:
    """SVG text of `gm`'s graph, top to bottom, boxes filled with their scheme's colour (grey:
    kept float, white: no decision). collapse_depth=k draws each module scope cut to k dotted
    parts (e.g. 3: 'model.layers.7') as one box labelled with its node count and schemes; None
    draws every node. Each box's <title> lists what it holds."""
    graph = collapsed_graph(gm, collapse_depth)
    pos = _layers(graph)
    ranks = max((r for r, _ in pos.values()), default=0) + 1
    width_n = max((i for _, i in pos.values()), default=0) + 1
    width, height = width_n * (BOX_W + GAP_X) + GAP_X, ranks * (BOX_H + GAP_Y) + GAP_Y

    def xy(n: str) -> tuple[float, float]:
        r, i = pos[n]
        return GAP_X + i * (BOX_W + GAP_X), GAP_Y + r * (BOX_H + GAP_Y)

    out = [f'<svg id="{escape(svg_id)}" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="10">']
    for a, b in graph.edges:
        (xa, ya), (xb, yb) = xy(a), xy(b)
        out.append(f'<line x1="{xa + BOX_W / 2:.0f}" y1="{ya + BOX_H:.0f}" x2="{xb + BOX_W / 2:.0f}" '
                   f'y2="{yb:.0f}" stroke="#999" stroke-width="1"/>')
    for n, data in graph.nodes(data=True):
        x, y = xy(n)
        fill = scheme_color(data["scheme"]) if data["scheme"] is not None else "#ffffff"
        text_color = "#000" if data["scheme"] in (None, "float") else "#fff"
        label = data["label"] if len(data["label"]) <= 30 else "..." + data["label"][-27:]
        detail = (data["op"] or "") if data["members"] == 1 else f"{data['members']} nodes"
        if data["schemes"]:
            detail += " | " + ", ".join(f"{c} {s}" for s, c in data["schemes"].most_common(2))
        tip = f"{data['label']}: {data['members']} nodes; " + (
            ", ".join(f"{s}: {c}" for s, c in data["schemes"].items()) or "no scheme decided")
        out.append(f'<g class="node" data-scheme="{escape(str(data["scheme"]))}"><title>{escape(tip)}</title>'
                   f'<rect x="{x}" y="{y}" width="{BOX_W}" height="{BOX_H}" rx="4" fill="{fill}" stroke="#555"/>'
                   f'<text x="{x + 5}" y="{y + 14}" fill="{text_color}">{escape(label)}</text>'
                   f'<text x="{x + 5}" y="{y + 27}" fill="{text_color}">{escape(detail[:38])}</text></g>')
    out.append("</svg>")
    return "".join(out)


def depth_for(gm: fx.GraphModule, max_boxes: int = 120) -> int:
    """The deepest scope depth (1..8) whose collapsed drawing has at most max_boxes boxes."""
    best = 1
    for depth in range(1, 9):
        if len(set(scope_groups(gm, depth).values())) <= max_boxes:
            best = depth
    return best
