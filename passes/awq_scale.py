"""m3: AWQ-style activation-aware scaling, chosen per group of layers by its own output error."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx

from fxquant.gram import error_through_gram, gram
from fxquant.ir import fxq_meta
from fxquant.quant_proxy import fake_quant_act, fake_quant_weight
from fxquant.quantizer import QuantSpec, StaticQuantizer
from fxquant.schemes import SCHEME_NAMES, SchemeOptions, make_scheme

from .flex_smooth import ACTIVATION_MODES
from .smooth_quant import ChannelStats, SmoothGroup, SmoothQuant

log = logging.getLogger(__name__)


def group_weight_quantizer(spec: QuantSpec) -> Callable[[torch.Tensor], torch.Tensor]:
    """w [n, k] -> w fake-quantized by round to nearest on its own range under `spec`, the
    per-group (w4a16) weight spec the layer will get."""
    def fake_quant(w: torch.Tensor) -> torch.Tensor:
        q = StaticQuantizer(spec.with_(clip_search=False))
        q.observe(w)
        q.calc_qparams(like=w)
        q.enabled = True
        return q(w)
    return fake_quant


def output_error(x: torch.Tensor, weights: list[torch.Tensor], mode: str, st: ChannelStats,
                 quant_weight: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], float]:
    """s [k] -> sum_i ||Q(X / s) Q(W_i s)^T - X W_i^T||^2 over the rows X [m, k] float32, for the
    float32 weights W_i [n_i, k] of a group (Q of X: `mode` on the range of st).

    Where X is not quantized (mode "none": weight-only schemes) and k < m / 2, the same value as
    sum_i tr(D_i H D_i^T), D_i = Q(W_i s) / s - W_i, with H = X^T X: n k^2 multiply-adds per weight
    instead of n k m. H is summed in float64 (massive activations) and the quadratic form taken in
    float32, the precision the forward's error has."""
    k, m = x.shape[1], x.shape[0]
    if mode == "none" and 2 * k < m:
        h = gram(x.t(), torch.float64).float()

        def through_gram(s: torch.Tensor) -> float:
            return sum(error_through_gram(quant_weight(w * s) / s - w, h) for w in weights)
        return through_gram
    refs = [F.linear(x, w) for w in weights]

    def by_forward(s: torch.Tensor) -> float:
        xq = fake_quant_act(x / s, mode, (st.lo / s).min(), (st.hi / s).max())
        return sum(float(((F.linear(xq, quant_weight(w * s)) - r) ** 2).sum()) for w, r in zip(weights, refs))
    return by_forward


@dataclass
class AWQScale(SmoothQuant):
    """Pass (m3): per group, s = mean|X|^alpha (normalised to geometric mean 1), alpha in `grid`
    chosen to minimise the group's simulated output error sum_i ||Q(X/s) Q(W_i s)^T - X W_i^T||^2
    on up to `max_rows` sampled input rows. Q of the weights is per-channel int8, or for
    per-group schemes (w4a16: AWQ proper) the scheme's own grid under `options` (None: the
    SchemeOptions fxquant.quantize recorded in gm.meta["fxquant_scheme_options"]). `chosen` records
    {group name: alpha}. The statistics run layer-major: each group is searched as soon as its
    rows are complete and its rows are dropped, so one group's rows are held at a time (on SmolLM2,
    about 12 MB instead of 800 MB for all 120 groups)."""

    grid: Sequence[float] = tuple(i / 10 for i in range(11))
    max_rows: int = 2048
    options: SchemeOptions | None = None
    chosen: dict[str, float] = field(default_factory=dict, init=False)
    _searched: dict[str, torch.Tensor] = field(default_factory=dict, init=False, repr=False)

    def _weight_fake_quant(self, scheme: str | None, options: SchemeOptions | None) -> Callable[[torch.Tensor], torch.Tensor]:
        spec = make_scheme(scheme, options).weight if scheme in SCHEME_NAMES else None
        if spec is not None and spec.granularity == "group":
            return group_weight_quantizer(spec)
        return fake_quant_weight

    def rows_wanted(self, groups: list[SmoothGroup]) -> tuple[list[str], int]:
        """The rows of each group's input (its members share it), max_rows of them."""
        return [g.members[0].target for g in groups], self.max_rows

    def group_ready(self, gm: fx.GraphModule, group: SmoothGroup, stats: dict[str, ChannelStats]) -> None:
        """Search the group's alpha as soon as its rows are complete, then drop them."""
        self._searched[group.name] = self._search(gm, group, stats)
        stats[group.members[0].target].rows = None

    def choose_scales(self, gm: fx.GraphModule, groups: list[SmoothGroup],
                      stats: dict[str, ChannelStats]) -> dict[str, torch.Tensor]:
        out = {}
        for g in groups:
            searched = self._searched.pop(g.name, None)
            out[g.name] = searched if searched is not None else self._search(gm, g, stats)
        log.info("AWQ scaling: alpha per group %s", self.chosen)
        return out

    @torch.no_grad()
    def _search(self, gm: fx.GraphModule, g: SmoothGroup, stats: dict[str, ChannelStats]) -> torch.Tensor:
        """s [k] of the grid's alpha with the lowest output error on the group's rows; records the
        alpha in `chosen`."""
        options = self.options or gm.meta.get("fxquant_scheme_options")
        x = stats[g.members[0].target].rows
        st = g.stats(stats)
        scheme = fxq_meta(g.members[0]).get("scheme")
        mode = ACTIVATION_MODES.get(scheme, "none")
        error = output_error(x, [w.detach().float() for w in g.weights(gm)], mode, st,
                             self._weight_fake_quant(scheme, options))
        mean = x.abs().mean(dim=0).clamp(min=1e-5)
        best, best_err = None, float("inf")
        for a in self.grid:
            s = g.tie(mean.pow(a))
            s = s / (s.max() * s.min()).sqrt()
            err = error(s)
            if err < best_err:
                best, best_err = (a, s), err
        self.chosen[g.name] = best[0]
        return best[1]
