"""fxquant.compare: where quantization error enters a model and where it grows.

The float model and the quantized graph run on the same inputs. Each call_module node of the
quantized graph whose module exists by name in the float model (every quantized layer, and the
layers kept float) is compared with the float module's output at the same call:

- input error: the node's first input against the float module's input (undoing a smoothing
  scale folded into the graph: the quantized layer reads X / s),
- local error: the quantized layer run on the float model's own input (divided by s): the error
  the layer adds by itself,
- output error: the node's output against the float output: everything accumulated so far.

A folded BatchNorm's output is the reference of the layer it was folded into.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import fx
from torch.utils._pytree import tree_leaves

from fxquant.calib_data import normalise_calib_data
from fxquant.errors import ConfigError
from fxquant.ir import META_KEY, bind_inputs, module_of
from fxquant.layer_metrics import ErrorStats
from fxquant.quant_opr import QuantOpr

from .layer_table import require_graph
from .text_table import text_table

#: input errors below this (float rounding, e.g. an embedding's output) give no growth factor
MIN_INPUT_ERROR = 1e-4


@dataclass
class NodeError:
    """Errors at one node over every sample: relative errors ||q - f|| / ||f|| and SQNR in dB."""

    name: str
    op: str
    scheme: str
    input_rel_error: float | None
    local_rel_error: float | None  # the layer's own error on exact inputs (None for float layers)
    output_rel_error: float
    output_sqnr_db: float

    @property
    def growth(self) -> float | None:
        """output error / input error: > 1 where this node amplifies the error it received."""
        if self.input_rel_error is None or self.input_rel_error < MIN_INPUT_ERROR:
            return None
        return self.output_rel_error / self.input_rel_error

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "growth": self.growth}


@dataclass
class Comparison:
    """Rows in topological order, and the model output's error (`output`)."""

    rows: list[NodeError]
    output: NodeError | None = None
    samples: int = 0
    unmatched: list[str] = field(default_factory=list)  # call_module nodes with no float module

    def __iter__(self) -> Iterator[NodeError]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, name: str) -> NodeError:
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(f"no compared node {name!r}")

    def where_error_enters(self, n: int = 5) -> list[NodeError]:
        """The n quantized layers with the largest local error (the error they add themselves)."""
        rows = [r for r in self.rows if r.local_rel_error is not None]
        return sorted(rows, key=lambda r: r.local_rel_error, reverse=True)[:n]

    def where_error_grows(self, n: int = 5) -> list[NodeError]:
        """The n nodes whose output error exceeds their input error by the largest factor."""
        rows = [r for r in self.rows if r.growth is not None]
        return sorted(rows, key=lambda r: r.growth, reverse=True)[:n]

    def to_dicts(self) -> list[dict[str, Any]]:
        return [r.as_dict() for r in self.rows]

    def __str__(self) -> str:
        headers = ["node", "op", "scheme", "in err", "local err", "out err", "SQNR dB", "growth"]
        rows = [[r.name, r.op, r.scheme, r.input_rel_error, r.local_rel_error, r.output_rel_error,
                 r.output_sqnr_db, r.growth] for r in self.rows]
        out = [f"{len(self.rows)} nodes compared over {self.samples} samples", text_table(headers, rows)]
        if self.output is not None:
            out.append(f"model output: rel err {self.output.output_rel_error:.4g}, "
                       f"SQNR {self.output.output_sqnr_db:.2f} dB")
        enters = ", ".join(f"{r.name} ({r.local_rel_error:.3g})" for r in self.where_error_enters(3))
        grows = ", ".join(f"{r.name} (x{r.growth:.2f})" for r in self.where_error_grows(3))
        out.append(f"error enters most at: {enters or '-'}")
        out.append(f"error grows most at: {grows or '-'}")
        return "\n".join(out)

    __repr__ = __str__


@dataclass
class _Site:
    """Running error sums of one call_module node."""

    node: fx.Node
    ref_name: str  # float module whose output is the reference
    in_name: str  # float module whose input is the layer's input
    inputs: ErrorStats = field(default_factory=ErrorStats)
    local: ErrorStats = field(default_factory=ErrorStats)
    outputs: ErrorStats = field(default_factory=ErrorStats)
    has_input: bool = False


