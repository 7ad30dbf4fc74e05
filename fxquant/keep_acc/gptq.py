"""gptq: error-compensating weight rounding (GPTQ) against the layer's quantized calibration inputs."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fxquant.fake_quant import dequantize_codes, quantize_codes

from .layer_problem import CodeKeeper, LayerProblem, input_columns


@dataclass
class GPTQWeights(CodeKeeper):
    """Round the weight one input column at a time, moving each column's rounding error onto the
    columns not yet rounded through the inverse Hessian H = X X^T of the layer's (quantized) inputs
    X [d, N], so that ||W X - deq(codes) X||^2 stays small. The weight's qparams are the calibrated
    ones (per tensor, channel, or per group of input columns: w4a16's static groups, so columns can
    be taken in any order); columns are taken in order of decreasing H diagonal (act_order),
    `block` at a time, with `damp` * mean(diag H) added to the diagonal. Kept only when the layer's
    output error drops."""

    damp: float = 0.01
    block: int = 128
    act_order: bool = True
    max_rows: int = field(default=16384, kw_only=True)
    name = "gptq"
    handles_groups = True

    def solve(self, prob: LayerProblem) -> tuple[torch.Tensor, None]:
        """(integer codes, the weight's shape; None: the calibrated qparams stay)."""
        weight = prob.module.weight.detach().float()
        n = weight.shape[0]
        groups = getattr(prob.module, "groups", 1)
        x, _ = input_columns(prob, max_cols=self.max_rows, seed=self.seed)  # [g, d, N]
        w = weight.reshape(groups, n // groups, -1)
        scale, zero = column_qparams(prob, w.shape[-1])
        s, z = scale.reshape(w.shape), zero.reshape(w.shape)
        codes = torch.stack([self._solve_group(w[g], s[g], z[g], x[g], prob) for g in range(groups)])
        return codes.reshape(weight.shape), None

    def _solve_group(self, w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, x: torch.Tensor,
                     prob: LayerProblem) -> torch.Tensor:
        """w [n, d] float32, s / z [n, d] the scale and zero point of each weight, x [d, N] float32
        -> codes [n, d] (integer-valued floats).

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
        s, z = s.double()[:, perm], z.double()[:, perm]
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
        codes = torch.zeros_like(w)
        d = w.shape[1]
        for start in range(0, d, self.block):
            end = min(start + self.block, d)
            wb = w[:, start:end].clone()
            err = torch.zeros_like(wb)
            hb = hinv[start:end, start:end]
            for i in range(end - start):
                j = start + i
                col = wb[:, i:i + 1]
                sj, zj = s[:, j:j + 1], z[:, j:j + 1]
                q = quantize_codes(col, sj, zj, wq.qmin, wq.qmax, wq.spec.rounding)
                codes[:, j:j + 1] = q
                e = (col - dequantize_codes(q, sj, zj)) / hb[i, i]
                wb[:, i:] -= e @ hb[i:i + 1, i:]
                err[:, i:i + 1] = e
            w[:, end:] -= err @ hinv[start:end, end:]
        return codes[:, torch.argsort(perm)].float()


def column_qparams(prob: LayerProblem, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero point) of every weight element as [n, d] float32 (d: the columns of one conv
    group): per-group qparams repeated over their group's columns, per-channel / per-tensor ones
    over all columns (zero point 0: those weights are symmetric)."""
    wq = prob.weight_quantizer
    n = prob.module.weight.shape[0]
    if prob.grouped:
        g = wq.spec.group_size
        return (wq.scale.float().repeat_interleave(g, dim=1), wq.zero_point.float().repeat_interleave(g, dim=1))
    scale = prob.weight_scale().float().reshape(-1).expand(n)
    return scale[:, None].expand(n, d), torch.zeros(n, d)
