"""easy_quant: search the activation and weight scales of each layer for the highest output
cosine similarity (EasyQuant, Wu et al. 2020)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from fxquant.quantizer import StaticQuantizer
from fxquant.weighted_quant_opr import WeightedQuantOpr

from .layer_problem import LayerProblem, supports

log = logging.getLogger(__name__)


def channel_cosine(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Cosine similarity per output channel (dim 1 of conv outputs, last dim of Linear rows): [n]."""
    dims = [d for d in range(out.dim()) if d != (1 if out.dim() > 2 else out.dim() - 1)]
    num = (out * ref).sum(dim=dims)
    return num / (out.pow(2).sum(dim=dims).sqrt() * ref.pow(2).sum(dim=dims).sqrt()).clamp(min=1e-30)


@dataclass
class EasyQuantScales:
    """Alternately search the input scale (one factor for the tensor) and the weight scales (one
    factor per output channel) in [low, high] times their calibrated values, keeping the factor
    with the highest output cosine; `iters` candidates per search, `rounds` alternations."""

    iters: int = 50
    rounds: int = 2
    low: float = 0.5
    high: float = 1.2

    def __call__(self, module: WeightedQuantOpr, inputs: list[torch.Tensor], targets: list[torch.Tensor]) -> None:
        if not supports(module):
            return
        prob = LayerProblem.gather(module, inputs, targets)
        aq = module.active_input_quantizer()
        a_scale0 = aq.scale.clone() if isinstance(aq, StaticQuantizer) and aq.calibrated else None
        w_scale0 = prob.weight_quantizer.scale.clone()
        before = prob.current_error()
        factors = torch.linspace(self.low, self.high, max(self.iters, 2)).tolist()
        with torch.no_grad():
            for _ in range(self.rounds):
                if a_scale0 is not None:
                    aq.scale = self._best_input_scale(prob, aq, factors)
                prob.weight_quantizer.scale = self._best_weight_scale(prob, factors)
            after = prob.current_error()
        if after >= before:  # the cosine search made the squared error worse: keep the calibrated scales
            prob.weight_quantizer.scale = w_scale0
            if a_scale0 is not None:
                aq.scale = a_scale0
        log.debug("easy_quant: output error %.4g -> %.4g", before, min(after, before))

    def _best_input_scale(self, prob: LayerProblem, aq: StaticQuantizer, factors: list[float]) -> torch.Tensor:
        w = prob.dequantized_weight(prob.rtn_codes())
        base = aq.scale.clone()
        best, best_cos = base, -2.0
        for f in factors:
            out = prob.forward(prob.quantized_input(base * f), w)
            cos = float(torch.nn.functional.cosine_similarity(out.reshape(1, -1), prob.y.reshape(1, -1)))
            if cos > best_cos:
                best, best_cos = base * f, cos
        return best

    def _best_weight_scale(self, prob: LayerProblem, factors: list[float]) -> torch.Tensor:
        wq = prob.weight_quantizer
        x = prob.quantized_input()
        base = wq.scale.clone()
        per_channel = wq.spec.granularity == "channel"
        shape = [-1] + [1] * (prob.module.weight.dim() - 1) if per_channel else []
        best, best_cos = base.clone(), None
        for f in factors:
            scale = (base * f).reshape(shape)
            out = prob.forward(x, prob.dequantized_weight(prob.rtn_codes(scale), scale))
            cos = channel_cosine(out, prob.y) if per_channel else torch.nn.functional.cosine_similarity(
                out.reshape(1, -1), prob.y.reshape(1, -1))
            if best_cos is None:
                best_cos, best = cos, (base * f).clone()
            else:
                better = cos > best_cos
                best = torch.where(better, base * f, best)
                best_cos = torch.where(better, cos, best_cos)
        return best.reshape(base.shape)