@torch.no_grad()
def compare(model: torch.nn.Module, qmodel: fx.GraphModule, inputs: Any) -> Comparison:
    """Run `model` (float) and `qmodel` (from fxquant.quantize, same signature) on `inputs` (calib
    data form: [[x], ...] or [{"input_ids": ...}, ...]) and return each matched node's errors."""
    require_graph(qmodel, "compare")
    float_modules = dict(model.named_modules())
    bn_of = {layer: bn for bn, layer in qmodel.meta.get("fxquant_folded_bn", {}).items()}
    sites: list[_Site] = []
    unmatched: list[str] = []
    for node in qmodel.graph.nodes:
        if node.op != "call_module":
            continue
        name = str(node.target)
        if name in float_modules:
            sites.append(_Site(node, bn_of.get(name, name), name))
        else:
            unmatched.append(name)
    if not sites:
        raise ConfigError("no node of the quantized graph has a module of the same name in the float model; "
                          "pass the model that was quantized")
    batches = normalise_calib_data(inputs)
    output = ErrorStats()
    was_training = model.training
    model.eval()
    try:
        for args, kwargs in batches:
            names = {s.in_name for s in sites} | {s.ref_name for s in sites}
            float_calls, f_out = _run_float(model, names, args, kwargs)
            q_out = _run_quantized(qmodel, sites, float_calls, args, kwargs)
            _add_output_error(output, q_out, f_out)
    finally:
        model.train(was_training)
    rows = [_node_error(qmodel, s) for s in sites]
    out_row = NodeError("output", "-", "-", None, None, output.rel_error, output.sqnr_db) if output.ref else None
    return Comparison(rows, out_row, len(batches), unmatched)


def _run_float(model: torch.nn.Module, names: set[str], args: tuple,
               kwargs: dict) -> tuple[dict[str, list[tuple]], Any]:
    """({module name: [(first input, output) per call]}, the model's output) of one float run."""
    calls: dict[str, list[tuple]] = defaultdict(list)
    handles = []
    for name, module in model.named_modules():
        if name in names:
            def hook(mod, a, out, name=name):
                first = next((x for x in a if isinstance(x, torch.Tensor)), None)
                calls[name].append((first, out))
            handles.append(module.register_forward_hook(hook))
    try:
        out = model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return calls, out


class _Recorder(fx.Interpreter):
    """Runs the quantized graph and adds each matched node's input and output errors."""

    def __init__(self, gm: fx.GraphModule, sites: list[_Site], float_calls: dict[str, list[tuple]]) -> None:
        super().__init__(gm)
        self.sites = {s.node: s for s in sites}
        self.float_calls = float_calls
        self.seen: dict[str, int] = defaultdict(int)

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        site = self.sites.get(n)
        if site is None:
            return result
        call = self.seen[site.in_name]
        self.seen[site.in_name] += 1
        refs, ins = self.float_calls.get(site.ref_name, []), self.float_calls.get(site.in_name, [])
        meta = n.meta.get(META_KEY, {})
        in_scale, out_scale = meta.get("smooth_scale"), meta.get("smooth_output_scale")
        if call < len(refs):
            site.outputs.add(_unscale_output(result, out_scale), refs[call][1])
        if call < len(ins) and ins[call][0] is not None and n.args and isinstance(n.args[0], fx.Node):
            q_in = self.env[n.args[0]]
            if isinstance(q_in, torch.Tensor):
                site.inputs.add(q_in * in_scale.to(q_in) if in_scale is not None else q_in, ins[call][0])
                site.has_input = True
            module = self.module.get_submodule(site.node.target)
            if isinstance(module, QuantOpr) and len(site.node.args) == 1 and call < len(refs):
                x = ins[call][0]
                local = module(x / in_scale.to(x) if in_scale is not None else x)
                site.local.add(_unscale_output(local, out_scale), refs[call][1])
        return result


def _unscale_output(y: Any, rows: torch.Tensor | None) -> Any:
    """A smoothed producer's output [..., n] divided by the row scale folded into it."""
    if rows is None or not isinstance(y, torch.Tensor):
        return y
    return y / rows.to(y)


def _run_quantized(qmodel: fx.GraphModule, sites: list[_Site], float_calls: dict[str, list[tuple]],
                   args: tuple, kwargs: dict) -> Any:
    env = bind_inputs(qmodel, args, kwargs)
    return _Recorder(qmodel, sites, float_calls).run(initial_env=env)


def _add_output_error(stats: ErrorStats, q_out: Any, f_out: Any) -> None:
    """Error of the first floating output leaf of the quantized graph against the float model's
    first floating leaf of the same shape (e.g. logits)."""
    q_leaf = next((t for t in tree_leaves(q_out) if isinstance(t, torch.Tensor) and t.is_floating_point()), None)
    if q_leaf is None:
        return
    f_leaves = f_out if isinstance(f_out, torch.Tensor) else (
        list(f_out.values()) if isinstance(f_out, dict) else tree_leaves(f_out))
    if isinstance(f_leaves, torch.Tensor):
        f_leaves = [f_leaves]
    ref = next((t for t in f_leaves if isinstance(t, torch.Tensor) and t.shape == q_leaf.shape), None)
    if ref is not None:
        stats.add(q_leaf, ref)


def _node_error(qmodel: fx.GraphModule, site: _Site) -> NodeError:
    module = module_of(qmodel, site.node)
    scheme = site.node.meta.get(META_KEY, {}).get("scheme", getattr(module, "scheme", "float"))
    op = type(module.__dict__.get("_float_module", module)).__name__
    local = site.local.rel_error if site.local.ref else None
    return NodeError(site.node.target, op, scheme, site.inputs.rel_error if site.has_input else None,
                     local, site.outputs.rel_error, site.outputs.sqnr_db if site.outputs.ref else math.nan)
