"""SmoothQuant-style outlier suppression, folded into the graph where it can be.

For a group of Linear layers reading the same activation X [..., k], per input channel j:
    s_j = max|X_j|^alpha / max_i max|W_i[:, j]|^beta        (beta = 1 - alpha by default)
X is divided by s and every W_i multiplied by s (column j), which leaves the float model unchanged
while moving activation outliers into the weights. 1/s is folded into what produces X:

- a norm's weight (RMSNorm as `mul(weight, x)`, LayerNorm's weight and bias),
- the rows of a Linear whose output reaches X through an elementwise product
  (`mul(silu(gate), up)` -> scale up_proj's rows, then down_proj's columns),
- the rows of the attention's value projection when X is the attention output (v_proj -> o_proj):
  attention is linear in V per channel, so head h's channel d of X is V's channel d of kv head
  h // (heads / kv_heads); s is tied across the heads that share a kv head,

and only when X feeds nothing but the group. Where no fold exists the group is skipped, or, with
`runtime_scale=True`, a ChannelScale module divides X at run time. Folded tensors are replaced
by new ones, so the user's model is untouched, unless the graph's meta has
"fxquant_consumes_model" (fxquant.quantize(..., consume_model=True or inplace=True): the model is
handed over); then the folds change the model's own tensors in place (tied tensors are still
copied), which saves a float copy of every smoothed layer. After folding, the pass checks on the
first calibration sample that the float outputs did not change.
"""

from __future__ import annotations

import logging
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from fxquant.calib_data import normalise_calib_data
from fxquant.errors import ConfigError, FxquantError
from fxquant.graph_patterns import attention_values
from fxquant.ir import fxq_meta, get_attr_path, linear_from, module_of, mutable_storages, set_tensor
from fxquant.layer_major import run_layer_major
from fxquant.layer_metrics import TensorStats, output_change, output_sample, precision_tolerance
from fxquant.partial_forward import forward_until
from fxquant.resources import release_freed_memory

from .pass_manager import replace_submodule

log = logging.getLogger(__name__)
aten = torch.ops.aten

