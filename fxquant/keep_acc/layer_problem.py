"""One layer's reconstruction problem: its sampled inputs, float targets, and forward functions."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from fxquant.calibration import OutputsOfInputs
from fxquant.fake_quant import dequantize_codes, quantize_codes
from fxquant.quant_conv import QConvNd
from fxquant.quant_linear import QLinear
from fxquant.quantizer import StaticQuantizer
from fxquant.weighted_quant_opr import WeightedQuantOpr

log = logging.getLogger(__name__)


@dataclass
class LayerProblem:
    """x: the layer's inputs (Linear: rows [m, k]; conv: images [b, c, ...]), float32, sampled from
    the calibration inputs; y: the float layer's outputs on the matching float inputs, same rows,
    given whole or as per-batch parts concatenated on first use (a solver that never reads y, such
    as GPTQ scoring through H, never builds it). y_of_x: y is the float layer's output on x itself
    (not on other, float inputs)."""

    module: WeightedQuantOpr
    x: torch.Tensor
    targets: torch.Tensor | list[torch.Tensor]
    y_of_x: bool = False

    @property
    def y(self) -> torch.Tensor:
        """The float outputs, rows matching x's."""
        if isinstance(self.targets, list):
            self.targets = torch.cat(self.targets)
        return self.targets

    @classmethod
    def gather(cls, module: WeightedQuantOpr, inputs: list[torch.Tensor], targets: list[torch.Tensor],
               max_rows: int = 4096, max_images: int = 256, seed: int = 0) -> LayerProblem:
        """Concatenate the batches and keep at most max_rows rows (Linear) or max_images images;
        y_of_x when the targets come as calibration.OutputsOfInputs."""
        if isinstance(module, QLinear):
            k, n = module.in_features, module.out_features
            x = torch.cat([t.detach().float().reshape(-1, k) for t in inputs])
            y = [t.detach().float().reshape(-1, n) for t in targets]
            limit = max_rows
        else:
            x = torch.cat([t.detach().float() for t in inputs])
            y = [t.detach().float() for t in targets]
            limit = max_images
        return cls(module, x, y, isinstance(targets, OutputsOfInputs)).sampled(limit, seed)

    @property
    def weight_quantizer(self) -> StaticQuantizer:
        return self.module.weight_quantizer

    @property
    def input_static(self) -> bool:
        """True when the layer quantizes its input with calibrated static qparams."""
        aq = self.module.active_input_quantizer()
        return isinstance(aq, StaticQuantizer) and aq.calibrated

    def quantized_input(self, scale: torch.Tensor | None = None) -> torch.Tensor:
        """x fake-quantized by the layer's static input quantizer (optionally with another scale)."""
        if not self.input_static:
            return self.x
        aq = self.module.active_input_quantizer()
        s = aq.scale if scale is None else scale
        codes = quantize_codes(self.x, s, aq.zero_point, aq.qmin, aq.qmax, aq.spec.rounding,
                               aq.spec.offset_in_rounding)
        return dequantize_codes(codes, s, aq.zero_point)

    def forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The layer's float op on x with `weight` (weight's shape) and its bias."""
        m = self.module
        if isinstance(m, QLinear):
            return F.linear(x, weight, m.bias)
        assert isinstance(m, QConvNd)
        return m._conv(x, weight, m.bias)

    def weight_scale(self) -> torch.Tensor:
        """The weight scale broadcast against the weight: [n, 1, ...] or [] (per-group: [n, k/g, 1],
        against the weight grouped as [n, k/g, g])."""
        wq = self.weight_quantizer
        return wq.scale.unsqueeze(-1) if self.grouped else wq.broadcast_qparams(self.module.weight)[0]

    @property
    def grouped(self) -> bool:
        """True for per-group weights (w4a16): qparams per run of group_size input columns."""
        return self.weight_quantizer.spec.granularity == "group"

    def _grouped(self, t: torch.Tensor) -> torch.Tensor:
        """A weight-shaped [n, k] tensor as [n, k/g, g] for per-group weights, else t."""
        return t.reshape(t.shape[0], -1, self.weight_quantizer.spec.group_size) if self.grouped else t

    def dequantized_weight(self, codes: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """(codes - zero_point) * scale, the weight's shape; codes the weight's shape."""
        wq = self.weight_quantizer
        s = self.weight_scale() if scale is None else scale
        zp = wq.zero_point.unsqueeze(-1) if self.grouped else torch.zeros(())  # non-group: symmetric
        deq = dequantize_codes(self._grouped(codes), s, zp)
        return deq.reshape(self.module.weight.shape)

    def rtn_codes(self, scale: torch.Tensor | None = None) -> torch.Tensor:
        """Round-to-nearest codes of the float weight, the weight's shape."""
        wq = self.weight_quantizer
        w = self.module.weight.detach().float()
        if self.grouped:
            return wq.quantize(w)[0].reshape(w.shape)
        s = self.weight_scale() if scale is None else scale
        return quantize_codes(w, s, torch.zeros(()), wq.qmin, wq.qmax, wq.spec.rounding)

    def error(self, out: torch.Tensor) -> float:
        """Squared error of `out` against the float targets, summed."""
        return float(((out - self.y) ** 2).sum())

    def error_with(self, codes: torch.Tensor, scale: torch.Tensor | None = None) -> float:
        """Output error with weight `codes` (weight's shape) and `scale` (weight quantizer's shape;
        None: its current scale), on the quantized inputs."""
        if scale is not None:
            scale = scale.reshape(self.weight_scale().shape)
        with torch.no_grad():
            w = self.dequantized_weight(codes.reshape(self.module.weight.shape), scale)
            return self.error(self.forward(self.quantized_input(), w))

    def current_codes(self) -> torch.Tensor:
        """The weight codes the layer has now (fixed by a keeper, else round to nearest)."""
        with torch.no_grad():
            return self.module._weight_codes() if self.module.codes_fixed else self.rtn_codes()

    def current_error(self) -> float:
        """Output error of the layer as it is now quantized (input and weight)."""
        return self.error_with(self.current_codes())

    def sampled(self, max_rows: int, seed: int = 0) -> LayerProblem:
        """The same problem on at most max_rows of its rows (Linear) or images (conv), drawn with seed."""
        if self.x.shape[0] <= max_rows:
            return self
        idx = torch.randperm(self.x.shape[0], generator=torch.Generator().manual_seed(seed))[:max_rows]
        return LayerProblem(self.module, self.x[idx], self.y[idx], self.y_of_x)

    def keep_if_better(self, keeper: str, codes: torch.Tensor, scale: torch.Tensor | None = None) -> None:
        """Fix `codes` (and `scale`) in the layer only if they lower its output error."""
        self.keep_if_lower(keeper, codes, scale, self.current_error(), self.error_with(codes, scale))

    def keep_if_lower(self, keeper: str, codes: torch.Tensor, scale: torch.Tensor | None, before: float,
                      after: float) -> None:
        """Fix `codes` (and `scale`) in the layer when their error `after` is below `before`."""
        if after < before:
            self.module.set_weight_codes(codes, scale)
        log.debug("%s: output error %.4g -> %.4g (%s)", keeper, before, after, "kept" if after < before else "dropped")


