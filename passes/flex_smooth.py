"""m6 flex smooth: s = A^alpha / W^beta, with alpha and beta searched when not both given."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import fx

from fxquant.calib_data import normalise_calib_data
from fxquant.ir import fxq_meta
from fxquant.quant_proxy import QuantProxy

from .smooth_quant import ChannelStats, SmoothGroup, SmoothQuant, smoothing_scale

log = logging.getLogger(__name__)

#: how each scheme quantizes a Linear's input, for the search's simulation
ACTIVATION_MODES = {"w8a8": "static", "w8a8_timestep": "static", "w8a8_dynamic": "dynamic"}


@dataclass
class FlexSmooth(SmoothQuant):
    """Pass (m6): SmoothQuant with exponents alpha (activation) and beta (weight).

    Both given: s = A^alpha / W^beta for every group. Otherwise the missing ones are searched per
    group role (e.g. every layer's q/k/v group shares one pair): coordinate descent over `grid`
    for alpha (beta = 1 - alpha, or the given beta; each role steps from the middle of the grid
    towards lower error until neither neighbour is lower), then, if beta was not given, beta
    around 1 - alpha. Each candidate is scored end to end by QuantProxy on the first `score_samples`
    calibration samples. `chosen` records {role: (alpha, beta)}.
    """

    alpha: float | None = None
    beta: float | None = None
    grid: Sequence[float] = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9)
    beta_offsets: Sequence[float] = (-0.1, 0.1)
    score_samples: int = 1
    sweeps: int = 1
    chosen: dict[str, tuple[float, float]] = field(default_factory=dict, init=False)

    def choose_scales(self, gm: fx.GraphModule, groups: list[SmoothGroup],
                      stats: dict[str, ChannelStats]) -> dict[str, torch.Tensor]:
        roles = sorted({g.role for g in groups})
        if self.alpha is not None and self.beta is not None:
            self.chosen = dict.fromkeys(roles, (self.alpha, self.beta))
            return super().choose_scales(gm, groups, stats)
        group_stats = {g.name: g.stats(stats) for g in groups}
        layers = {n.target: (ACTIVATION_MODES.get(fxq_meta(n).get("scheme"), "none"), group_stats[g.name].lo,
                             group_stats[g.name].hi) for g in groups for n in g.members}
        proxy = QuantProxy(gm, layers, normalise_calib_data(self.calib_data)[: self.score_samples])
        made: dict[tuple[str, float, float], torch.Tensor] = {}  # one tensor per (group, a, b): the
        # proxy keeps a layer's quantized weight while it is given the same scale tensor

        def scales(params: dict[str, tuple[float, float]]) -> dict[str, torch.Tensor]:
            out = {}
            for g in groups:
                key = (g.name, *params[g.role])
                if key not in made:
                    made[key] = g.tie(smoothing_scale(group_stats[g.name].absmax, g.weights(gm), *params[g.role]))
                out.update({n.target: made[key] for n in g.members})
            return out

        tried: dict[tuple, float] = {}

        def score(params: dict[str, tuple[float, float]]) -> float:
            key = tuple(sorted(params.items()))
            if key not in tried:
                tried[key] = proxy.score(scales(params))
            return tried[key]

        start = 0.5 if self.alpha is None else self.alpha
        params = {r: (start, 1.0 - start if self.beta is None else self.beta) for r in roles}
        best = score(params)
        for _ in range(self.sweeps if self.alpha is None else 0):
            for role in roles:
                def with_alpha(i: int, role: str = role, params: dict = params) -> dict[str, tuple[float, float]]:
                    a = self.grid[i]
                    return {**params, role: (a, 1.0 - a if self.beta is None else self.beta)}
                cand = with_alpha(descend(lambda i: score(with_alpha(i)), len(self.grid)))
                if score(cand) < best:
                    best, params = score(cand), cand
        if self.beta is None:
            for role in roles:
                a, b0 = params[role]
                for d in self.beta_offsets:
                    if not 0.0 <= b0 + d <= 1.0:
                        continue
                    cand = {**params, role: (a, b0 + d)}
                    err = score(cand)
                    if err < best:
                        best, params = err, cand
        self.chosen = params
        log.info("flex smooth: exponents %s (proxy error %.3e, %d candidates scored)", params, best, len(tried))
        chosen = scales(params)
        return {g.name: chosen[g.members[0].target] for g in groups}


def descend(error: Callable[[int], float], n: int) -> int:
    """Index in range(n) of a local minimum of error, found by stepping from the middle towards the
    lower neighbour (about 4 evaluations for a unimodal error over 7 points, against 7)."""
    i = n // 2
    while True:
        lower = [j for j in (i - 1, i + 1) if 0 <= j < n and error(j) < error(i)]
        if not lower:
            return i
        i = min(lower, key=error)
