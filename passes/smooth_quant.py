"""SmoothQuant-style outlier suppression, folded into the graph where it can be.

For a group of Linear layers reading the same activation X [..., k], per input channel j:
    s_j = max|X_j|^alpha / max_i max|W_i[:, j]|^beta        (beta = 1 - alpha by default)
X is divided by s and every W_i multiplied by s (column j), which leaves the float model unchanged
while moving activation outliers into the weights. 1/s is folded into what produces X:

- a norm's weight (RMSNorm as `mul(weight, x)`, LayerNorm's weight and bias),
- the rows of a Linear whose output reaches X through an elementwise product
  (`mul(silu(gate), up)` -> scale up_proj's rows, then down_proj's columns),

and only when X feeds nothing but the group. Where no fold exists the group is skipped, or, with
`runtime_scale=True`, a ChannelScale module divides X at run time. Weights are replaced, never
modified in place, so the user's model is untouched.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from fxquant.calib_data import normalise_calib_data
from fxquant.ir import fxq_meta, get_attr_path, module_of

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


@torch.no_grad()
def input_absmax(gm: fx.GraphModule, calib_data: Any, targets: Sequence[str]) -> dict[str, torch.Tensor]:
    """{linear name: max |x| per input channel (float32 [k])} over every calibration sample."""
    stats: dict[str, torch.Tensor] = {}
    handles = []
    for name in targets:
        def hook(mod, args, name=name):
            a = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(dim=0).float()
            stats[name] = a if name not in stats else torch.maximum(stats[name], a)
        handles.append(gm.get_submodule(name).register_forward_pre_hook(hook))
    try:
        for args, kwargs in normalise_calib_data(calib_data):
            gm(*args, **kwargs)  # the captured graph keeps the model's signature
    finally:
        for h in handles:
            h.remove()
    return stats


def smoothing_scale(act: torch.Tensor, weights: Sequence[torch.Tensor], alpha: float,
                    beta: float | None = None) -> torch.Tensor:
    """s [k] = act^alpha / wmax^beta with wmax the per-column max |W| over the group (beta = 1 - alpha)."""
    beta = 1.0 - alpha if beta is None else beta
    wmax = torch.stack([w.detach().abs().amax(dim=0).float() for w in weights]).amax(dim=0)
    s = act.clamp(min=1e-5).pow(alpha) / wmax.clamp(min=1e-5).pow(beta)
    return s.clamp(min=1e-5)


@dataclass
class SmoothQuant:
    """Pass: smooth every foldable group of Linear layers (see module docstring).

    Runs after ResolveSchemes: layers resolved float (and `skip`) are left alone.
    calib_data: samples to measure activations on. alpha / beta: exponents (or a callable
    `scale_fn(name_of_first_linear, act, weights) -> s` for searched variants). Records
    node.meta["fxquant"]["smooth"] = fold kind for each smoothed layer.
    """

    calib_data: Any
    alpha: float = 0.9
    beta: float | None = None
    runtime_scale: bool = False
    skip: Sequence[str] = ()
    scale_fn: Any = None
    folded: dict[str, str] = field(default_factory=dict, init=False)

    def __call__(self, gm: fx.GraphModule) -> fx.GraphModule:
        linears = [n for n in gm.graph.nodes if isinstance(module_of(gm, n), torch.nn.Linear)
                   and n.target not in self.skip and fxq_meta(n).get("scheme") != "float"]
        stats = input_absmax(gm, self.calib_data, [n.target for n in linears])
        groups: dict[fx.Node, list[fx.Node]] = {}
        for n in linears:
            if n.target in stats and isinstance(n.args[0], fx.Node):
                groups.setdefault(n.args[0], []).append(n)
        self.folded = {}
        for x, members in groups.items():
            if set(x.users) != set(members):
                continue  # X also feeds something that must not see scaled values
            mods = [module_of(gm, n) for n in members]
            act = torch.stack([stats[n.target] for n in members]).amax(dim=0)
            if self.scale_fn is not None:
                s = self.scale_fn(members[0].target, act, [m.weight for m in mods])
            else:
                s = smoothing_scale(act, [m.weight for m in mods], self.alpha, self.beta)
            kind = self._fold(gm, x, s, members)
            if kind is None:
                continue
            for n, m in zip(members, mods):
                replace_submodule(gm, n.target, _scaled_linear(m, cols=s))
                fxq_meta(n)["smooth"] = kind
                self.folded[n.target] = kind
        log.info("smoothed %d linear layers", len(self.folded))
        return gm

    def _fold(self, gm: fx.GraphModule, x: fx.Node, s: torch.Tensor, members: list[fx.Node]) -> str | None:
        """Divide X by s inside its producer; the fold kind, or None if none applies."""
        k = s.numel()
        if x.op == "call_function" and x.target in (aten.mul.Tensor, torch.mul, operator.mul):
            for i, a in enumerate(x.args):
                other = x.args[1 - i] if len(x.args) == 2 else None
                if isinstance(a, fx.Node) and a.op == "get_attr":
                    t = get_attr_path(gm, a.target)
                    if isinstance(t, torch.Tensor) and t.dim() == 1 and t.numel() == k:
                        _set_param(gm, a.target, t.detach() / s.to(t.dtype))
                        return "norm"
                if isinstance(a, fx.Node) and isinstance(module_of(gm, a), torch.nn.Linear) \
                        and len(a.users) == 1 and isinstance(other, fx.Node):
                    lin = module_of(gm, a)
                    if lin.out_features == k:
                        replace_submodule(gm, a.target, _scaled_linear(lin, rows=1.0 / s))
                        return "linear"
        if x.op == "call_function" and x.target in (aten.layer_norm.default, torch.nn.functional.layer_norm):
            w, b = (list(x.args) + [None, None, None])[2:4]
            if isinstance(w, fx.Node) and w.op == "get_attr":
                _set_param(gm, w.target, get_attr_path(gm, w.target).detach() / s)
                if isinstance(b, fx.Node) and b.op == "get_attr":
                    _set_param(gm, b.target, get_attr_path(gm, b.target).detach() / s)
                return "norm"
        ln = module_of(gm, x)
        if isinstance(ln, torch.nn.LayerNorm) and ln.elementwise_affine:
            new = torch.nn.LayerNorm(ln.normalized_shape, ln.eps, dtype=ln.weight.dtype)
            new.weight = torch.nn.Parameter(ln.weight.detach() / s)
            new.bias = torch.nn.Parameter(ln.bias.detach() / s) if ln.bias is not None else None
            replace_submodule(gm, x.target, new)
            return "norm"
        if not self.runtime_scale:
            return None
        name = f"{members[0].target}_smooth"
        gm.add_submodule(name, ChannelScale(1.0 / s))
        with gm.graph.inserting_after(x):
            scaled = gm.graph.call_module(name, (x,))
        for n in members:
            n.replace_input_with(x, scaled)
        return "runtime"


def _scaled_linear(lin: torch.nn.Linear, cols: torch.Tensor | None = None,
                   rows: torch.Tensor | None = None) -> torch.nn.Linear:
    """A new Linear with W[:, j] * cols[j] and/or W[i, :] * rows[i] (bias * rows)."""
    new = torch.nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None,
                          dtype=lin.weight.dtype, device=lin.weight.device)
    w = lin.weight.detach().clone()
    b = lin.bias.detach().clone() if lin.bias is not None else None
    if cols is not None:
        w = w * cols.to(w.dtype)[None, :]
    if rows is not None:
        w = w * rows.to(w.dtype)[:, None]
        b = b * rows.to(b.dtype) if b is not None else None
    new.weight = torch.nn.Parameter(w, requires_grad=lin.weight.requires_grad)
    if b is not None:
        new.bias = torch.nn.Parameter(b, requires_grad=lin.bias.requires_grad)
    return new


def _set_param(gm: fx.GraphModule, target: str, value: torch.Tensor) -> None:
    parent_name, _, leaf = target.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    if leaf in parent._parameters:
        parent._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
    else:
        setattr(parent, leaf, value)
