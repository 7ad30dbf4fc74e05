"""gptq: error-compensating weight rounding (GPTQ) against the layer's quantized calibration inputs."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .layer_problem import CodeKeeper, LayerProblem, input_columns


@dataclass
class GPTQWeights(CodeKeeper):
    """Round the weight one input column at a time, moving each column's rounding error onto the
    columns not yet rounded through the inverse Hessian H = X X^T of the layer's (quantized) inputs
    X [d, N], so that ||W X - s * codes X||^2 stays small. The weight scale is the calibrated one;
    columns are taken in order of decreasing H diagonal (act_order), `block` at a time, with
    `damp` * mean(diag H) added to the diagonal. Kept only when the layer's output error drops."""

    damp: float = 0.01
    block: int = 128
    act_order: bool = True
    max_rows: int = field(default=16384, kw_only=True)
    name = "gptq"

    def solve(self, prob: LayerProblem) -> tuple[torch.Tensor, None]:
        """(integer codes, the weight's shape; None: the calibrated scale stays)."""
        weight = prob.module.weight.detach().float()
        n = weight.shape[0]
        groups = getattr(prob.module, "groups", 1)
        x, _ = input_columns(prob, max_cols=self.max_rows, seed=self.seed)  # [g, d, N]
        scale = prob.weight_scale().float().reshape(-1).expand(n)  # [n]
        w = weight.reshape(groups, n // groups, -1)
        s = scale.reshape(groups, n // groups)
        codes = torch.stack([self._solve_group(w[g], s[g], x[g], prob) for g in range(groups)])
        return codes.reshape(weight.shape), None

    def _solve_group(self, w: torch.Tensor, s: torch.Tensor, x: torch.Tensor, prob: LayerProblem) -> torch.Tensor:
        """w [n, d] float32, s [n], x [d, N] float32 -> codes [n, d] (integer-valued floats).

        H is accumulated in float64: massive activations (|x| ~ 1e3 over 1e4 rows) lose enough
        precision in float32 to move SmolLM2's perplexity by 0.2%."""
        wq = prob.weight_quantizer
        x = x.double()
        h = x @ x.t()
        dead = h.diagonal() == 0
        h[dead, dead] = 1.0
        h.diagonal().add_(self.damp * float(h.diagonal().mean()))
        w = w.double().clone()
        w[:, dead] = 0.0
        perm = torch.argsort(h.diagonal(), descending=True) if self.act_order else torch.arange(h.shape[0])
        w, h = w[:, perm], h[perm][:, perm]
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
        s = s.double()[:, None]
        codes = torch.zeros_like(w)
        d = w.shape[1]
        for start in range(0, d, self.block):
            end = min(start + self.block, d)
            wb = w[:, start:end].clone()
            err = torch.zeros_like(wb)
            hb = hinv[start:end, start:end]
            for i in range(end - start):
                col = wb[:, i:i + 1]
                q = torch.clamp(torch.round(col / s), wq.qmin, wq.qmax)
                codes[:, start + i:start + i + 1] = q
                e = (col - q * s) / hb[i, i]
                wb[:, i:] -= e @ hb[i:i + 1, i:]
                err[:, i:i + 1] = e
            w[:, end:] -= err @ hinv[start:end, end:]
        return codes[:, torch.argsort(perm)].float()