class ChannelScale(torch.nn.Module):
    """x [..., k] * inv_scale [k]: a smoothing scale that could not be folded."""

    def __init__(self, inv_scale: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("inv_scale", inv_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.inv_scale.to(x.dtype)


@dataclass
class ChannelStats:
    """Per input channel of one activation X [..., k], over every calibration sample (float32 [k]);
    `whole` holds the statistics of all of X's elements (for the outlier ratio max|x| / std);
    `rows`, where input_stats was asked for them, rows of X [m, k] float32 strided evenly over
    every sample."""

    lo: torch.Tensor
    hi: torch.Tensor
    whole: TensorStats = field(default_factory=TensorStats)
    rows: torch.Tensor | None = None

    @property
    def absmax(self) -> torch.Tensor:
        return torch.maximum(self.lo.abs(), self.hi.abs())

    def merge(self, other: ChannelStats) -> ChannelStats:
        return ChannelStats(torch.minimum(self.lo, other.lo), torch.maximum(self.hi, other.hi),
                            self.whole.merge(other.whole), self.rows if self.rows is not None else other.rows)


@torch.no_grad()
def input_stats(gm: fx.GraphModule, calib_data: Any, targets: Sequence[str], rows_of: Sequence[str] = (),
                max_rows: int = 0, when_complete: Callable[[str, dict[str, ChannelStats]], None] | None = None,
                ) -> dict[str, ChannelStats]:
    """{linear name: per-channel min / max of its input} over every calibration sample, in one
    forward pass of each sample; for the names in `rows_of` also up to max_rows rows of the input
    (ChannelStats.rows), max_rows / samples from each sample, strided evenly over its rows.

    when_complete(name, stats): called once the layer `name` has seen every sample, with the dict
    being filled (stats[name] complete; it is the dict returned). With it the graph runs layer-major
    (fxquant.layer_major): each layer is complete before the next one runs, so the caller can use
    and drop a layer's rows before the next layer's are taken, instead of holding every layer's.

    The per-channel and row buffers are allocated before the first sample (layer-major: a layer's
    rows at its first call) and updated in place: a small tensor allocated between a forward's
    large temporaries would pin the heap pages around it (about 400 MB of resident memory on
    SmolLM2).
    """
    batches = normalise_calib_data(calib_data)
    n_samples = len(batches)
    per_sample = max(1, max_rows // n_samples)
    stats: dict[str, ChannelStats] = {}
    filled = dict.fromkeys(rows_of, 0)

    def row_buffer(name: str) -> torch.Tensor:
        return torch.empty(per_sample * n_samples, gm.get_submodule(name).in_features)

    for name in targets:
        k = gm.get_submodule(name).in_features
        rows = row_buffer(name) if name in rows_of and when_complete is None else None  # layer-major: at first use
        stats[name] = ChannelStats(torch.full((k,), math.inf), torch.full((k,), -math.inf), rows=rows)
    handles = []
    for name in targets:
        def hook(mod, args, name=name, st=stats[name]):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            torch.minimum(st.lo, x.amin(dim=0).float(), out=st.lo)
            torch.maximum(st.hi, x.amax(dim=0).float(), out=st.hi)
            st.whole.add(x)
            if st.rows is None and name in filled:
                st.rows = row_buffer(name)
            if st.rows is not None:
                start = filled[name]
                n = min(per_sample, len(st.rows) - start)  # a layer called twice per sample fills up
                picked = x[:: max(1, x.shape[0] // per_sample)][:n]
                st.rows[start:start + picked.shape[0]].copy_(picked)
                filled[name] = start + picked.shape[0]
        handles.append(gm.get_submodule(name).register_forward_pre_hook(hook))

    def finish(name: str) -> None:
        if name in filled:
            stats[name].rows = stats[name].rows[:filled.pop(name)]

    try:
        if when_complete is None:
            with forward_until(gm, targets) as run:
                for args, kwargs in batches:
                    run(*args, **kwargs)  # the captured graph keeps the model's signature
                    release_freed_memory()
        else:
            last_call = {n.target: n for n in gm.graph.nodes if n.op == "call_module" and n.target in stats}
            completes = {node: name for name, node in last_call.items()}  # its layer's last call

            def after_node(node: fx.Node) -> None:
                if node in completes:
                    finish(completes[node])
                    when_complete(completes[node], stats)
            run_layer_major(gm, batches, targets, after_node)
    finally:
        for h in handles:
            h.remove()
    for name in list(filled):
        finish(name)
    return {name: st for name, st in stats.items() if st.whole.count}  # layers the samples reached


def weight_absmax(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """max |W[:, j]| over the rows of every weight [n_i, k] of a group: float32 [k]."""
    return torch.stack([w.detach().abs().amax(dim=0).float() for w in weights]).amax(dim=0)


def smoothing_scale(act: torch.Tensor, weights: Sequence[torch.Tensor], alpha: float,
                    beta: float | None = None) -> torch.Tensor:
    """s [k] = act^alpha / wmax^beta with wmax the per-column max |W| over the group (beta = 1 - alpha)."""
    beta = 1.0 - alpha if beta is None else beta
    s = act.clamp(min=1e-5).pow(alpha) / weight_absmax(weights).clamp(min=1e-5).pow(beta)
    return s.clamp(min=1e-5)


@dataclass
class SmoothGroup:
    """Linear layers reading one activation X, and how 1/s can be folded into X's producer.

    tie(s) makes s equal where the fold needs it (heads sharing a kv head); apply(s) folds 1/s.
    """

    x: fx.Node
    members: list[fx.Node]
    kind: str
    apply: Callable[[torch.Tensor], None]
    tie: Callable[[torch.Tensor], torch.Tensor] = lambda s: s

    @property
    def name(self) -> str:
        return str(self.members[0].target)

    @property
    def role(self) -> str:
        """Fold kind and member leaf names ("norm:k_proj+q_proj+v_proj"): groups of one role across
        the layers of a model share searched exponents."""
        leaves = sorted(str(n.target).rsplit(".", 1)[-1] for n in self.members)
        return f"{self.kind}:{'+'.join(leaves)}"

    def stats(self, per_layer: dict[str, ChannelStats]) -> ChannelStats:
        """X's channel statistics (the members read the same X)."""
        out = per_layer[self.members[0].target]
        for n in self.members[1:]:
            out = out.merge(per_layer[n.target])
        return out

    def weights(self, gm: fx.GraphModule) -> list[torch.Tensor]:
        """The members' current weights [n_i, k]."""
        return [module_of(gm, n).weight for n in self.members]


@dataclass
class SmoothQuant:
    """Pass: smooth every foldable group of Linear layers (see module docstring).

    Runs after ResolveSchemes: layers resolved float (and `skip`) are left alone.
    calib_data: samples to measure activations on. alpha / beta: the exponents. Subclasses choose
    scales differently by overriding `choose_scales` (IterSmooth, FlexSmooth, AWQScale). Records in
    node.meta["fxquant"] of each smoothed layer: "smooth" (fold kind), "smooth_scale" (s [k]) and
    "input_stats_before_smoothing" (TensorStats.as_dict of X); `folded` maps layer -> kind,
    `scales` group name -> the s [k] folded.
    """

    calib_data: Any
    alpha: float = 0.9
    beta: float | None = None
    runtime_scale: bool = False
    skip: Sequence[str] = ()
    check_tolerance: float = 1e-3
    folded: dict[str, str] = field(default_factory=dict, init=False)
    scales: dict[str, torch.Tensor] = field(default_factory=dict, init=False, repr=False)
    _mutable: set[int] = field(default_factory=set, init=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("alpha", "beta"):
            v = getattr(self, name)
            if v is not None and not 0.0 <= float(v) <= 1.0:
                raise ConfigError(f"{type(self).__name__}: {name}={v} must be in [0, 1]")

    def choose_scales(self, gm: fx.GraphModule, groups: list[SmoothGroup],
                      stats: dict[str, ChannelStats]) -> dict[str, torch.Tensor]:
        """{group name: s [k]} (before tying); here s = A^alpha / W^beta with the fixed exponents."""
        return {g.name: smoothing_scale(g.stats(stats).absmax, g.weights(gm), self.alpha, self.beta)
                for g in groups}

    def rows_wanted(self, groups: list[SmoothGroup]) -> tuple[list[str], int]:
        """(layers whose sampled input rows the scale search reads, at most how many rows each)."""
        return [], 0

    def group_ready(self, gm: fx.GraphModule, group: SmoothGroup, stats: dict[str, ChannelStats]) -> None:
        """Where rows_wanted asks for rows: called as soon as every member of `group` has seen every
        calibration sample (their `stats` complete, later groups' not yet), before the next layer
        runs. A subclass that searches on the rows chooses the group's scale here and drops them,
        so that one group's rows are held at a time. Default: nothing."""

    def __call__(self, gm: fx.GraphModule) -> fx.GraphModule:
        self._mutable = mutable_storages(gm) if gm.meta.get("fxquant_consumes_model") else set()
        groups = self.find_groups(gm)
        rows_of, max_rows = self.rows_wanted(groups)
        stats = input_stats(gm, self.calib_data, [n.target for g in groups for n in g.members], rows_of, max_rows,
                            self._on_group_complete(gm, groups) if rows_of else None)
        chosen = self.choose_scales(gm, groups, stats)  # leaves the weights as they are
        first = normalise_calib_data(self.calib_data)[0]
        with torch.no_grad():
            before = output_sample(gm(*first[0], **first[1]))
        self.folded, self.scales = {}, {}
        for g in groups:
            s = g.tie(chosen[g.name])
            self.fold(gm, g, s)
            before = g.stats(stats).whole.as_dict()  # X's statistics: one for the group's members
            for n in g.members:
                fxq_meta(n)["input_stats_before_smoothing"] = before
        gm.recompile()
        with torch.no_grad():
            after = output_sample(gm(*first[0], **first[1]))
        self._check_unchanged(before, after)
        log.info("smoothed %d linear layers", len(self.folded))
        return gm

    def _on_group_complete(self, gm: fx.GraphModule,
                           groups: list[SmoothGroup]) -> Callable[[str, dict[str, ChannelStats]], None]:
        """input_stats' when_complete: calls group_ready once the last member of a group is complete."""
        pending = {g.name: {n.target for n in g.members} for g in groups}
        group_of = {n.target: g for g in groups for n in g.members}

        def complete(name: str, stats: dict[str, ChannelStats]) -> None:
            g = group_of[name]
            pending[g.name].discard(name)
            if not pending[g.name]:
                self.group_ready(gm, g, stats)
        return complete

    def fold(self, gm: fx.GraphModule, g: SmoothGroup, s: torch.Tensor) -> None:
        """Divide X by s [k] in its producer and multiply the members' weight columns by s; records
        the fold in node.meta["fxquant"] ("smooth", "smooth_scale"), `folded` and `scales`."""
        self.scales[g.name] = s
        g.apply(s)
        for n in g.members:
            replace_submodule(gm, n.target, _scaled_linear(module_of(gm, n), self._mutable, cols=s))
            meta = fxq_meta(n)
            meta["smooth"] = g.kind
            meta["smooth_scale"] = s.detach().float().cpu()  # the layer's input is now X / s
            self.folded[n.target] = g.kind

    def find_groups(self, gm: fx.GraphModule) -> list[SmoothGroup]:
        """Every group of quantized Linear layers sharing an input whose 1/s can be folded."""
        linears = [n for n in gm.graph.nodes if isinstance(module_of(gm, n), torch.nn.Linear)
                   and n.target not in self.skip and fxq_meta(n).get("scheme") != "float"]
        by_input: dict[fx.Node, list[fx.Node]] = {}
        for n in linears:
            if isinstance(n.args[0], fx.Node):
                by_input.setdefault(n.args[0], []).append(n)
        groups = []
        for x, members in by_input.items():
            if set(x.users) != set(members):
                continue  # X also feeds something that must not see scaled values
            k = module_of(gm, members[0]).in_features
            group = (self._norm_fold(gm, x, members, k) or self._product_fold(gm, x, members, k)
                     or self._attention_fold(gm, x, members, k) or self._runtime_fold(gm, x, members))
            if group is not None:
                groups.append(group)
        return groups

    def _norm_fold(self, gm: fx.GraphModule, x: fx.Node, members: list[fx.Node], k: int) -> SmoothGroup | None:
        """X = weight * normalised(h) (RMSNorm) or layer_norm(h, w, b): divide the norm's affine."""
        if x.op == "call_function" and x.target in (aten.mul.Tensor, torch.mul, operator.mul):
            for a in x.args:
                if isinstance(a, fx.Node) and a.op == "get_attr":
                    t = get_attr_path(gm, a.target)
                    if isinstance(t, torch.Tensor) and t.dim() == 1 and t.numel() == k:
                        return SmoothGroup(x, members, "norm", lambda s, a=a: _divide_attr(gm, a.target, s, self._mutable))
        if x.op == "call_function" and x.target in (aten.layer_norm.default, torch.nn.functional.layer_norm):
            w, b = (list(x.args) + [None, None, None])[2:4]
            if isinstance(w, fx.Node) and w.op == "get_attr":
                def apply(s: torch.Tensor) -> None:
                    _divide_attr(gm, w.target, s, self._mutable)
                    if isinstance(b, fx.Node) and b.op == "get_attr":
                        _divide_attr(gm, b.target, s, self._mutable)
                return SmoothGroup(x, members, "norm", apply)
        ln = module_of(gm, x)
        if isinstance(ln, torch.nn.LayerNorm) and ln.elementwise_affine:
            def apply_module(s: torch.Tensor) -> None:
                new = torch.nn.LayerNorm(ln.normalized_shape, ln.eps, dtype=ln.weight.dtype)
                new.weight = torch.nn.Parameter(_divided(ln.weight, s, self._mutable), requires_grad=False)
                new.bias = (torch.nn.Parameter(_divided(ln.bias, s, self._mutable), requires_grad=False)
                            if ln.bias is not None else None)
                replace_submodule(gm, x.target, new)
            return SmoothGroup(x, members, "norm", apply_module)
        return None

    def _product_fold(self, gm: fx.GraphModule, x: fx.Node, members: list[fx.Node],
                      k: int) -> SmoothGroup | None:
        """X = f(a) * linear(h) (gated MLP): scale that linear's rows."""
        if not (x.op == "call_function" and x.target in (aten.mul.Tensor, torch.mul, operator.mul)
                and len(x.args) == 2 and all(isinstance(a, fx.Node) for a in x.args)):
            return None
        for a in x.args:
            lin = module_of(gm, a)
            if isinstance(lin, torch.nn.Linear) and len(a.users) == 1 and lin.out_features == k:
                return SmoothGroup(x, members, "linear", lambda s, a=a: _scale_rows(gm, a, 1.0 / s, self._mutable))
        return None

    def _attention_fold(self, gm: fx.GraphModule, x: fx.Node, members: list[fx.Node],
                        k: int) -> SmoothGroup | None:
        """X = heads of sdpa(q, k, V) with V a layout of v_proj(h): scale v_proj's rows."""
        att = attention_values(gm, x)
        if att is None or att.n_heads * att.head_dim != k:
            return None
        n_kv, rep, head_dim = att.n_kv, att.n_heads // att.n_kv, att.head_dim

        def tie(s: torch.Tensor) -> torch.Tensor:
            per_kv = s.reshape(n_kv, rep, head_dim).amax(dim=1)
            return per_kv.repeat_interleave(rep, dim=0).reshape(-1)

        def apply(s: torch.Tensor) -> None:
            _scale_rows(gm, att.value, 1.0 / s.reshape(n_kv, rep, head_dim)[:, 0, :].reshape(-1), self._mutable)
        return SmoothGroup(x, members, "attention", apply, tie)

    def _runtime_fold(self, gm: fx.GraphModule, x: fx.Node, members: list[fx.Node]) -> SmoothGroup | None:
        """No fold: a ChannelScale module divides X at run time (only with runtime_scale=True)."""
        if not self.runtime_scale:
            return None

        def apply(s: torch.Tensor) -> None:
            name = f"{members[0].target}_smooth"
            gm.add_submodule(name, ChannelScale(1.0 / s))
            with gm.graph.inserting_after(x):
                scaled = gm.graph.call_module(name, (x,))
            for n in members:
                n.replace_input_with(x, scaled)
        return SmoothGroup(x, members, "runtime", apply)

    def _check_unchanged(self, before: Any, after: Any) -> None:
        err = output_change(before, after)
        if err > precision_tolerance(before, self.check_tolerance):
            raise FxquantError(
                f"smoothing changed the float model's output (relative error {err:.2e}); a fold "
                f"is wrong for this graph: folds used {sorted(set(self.folded.values()))}; pass "
                "the offending layers in `skip`")


def _divided(t: torch.Tensor, s: torch.Tensor, mutable: set[int]) -> torch.Tensor:
    """t / s in t's dtype (s rounded to it): in place when t's storage is in `mutable`, else a new
    tensor."""
    t, s = t.detach(), s.to(t.dtype)
    with torch.no_grad():
        return t.div_(s) if t.data_ptr() in mutable else t / s


def _scale_rows(gm: fx.GraphModule, node: fx.Node, rows: torch.Tensor, mutable: set[int]) -> None:
    """Make the Linear `node` calls compute output channel i times rows[i], and record rows [n] in
    node.meta["fxquant"]["smooth_output_scale"] (the layer's output is now rows * its float output)."""
    replace_submodule(gm, node.target, _scaled_linear(module_of(gm, node), mutable, rows=rows))
    fxq_meta(node)["smooth_output_scale"] = rows.detach().float().cpu()


def _scaled_linear(lin: torch.nn.Linear, mutable: set[int], cols: torch.Tensor | None = None,
                   rows: torch.Tensor | None = None) -> torch.nn.Linear:
    """lin with W[:, j] * cols[j] and/or W[i, :] * rows[i] (bias * rows): lin itself, changed in
    place, when its weight (and bias) storages are in `mutable`; else a new Linear."""
    in_place = lin.weight.data_ptr() in mutable and (lin.bias is None or lin.bias.data_ptr() in mutable)
    w = lin.weight.detach() if in_place else lin.weight.detach().clone()
    b = None if lin.bias is None else lin.bias.detach() if in_place else lin.bias.detach().clone()
    with torch.no_grad():
        if cols is not None:
            w.mul_(cols.to(w.dtype)[None, :])
        if rows is not None:
            w.mul_(rows.to(w.dtype)[:, None])
            if b is not None:
                b.mul_(rows.to(b.dtype))
    if in_place:
        return lin
    return linear_from(w, b, requires_grad=lin.weight.requires_grad)


def _divide_attr(gm: fx.GraphModule, target: str, s: torch.Tensor, mutable: set[int]) -> None:
    """The tensor at `target` divided by s: in place when its storage is in `mutable`, else a
    new tensor installed at `target` (the old one untouched)."""
    old = get_attr_path(gm, target)
    value = _divided(old, s, mutable)
    if value.data_ptr() != old.data_ptr():
        set_tensor(gm, target, value)
