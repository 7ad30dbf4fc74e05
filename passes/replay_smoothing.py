"""Pass: fold smoothing scales chosen on another graph of the same model, without calibration data.

fxquant.quantizing_backend quantizes the graphs Dynamo hands over during calibration; a graph it
hands over later (an input of a new shape) reuses the layers calibrated then, by name. Where
SmoothQuant smoothed those layers, their weights hold W * s, so the new graph must divide their
input by the same s: this pass finds the new graph's smoothing groups as SmoothQuant does and folds,
into each, the s its layers were smoothed with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from fxquant.errors import ConfigError
from fxquant.ir import fxq_meta, module_of

from .smooth_quant import SmoothQuant


def smoothing_of(gm: fx.GraphModule) -> dict[str, tuple[str, torch.Tensor]]:
    """{layer name: (fold kind, s [k] float32)} of every layer SmoothQuant smoothed in `gm`."""
    return {str(n.target): (meta["smooth"], meta["smooth_scale"]) for n in gm.graph.nodes
            if n.op == "call_module" and "smooth_scale" in (meta := fxq_meta(n))}


@dataclass
class ReplaySmoothing:
    """Pass: smooth the groups whose layers `scales` names ({layer: (fold kind, s [k])}, e.g.
    smoothing_of a graph SmoothQuant ran on) with those s; groups of other layers stay as they are.

    Raises ConfigError where the replay would not give the smoothed layers X / s: a group whose
    layers were smoothed with different s, by another fold, or only in part, and a smoothed layer
    of this graph that no group here can smooth."""

    scales: dict[str, tuple[str, torch.Tensor]]

    def __call__(self, gm: fx.GraphModule) -> fx.GraphModule:
        smooth = SmoothQuant(calib_data=None)
        replayed = set()
        for g in smooth.find_groups(gm):
            names = [str(n.target) for n in g.members]
            known = [self.scales[name] for name in names if name in self.scales]
            if not known:
                continue
            kind, s = known[0]
            if len(known) != len(names) or any(k != kind or not torch.equal(t, s) for k, t in known):
                raise ConfigError(f"layers {names} read one input here but were not smoothed together "
                                  f"(smoothed: {[n for n in names if n in self.scales]}); their smoothing "
                                  "cannot be replayed on this graph")
            if g.kind != kind:
                raise ConfigError(f"layers {names} were smoothed with a {kind} fold; here their input "
                                  f"allows a {g.kind} fold only")
            smooth.fold(gm, g, s.to(module_of(gm, g.members[0]).weight.dtype))
            replayed.update(names)
        missing = sorted(str(n.target) for n in gm.graph.nodes
                         if n.op == "call_module" and str(n.target) in self.scales and str(n.target) not in replayed)
        if missing:
            raise ConfigError(f"layers {missing[:3]} were smoothed, but in this graph their input has no fold "
                              "for the smoothing scale (it also feeds other ops, or its producer is not a "
                              "norm, a gated product or attention)")
        gm.recompile()
        return gm
