"""round_opt: adaptive rounding (AdaRound, Nagel et al. 2020) of each layer's weight codes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .layer_problem import CodeKeeper, LayerProblem

_ZETA, _GAMMA = 1.1, -0.1  # rectified sigmoid stretch


@dataclass
class AdaRound(CodeKeeper):
    """Learn, per weight element, whether to round down or up so that the layer's output on its
    quantized calibration inputs matches the float output; the codes are then fixed in the layer.

    iters: Adam steps; reg: weight of the regulariser that drives the soft rounding to 0 or 1;
    batch: rows (Linear) or images (conv) per step.
    """

    iters: int = 400
    reg: float = 0.01
    lr: float = 1e-2
    batch: int = 1024
    warmup: float = 0.2
    name = "round_opt"

    def solve(self, prob: LayerProblem) -> tuple[torch.Tensor, None]:
        wq = prob.weight_quantizer
        scale = prob.weight_scale().detach()
        w = prob.module.weight.detach().float() / scale
        floor = torch.floor(w)
        rest = (w - floor).clamp(1e-4, 1 - 1e-4)
        v = (-torch.log((_ZETA - _GAMMA) / (rest - _GAMMA) - 1)).requires_grad_(True)
        x = prob.quantized_input().detach()
        gen = torch.Generator().manual_seed(self.seed)
        opt = torch.optim.Adam([v], lr=self.lr)
        n = x.shape[0]
        with torch.enable_grad():
            for step in range(self.iters):
                idx = torch.randint(0, n, (min(self.batch, n),), generator=gen)
                h = self._soft(v)
                wsoft = torch.clamp(floor + h, wq.qmin, wq.qmax) * scale
                loss = ((prob.forward(x[idx], wsoft) - prob.y[idx]) ** 2).sum(dim=1).mean()
                frac = step / max(self.iters, 1)
                if frac >= self.warmup:
                    beta = 20 + (2 - 20) * (frac - self.warmup) / (1 - self.warmup)
                    loss = loss + self.reg * (1 - (2 * h - 1).abs().pow(beta)).sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
        return torch.clamp(floor + (v >= 0).float(), wq.qmin, wq.qmax).detach(), None

    @staticmethod
    def _soft(v: torch.Tensor) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(v) * (_ZETA - _GAMMA) + _GAMMA, 0, 1)
