"""admm: alternating optimisation (ADMM) of a layer's weight codes and scales against its output
error on the calibration inputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fxquant.quant_opr import QLinear, _QWeighted

from .layer_problem import LayerProblem, supports


def _columns(prob: LayerProblem, max_cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(X [groups, d, N], Y [groups, n/groups, N]): input columns the weight multiplies and the
    float outputs without bias, so that Y ~= W X per group with W [groups, n/groups, d]."""
    m = prob.module
    x, y = prob.quantized_input(), prob.y
    if m.bias is not None:
        shape = [-1] if isinstance(m, QLinear) else [1, -1] + [1] * (y.dim() - 2)
        y = y - m.bias.detach().float().reshape(shape)
    if isinstance(m, QLinear):
        cols, outs = x.t().unsqueeze(0), y.t().unsqueeze(0)
    else:
        if x.dim() == 3:  # conv1d as a conv2d of height 1
            x, y = x.unsqueeze(2), y.unsqueeze(2)
            k, s, p, d = (1, *m.kernel_size), (1, *m.stride), (0, *m.padding), (1, *m.dilation)
        else:
            k, s, p, d = m.kernel_size, m.stride, m.padding, m.dilation
        g = m.groups
        unfolded = F.unfold(x, k, dilation=d, padding=p, stride=s)  # [b, c*kh*kw, L]
        b, _, L = unfolded.shape
        cols = unfolded.reshape(b, g, -1, L).permute(1, 2, 0, 3).reshape(g, -1, b * L)
        outs = y.reshape(b, g, -1, L).permute(1, 2, 0, 3).reshape(g, -1, b * L)
    if cols.shape[-1] > max_cols:
        idx = torch.randperm(cols.shape[-1], generator=torch.Generator().manual_seed(seed))[:max_cols]
        cols, outs = cols[..., idx], outs[..., idx]
    return cols, outs


@dataclass
class ADMMWeights:
    """Minimise ||W X - Y||^2 over quantized W = s * codes with ADMM: a least-squares step for a
    continuous W, a projection onto the quantization grid (codes and per-channel scale refitted
    alternately), and a dual update; `iters` ADMM steps, penalty rho relative to mean(diag(X X^T))."""

    iters: int = 100
    rho: float = 0.1
    max_cols: int = 65536
    seed: int = 0

    def __call__(self, module: _QWeighted, inputs: list[torch.Tensor], targets: list[torch.Tensor]) -> None:
        if not supports(module):
            return
        prob = LayerProblem.gather(module, inputs, targets, seed=self.seed)
        with torch.no_grad():
            codes, scale = self._solve(prob)
        prob.keep_if_better("admm", codes, scale.reshape(prob.weight_quantizer.scale.shape))

    def _solve(self, prob: LayerProblem) -> tuple[torch.Tensor, torch.Tensor]:
        wq = prob.weight_quantizer
        weight = prob.module.weight.detach().float()
        n = weight.shape[0]
        groups = getattr(prob.module, "groups", 1)
        x, y = _columns(prob, self.max_cols, self.seed)
        h = x @ x.transpose(1, 2)  # [g, d, d]
        cross = y @ x.transpose(1, 2)  # [g, n/g, d]
        rho = self.rho * float(h.diagonal(dim1=1, dim2=2).mean().clamp(min=1e-12))
        eye = torch.eye(h.shape[-1]).expand_as(h)
        chol = torch.linalg.cholesky(h + rho * eye)
        per_channel = wq.scale.dim() > 0
        scale = wq.scale.float().reshape(-1).expand(n).clone()  # [n]

        def project(v: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            flat = v.reshape(n, -1)
            for _ in range(2):
                codes = torch.clamp(torch.round(flat / s[:, None]), wq.qmin, wq.qmax)
                num, den = (flat * codes).sum(1), (codes * codes).sum(1)
                if not per_channel:
                    num, den = num.sum().expand(n), den.sum().expand(n)
                s = torch.where(den > 0, num / den.clamp(min=1e-30), s).clamp(min=1e-12)
            codes = torch.clamp(torch.round(flat / s[:, None]), wq.qmin, wq.qmax)
            return codes, s

        codes, scale = project(weight, scale)
        z = (codes * scale[:, None]).reshape(groups, n // groups, -1)
        u = torch.zeros_like(z)
        for _ in range(self.iters):
            rhs = cross + rho * (z - u)  # [g, n/g, d]
            w = torch.cholesky_solve(rhs.transpose(1, 2), chol).transpose(1, 2)
            codes, scale = project((w + u).reshape(weight.shape), scale)
            z = (codes * scale[:, None]).reshape(groups, n // groups, -1)
            u = u + w - z
        return codes.reshape(weight.shape), scale if per_channel else scale[:1].reshape(())