def input_columns(prob: LayerProblem, max_cols: int, seed: int,
                  with_outputs: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(X [groups, d, N], Y [groups, n/groups, N]): input columns the weight multiplies and the
    float outputs without bias, so that Y ~= W X per group with W [groups, n/groups, d]; Y is None
    (and prob.y not built) without `with_outputs`."""
    m = prob.module
    x = prob.quantized_input()
    y = prob.y if with_outputs else None
    if y is not None and m.bias is not None:
        shape = [-1] if isinstance(m, QLinear) else [1, -1] + [1] * (y.dim() - 2)
        y = y - m.bias.detach().float().reshape(shape)
    if isinstance(m, QLinear):
        cols, outs = x.t().unsqueeze(0), None if y is None else y.t().unsqueeze(0)
    else:
        if x.dim() == 3:  # conv1d as a conv2d of height 1
            x, y = x.unsqueeze(2), None if y is None else y.unsqueeze(2)
            k, s, p, d = (1, *m.kernel_size), (1, *m.stride), (0, *m.padding), (1, *m.dilation)
        else:
            k, s, p, d = m.kernel_size, m.stride, m.padding, m.dilation
        g = m.groups
        unfolded = F.unfold(x, k, dilation=d, padding=p, stride=s)  # [b, c*kh*kw, L]
        b, _, L = unfolded.shape
        cols = unfolded.reshape(b, g, -1, L).permute(1, 2, 0, 3).reshape(g, -1, b * L)
        outs = None if y is None else y.reshape(b, g, -1, L).permute(1, 2, 0, 3).reshape(g, -1, b * L)
    if cols.shape[-1] > max_cols:
        idx = torch.randperm(cols.shape[-1], generator=torch.Generator().manual_seed(seed))[:max_cols]
        cols, outs = cols[..., idx], None if outs is None else outs[..., idx]
    return cols, outs


def supports(module: torch.nn.Module, groups: bool = False) -> bool:
    """True for layers the keepers handle: Linear/Conv with static symmetric per-tensor/channel
    weights, and with `groups` (keepers that handle them, e.g. GPTQ) Linear with per-group weights
    of either symmetry."""
    if not isinstance(module, (QLinear, QConvNd)):
        return False
    wq = module.weight_quantizer
    if not (isinstance(wq, StaticQuantizer) and wq.calibrated and wq.spec.signed):
        return False
    if wq.spec.granularity == "group":
        return groups and isinstance(module, QLinear)
    return wq.spec.symmetric and wq.spec.granularity in ("tensor", "channel")


@dataclass
class CodeKeeper:
    """Base of the keepers that propose new weight codes: `keeper(module, inputs, targets)` gathers
    the layer's LayerProblem (at most max_rows rows or 256 images, sampled with seed), calls
    `solve`, and keeps the result only if it lowers the layer's output error (`keep_if_better`:
    on at most check_rows of those rows, two forwards of the layer; GPTQ solves on up to 16384)."""

    name: ClassVar[str] = ""
    handles_groups: ClassVar[bool] = False  # True: also per-group weights (w4a16)
    max_rows: int = field(default=4096, kw_only=True)
    check_rows: int = field(default=4096, kw_only=True)  # rows the keep-if-better check scores
    seed: int = field(default=0, kw_only=True)

    def solve(self, prob: LayerProblem) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(codes, the weight's shape; new scale in the weight quantizer's shape, or None)."""
        raise NotImplementedError

    def __call__(self, module: WeightedQuantOpr, inputs: list[torch.Tensor], targets: list[torch.Tensor]) -> None:
        if not supports(module, groups=self.handles_groups):
            return
        prob = LayerProblem.gather(module, inputs, targets, max_rows=self.max_rows, seed=self.seed)
        with torch.no_grad():
            codes, scale = self.solve(prob)
            self.keep_if_better(prob, codes, scale)

    def keep_if_better(self, prob: LayerProblem, codes: torch.Tensor, scale: torch.Tensor | None) -> None:
        """Fix the solution in the layer if it lowers the output error on check_rows of prob's rows."""
        prob.sampled(self.check_rows, self.seed).keep_if_better(self.name, codes, scale)
